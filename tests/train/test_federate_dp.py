"""Client-level DP in federated runs: clients are Poisson-sampled at the rate the accountant assumes (also when clients
die), a round that samples no one still releases noise, and nothing un-noised about a client is written to OUT."""
import json
from pathlib import Path

import numpy as np
import pytest

from llmkit.cli import main
from llmkit.train import dp as privacy
from llmkit.train.federated import FAIL_ENV, FederateConfig

SST = Path(__file__).parents[1] / "data" / "sst_train_30.tsv"
ALLOWED = {"round", "epsilon", "val_loss", "val_acc", "val_ppl"}  # what the accountant covers (and the server's data)


def test_clients_are_poisson_sampled_at_the_accounted_rate_whoever_is_left():
    # 10 clients, fraction 0.1: the accountant assumes q = 1/10. With 5 of them gone Flower would pick 1 of the 5
    # every round (q = 0.2, and never 0 or 2); the run must keep each client's chance at 0.1, independently.
    dp = privacy.ClientDP(FederateConfig(model="m", data="d", out="o", clients=10, rounds=20, fraction_fit=0.1,
                                         dp_epsilon=20.0))
    assert dp.m == 1 and dp.sample_rate == pytest.approx(0.1)
    alive = list(range(5))
    picks = [dp.sample(alive) for _ in range(20000)]
    rate = np.mean([c in p for p in picks for c in alive])
    assert rate == pytest.approx(0.1, abs=0.01)
    sizes = np.bincount([len(p) for p in picks], minlength=3)
    assert sizes[0] > 0.5 * 20000 and sizes[2] > 0  # binomial sizes (Poisson sampling), not a fixed-size subset
    assert dp.summary(3)["sampling"] == "poisson"


def _run(base, out, *flags):
    return main(["federate", "--model", str(base), "--data", str(SST), "--local-steps", "1", "--batch-size", "4",
                 "--lora-r", "4", "--out", str(out), "--connect-timeout", "120", *flags])


def test_dp_run_with_a_dying_client_writes_nothing_un_noised_about_clients(sst_llama_base, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "fed"
    monkeypatch.setenv(FAIL_ENV, "1:2")  # client 1 exits in the middle of round 2
    seen = []
    sample = privacy.ClientDP.sample

    def record(self, clients):
        seen.append(len(clients))
        return sample(self, clients)

    monkeypatch.setattr(privacy.ClientDP, "sample", record)
    rc = _run(sst_llama_base, out, "--clients", "3", "--rounds", "3", "--dp-epsilon", "50", "--dp-clip", "0.5")
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert seen[0] == 3 and seen[-1] == 2  # the dead client is never sampled again; the others keep q = 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(set(r) <= ALLOWED for r in rows), [sorted(set(r) - ALLOWED) for r in rows]
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] < rows[3]["epsilon"] <= 50
    dp = json.loads((out / "run_config.json").read_text())["dp"]
    assert dp["sampling"] == "poisson" and dp["sample_rate"] == 1.0 and dp["rounds"] == 3
    assert dp["epsilon_spent"] == pytest.approx(rows[3]["epsilon"], abs=1e-3)
    logs = "".join(p.read_text() for p in (out / "client-logs").glob("*.log"))
    assert "train_loss" not in logs and "exiting in round 2" in logs
    assert "client_failures" not in stdout and "epsilon" in stdout


def test_a_dp_round_that_samples_no_client_still_releases_noise(sst_llama_base, tmp_path, monkeypatch):
    calls = []
    sample = privacy.ClientDP.sample

    def none_in_round_2(self, clients):
        calls.append(1)
        return [] if len(calls) == 2 else sample(self, clients)

    monkeypatch.setattr(privacy.ClientDP, "sample", none_in_round_2)
    out = tmp_path / "fed"
    assert _run(sst_llama_base, out, "--clients", "2", "--rounds", "2", "--dp-epsilon", "50") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["epsilon"] > rows[1]["epsilon"]
    assert rows[2]["val_loss"] != rows[1]["val_loss"]  # the adapter moved by the noise alone: no tell-tale no-op
