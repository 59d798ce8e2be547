"""The Flower App in one process: fl_app's ServerApp (Flower's FedAvg/FedProx strategy with llmkit's hooks) against
an in-process grid whose nodes run fl_app's ClientApp, so that clients can die on cue and the DP sampler can be
watched. The same app runs in Flower's Simulation Engine (test_federate.py) and on a SuperLink with SuperNodes started
apart (test_federate_deploy.py)."""
import json
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict

from llmkit.train import dp as privacy
from llmkit.train import fl_app
from llmkit.train.federated import FederateConfig, to_run_config

SST = Path(__file__).parents[1] / "data" / "sst_train_30.tsv"
ALLOWED = {"round", "epsilon", "val_loss", "val_acc", "val_ppl"}  # what the accountant covers (and the server's data)


class Grid:
    """Flower's Grid in one process: node i (id i + 1) trains partition i; `dies={i: round}` makes node i answer that
    round with Flower's node-unavailable error and leave."""

    def __init__(self, n: int, run_config: dict, dies: dict | None = None, node_config: dict | None = None):
        self.n, self.rc, self.dies, self.round, self.sent = n, run_config, dies or {}, 0, {}
        self.node_config = node_config or {}  # node i -> its node config (default: partition i of n)

    def get_node_ids(self):
        return [i + 1 for i in range(self.n) if self.dies.get(i, 10 ** 9) > self.round]

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if not messages:  # evaluation rounds (fraction_evaluate 0) and DP rounds that sampled no one
            return []
        self.round = int(messages[0].content["config"]["server-round"])
        self.sent[self.round] = sorted(m.metadata.dst_node_id - 1 for m in messages)
        replies = []
        for m in messages:
            i = m.metadata.dst_node_id - 1
            if self.dies.get(i) == self.round:
                replies.append(Message(Error(code=5, reason="Error: Node Unavailable — no heartbeat"), reply_to=m))
                continue
            node_config = self.node_config.get(i, {"partition-id": i, "num-partitions": self.n})
            ctx = Context(run_id=1, node_id=i + 1, node_config=node_config, state=RecordDict(), run_config=self.rc)
            replies.append(fl_app.client_train(m, ctx))
        return replies


@pytest.fixture
def run(sst_llama_base, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for k, v in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():  # what Flower's app processes set
        monkeypatch.setattr(TaskIdentity, k, v)

    def go(clients, rounds, dies=None, node_config=None, **kw):
        fc = FederateConfig(model=str(sst_llama_base), data=str(SST), out=str(tmp_path / "fed"), clients=clients,
                            rounds=rounds, local_steps=1, batch_size=4, lora_r=4, **kw)
        rc = to_run_config(fc)
        grid = Grid(clients, rc, dies, node_config)
        fl_app.server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
        out = tmp_path / "fed"
        return grid, out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return go


def test_a_dying_client_is_a_failure_of_its_round_and_later_rounds_go_on(run, capsys):
    grid, out, rows = run(3, 3, dies={1: 2}, split="dirichlet:0.5", strategy="fedprox", mu=0.1)
    err = capsys.readouterr().err
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all("val_loss" in r and "val_acc" in r for r in rows)  # the server evaluates every round
    assert rows[1]["clients_ok"] == 3 and rows[1]["clients_failed"] == 0
    assert rows[2]["clients_ok"] == 2 and rows[2]["clients_failed"] == 1
    assert "Node Unavailable" in rows[2]["failures"][0]
    assert set(rows[2]["client_train_loss"]) == {"0", "2"}
    assert rows[3]["clients_sampled"] == 2 and grid.sent[3] == [0, 2]  # the dead client is gone; the run went on
    assert "round 2: 1 client(s) failed" in err
    result = json.loads((out / "result.json").read_text())
    assert result["client_failures"] == 1 and result["rounds"] == 3
    # only the adapter travels: bytes per client are the LoRA + head tensors (float32), not the model
    from safetensors.torch import load_file

    from llmkit.model.checkpoint import load_model

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert any(".lora_A." in k for k in tensors) and any(k.endswith("score.weight") for k in tensors)
    adapter = sum(t.numel() for t in tensors.values())
    per_client = rows[1]["bytes_sent"] / rows[1]["clients_sampled"]
    assert 4 * adapter <= per_client <= 4 * adapter + 200 * len(tensors)
    lm = load_model(out)  # the final global adapter is an ordinary PEFT adapter folder
    assert per_client < 0.2 * 4 * lm.model.num_params() and lm.config.num_labels == 2
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert sum(json.loads((out / "run_config.json").read_text())["federate"]["shard_sizes"]) == 27
    assert (out / "federate.png").read_bytes()[:4] == b"\x89PNG"


def test_dp_run_with_a_dying_client_samples_at_q_and_writes_nothing_un_noised(run, monkeypatch, capsys):
    seen = []
    sample = privacy.ClientDP.sample

    def record(self, clients):
        seen.append(len(clients))
        return sample(self, clients)

    monkeypatch.setattr(privacy.ClientDP, "sample", record)
    grid, out, rows = run(3, 3, dies={1: 2}, dp_epsilon=50.0, dp_clip=0.5)
    err = capsys.readouterr().err
    assert seen == [3, 3, 2]  # the dead client is never sampled again; the others keep q = 1
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(set(r) <= ALLOWED for r in rows), [sorted(set(r) - ALLOWED) for r in rows]
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] < rows[3]["epsilon"] <= 50
    dp = json.loads((out / "run_config.json").read_text())["dp"]
    assert dp["sampling"] == "poisson" and dp["sample_rate"] == 1.0 and dp["rounds"] == 3
    assert dp["epsilon_spent"] == pytest.approx(rows[3]["epsilon"], abs=1e-3)
    result = json.loads((out / "result.json").read_text())
    assert "client_failures" not in result and result["epsilon"] == dp["epsilon_spent"]
    assert "train_loss" not in err and "client-level DP: clip 0.5" in err  # clients keep their loss under DP


def test_a_dp_round_that_samples_no_client_still_releases_noise(run, monkeypatch):
    calls = []
    sample = privacy.ClientDP.sample

    def none_in_round_2(self, clients):
        calls.append(1)
        return [] if len(calls) == 2 else sample(self, clients)

    monkeypatch.setattr(privacy.ClientDP, "sample", none_in_round_2)
    grid, out, rows = run(2, 2, dp_epsilon=50.0)
    assert 2 not in grid.sent and len(calls) == 2
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["epsilon"] > rows[1]["epsilon"]
    assert rows[2]["val_loss"] != rows[1]["val_loss"]  # the adapter moved by the noise alone: no tell-tale no-op


def test_a_supernode_can_train_on_a_file_of_its_own(run, tmp_path, capsys):
    own = tmp_path / "mine.tsv"  # node 1's own data: 12 rows (both labels), not a shard of the server's file
    lines = SST.read_text().splitlines(keepends=True)
    own.write_text("".join(lines[:1] + lines[1:7] + lines[-6:]))
    grid, out, rows = run(2, 1, node_config={1: {"data": str(own), "partition-id": 1}})
    n_own = rows[1]["client_examples"]["1"]
    assert rows[1]["clients_ok"] == 2 and 0 < n_own <= 12  # its training part (the val split of its file is unused)
    assert rows[1]["client_examples"]["0"] == json.loads((out / "run_config.json").read_text())[
        "federate"]["shard_sizes"][0]
