"""Federated LoRA fine-tuning on Flower: data splits, the run config that carries the settings, `llmkit federate`
in Flower's Simulation Engine (a SuperLink with --simulation, virtual SuperNodes on Ray), --write-app, and bad input."""
import json
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from llmkit.cli import main
from llmkit.train.federated import FederateConfig, from_run_config, split_shards, to_run_config

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


def test_the_run_config_carries_every_setting():
    fc = FederateConfig(model="m", data="d.tsv", out="/o", task="classify", lora_targets=["q", "v"], lora_layers=2,
                        dp_epsilon=8.0, strategy="fedprox", lr=1e-3)
    rc = to_run_config(fc)
    assert all(isinstance(v, (str, int, float, bool)) for v in rc.values())  # TOML scalars, as Flower needs
    assert from_run_config(rc) == fc
    plain = FederateConfig(model="m", data="d", out="o")
    assert from_run_config(to_run_config(plain)) == plain  # None survives as ""
    assert from_run_config({**to_run_config(plain), "lr": 1, "rounds": 7}).lr == 1.0  # --run-config overrides


@pytest.fixture
def base(sst_llama_base):
    return sst_llama_base


def test_write_app_is_a_flower_app_with_the_flags_as_its_run_config(base, tmp_path, capsys):
    app = tmp_path / "app"
    assert main(["federate", "--model", str(base), "--data", str(SST), "--out", "/srv/fed", "--clients", "3",
                 "--rounds", "7", "--dp-epsilon", "8", "--write-app", str(app)]) == 0
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    flwr = doc["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "llmkit.train.fl_app:server_app",
                                  "clientapp": "llmkit.train.fl_app:client_app"}
    fc = from_run_config(flwr["config"])
    assert (fc.clients, fc.rounds, fc.dp_epsilon, fc.out, fc.task) == (3, 7, 8.0, "/srv/fed", None)
    from flwr.common.config import validate_config

    ok, errors, _ = validate_config(doc, project_dir=app)  # what `flwr run` checks before it sends the app
    assert ok, errors
    assert "flwr run" in capsys.readouterr().err


def test_federate_runs_in_flowers_simulation_engine(base, tmp_path, capsys):
    """`llmkit federate`: a SuperLink with --simulation and 3 virtual SuperNodes (Ray actors) on a Dirichlet split."""
    out = tmp_path / "fed"
    t0 = time.time()
    rc = main(["federate", "--model", str(base), "--data", str(SST), "--clients", "3", "--rounds", "2",
               "--local-steps", "1", "--batch-size", "4", "--split", "dirichlet:0.5", "--strategy", "fedprox",
               "--mu", "0.1", "--lora-r", "4", "--out", str(out)])
    seconds = time.time() - t0
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr + (out / "flower-logs" / "run.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_ok"] == 3 and r["clients_failed"] == 0 for r in rows[1:])
    assert all(set(r["client_train_loss"]) == {"0", "1", "2"} for r in rows[1:])  # every virtual client trained
    shards = json.loads((out / "run_config.json").read_text())["federate"]["shard_sizes"]
    assert sorted(shards) != [9, 9, 9] and sum(shards) == 27  # Dirichlet, not IID
    assert {int(c): n for c, n in rows[1]["client_examples"].items()} == dict(enumerate(shards))
    assert "server: round 2: val_loss" in stderr and "val_acc" in stdout and "client_failures 0" in stdout
    assert (out / "adapter_model.safetensors").exists() and (out / "federate.png").exists()
    print(f"simulation run: {seconds:.1f} s")


@pytest.mark.parametrize("flags, message", [
    (["--clients", "40"], "more than the 27 training examples"),
    (["--split", "dirichlet:abc"], "--split must be iid or dirichlet"),
    (["--split", "dirichlet:0"], "--split must be iid or dirichlet"),
    (["--fraction-fit", "0"], "--fraction-fit"),
    (["--rounds", "0"], "--rounds"),
    (["--client-cpus", "0"], "--client-cpus"),
    (["--data", str(DATA / "tinyshakespeare_head.txt"), "--split", "dirichlet:0.5"], "needs class labels"),
])
def test_bad_input_exits_2_and_writes_nothing(base, tmp_path, capsys, flags, message):
    out = tmp_path / "fed"
    rc = main(["federate", "--model", str(base), "--data", str(SST), "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err.strip().splitlines()[-1]
    assert not out.exists()


def test_unreachable_client_level_epsilon_says_what_is_reachable(base, tmp_path, capsys):
    out = tmp_path / "fed"
    rc = main(["federate", "--model", str(base), "--data", str(SST), "--out", str(out), "--clients", "2",
               "--rounds", "3", "--dp-epsilon", "1e-6"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "out of reach" in err[-1] and "ask for epsilon above" in err[-1]
    assert not out.exists()
