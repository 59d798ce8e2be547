"""Federated LoRA fine-tuning on Flower: data splits, a local run (server + client processes on loopback) in which a
client dies mid-round, and bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

from llmkit.model.checkpoint import load_model
from llmkit.cli import main
from llmkit.train.federated import FAIL_ENV, split_shards

DATA = Path(__file__).parents[1] / "data"
SST = DATA / "sst_train_30.tsv"


@pytest.mark.parametrize("n, k", [(30, 4), (7, 7), (100, 3)])
def test_iid_split_is_a_partition_of_near_equal_shards(n, k):
    shards = split_shards(n, k, "iid", seed=1)
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("seed", range(5))
def test_dirichlet_split_is_a_partition_skewed_by_label(seed):
    labels = np.random.default_rng(seed).integers(0, 2, 400).tolist()
    skewed = split_shards(400, 4, "dirichlet:0.1", labels, seed)
    assert sorted(i for s in skewed for i in s) == list(range(400)) and min(map(len, skewed)) > 0
    even = split_shards(400, 4, "iid", labels, seed)

    def majority(shards):  # mean share of each shard's most common label
        return np.mean([max(np.bincount([labels[i] for i in s], minlength=2)) / len(s) for s in shards])
    assert majority(skewed) > majority(even) + 0.1
    assert split_shards(400, 4, "dirichlet:0.1", labels, seed) == skewed  # seeded: every party computes the same


@pytest.fixture
def base(sst_llama_base):
    return sst_llama_base


def test_local_federation_survives_a_dying_client(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fed"
    monkeypatch.setenv(FAIL_ENV, "1:2")  # client 1 exits in the middle of round 2
    rc = main(["federate", "--model", str(base), "--data", str(SST), "--clients", "3", "--rounds", "3",
               "--local-steps", "1", "--batch-size", "4", "--split", "dirichlet:0.5", "--strategy", "fedprox",
               "--mu", "0.1", "--lora-r", "4", "--out", str(out), "--connect-timeout", "120"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all("val_loss" in r and "val_acc" in r for r in rows)  # the server evaluates every round
    assert rows[1]["clients_ok"] == 3 and rows[1]["clients_failed"] == 0
    assert rows[2]["clients_ok"] == 2 and rows[2]["clients_failed"] == 1 and "failures" in rows[2]
    assert set(rows[2]["client_train_loss"]) == {"0", "2"}
    assert rows[3]["clients_sampled"] == 2  # the dead client is gone; the run went on without it
    assert "1 client(s) failed" in stderr and "client_failures 1" in stdout
    # only the adapter travels: bytes per client are the LoRA + head tensors (float32 + .npy headers), not the model
    lm = load_model(out)  # the final global adapter is an ordinary PEFT adapter folder
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert any(".lora_A." in k for k in tensors) and any(k.endswith("score.weight") for k in tensors)
    adapter = sum(t.numel() for t in tensors.values())
    per_client = rows[1]["bytes_sent"] / rows[1]["clients_sampled"]
    assert 4 * adapter <= per_client <= 4 * adapter + 200 * len(tensors)
    assert per_client < 0.2 * 4 * lm.model.num_params()
    assert lm.config.num_labels == 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert sum(json.loads((out / "run_config.json").read_text())["federate"]["shard_sizes"]) == 27
    assert (out / "federate.png").read_bytes()[:4] == b"\x89PNG"
    assert "exiting in round 2" in (out / "client-logs" / "client-1.log").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--clients", "40"], "more than the 27 training examples"),
    (["--split", "dirichlet:abc"], "--split must be iid or dirichlet"),
    (["--split", "dirichlet:0"], "--split must be iid or dirichlet"),
    (["--fraction-fit", "0"], "--fraction-fit"),
    (["--rounds", "0"], "--rounds"),
    (["--data", str(DATA / "tinyshakespeare_head.txt"), "--split", "dirichlet:0.5"], "needs class labels"),
])
def test_bad_input_exits_2_and_writes_nothing(base, tmp_path, capsys, flags, message):
    out = tmp_path / "fed"
    rc = main(["federate", "--model", str(base), "--data", str(SST), "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err.strip().splitlines()[-1]
    assert not out.exists()


def test_client_role_needs_a_server(base, capsys):
    rc = main(["federate", "--role", "client", "--model", str(base), "--data", str(SST)])
    assert rc == 2 and "--server" in capsys.readouterr().err


def test_client_level_dp_clips_each_update_and_adds_calibrated_noise():
    from llmkit.train.federated import ClientDP, FederateConfig

    fc = FederateConfig(model="m", data="d", out="o", clients=4, rounds=5, dp_epsilon=8.0, dp_clip=1.0)
    dp = ClientDP(fc)
    assert dp.m == 4 and dp.sample_rate == 1.0 and dp.noise > 0
    assert 7.9 <= dp.epsilon(5) <= 8.0 and dp.epsilon(1) < dp.epsilon(5)
    g = [np.zeros((3, 4), np.float32), np.ones(5, np.float32)]
    big = [np.full((3, 4), 10.0, np.float32), np.ones(5, np.float32)]  # update norm sqrt(12) * 10: clipped to 1
    small = [np.full((3, 4), 0.01, np.float32), np.ones(5, np.float32)]  # norm ~0.035: kept as it is
    dp.noise = 0.0
    new, info = dp.aggregate(g, [big, small])
    assert info["clipped"] == 1 and info["update_norms"][0] == pytest.approx(np.sqrt(12) * 10, rel=1e-5)
    expect = (np.full((3, 4), 1 / np.sqrt(12)) + 0.01) / 4  # uniform mean over the planned 4 clients
    np.testing.assert_allclose(new[0], expect, rtol=1e-5)
    np.testing.assert_allclose(new[1], 1.0)
    assert new[0].dtype == np.float32
    dp.noise = 2.0  # the noise on the mean has standard deviation noise * clip / m
    zeros = [np.zeros(200_000, np.float32)]
    new, _ = dp.aggregate(zeros, [zeros])
    assert new[0].std() == pytest.approx(2.0 * 1.0 / 4, rel=0.02)


def test_server_and_clients_started_apart_with_client_level_dp(base, tmp_path):
    """The multi-machine commands (a server, then clients that each hold their shard) as separate processes."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fed"
    common = ["--model", str(base), "--data", str(SST), "--batch-size", "4", "--local-steps", "1", "--lora-r", "4",
              "--connect-timeout", "120"]
    cmd = [sys.executable, "-m", "llmkit", "federate"]
    server = subprocess.Popen(cmd + ["--role", "server", "--listen", f"127.0.0.1:{port}", "--clients", "2",
                                     "--rounds", "2", "--dp-epsilon", "50", "--dp-clip", "0.5", "--out", str(out),
                                     *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients = [subprocess.Popen(cmd + ["--role", "client", "--server", f"127.0.0.1:{port}", "--shard", f"{i}/2",
                                       *common], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    try:
        stdout, stderr = server.communicate(timeout=600)
        client_err = [c.communicate(timeout=120)[1] for c in clients]
    finally:
        for proc in [server, *clients]:
            proc.kill()
    assert server.returncode == 0, stderr
    assert all(c.returncode == 0 for c in clients), client_err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] <= 50
    assert all(set(r) <= {"round", "epsilon", "val_loss", "val_acc", "val_ppl"} for r in rows)  # no client's data
    dp = json.loads((out / "run_config.json").read_text())["dp"]
    assert dp["level"] == "client" and dp["rounds"] == 2 and dp["epsilon_spent"] == pytest.approx(rows[2]["epsilon"],
                                                                                                   abs=1e-3)
    assert "client-level DP: clip 0.5" in stderr and "epsilon" in stdout
    assert load_model(out).config.num_labels == 2


def test_unreachable_client_level_epsilon_says_what_is_reachable(base, tmp_path, capsys):
    out = tmp_path / "fed"
    rc = main(["federate", "--model", str(base), "--data", str(SST), "--out", str(out), "--clients", "2",
               "--rounds", "3", "--dp-epsilon", "1e-6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "out of reach" in err[-1] and "ask for epsilon above" in err[-1]
    assert not out.exists()
