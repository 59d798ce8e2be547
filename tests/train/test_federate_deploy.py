"""The Flower App deployed as on real machines, all on loopback: `flower-superlink` and two `flower-supernode`s (each
with its gRPC health server, checked to answer) as separate processes, `flwr run` against them, one SuperNode killed
mid-round."""
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llmkit.train.federated import (FAIL_ENV, FederateConfig, flwr_run, start_superlink, start_supernode, stop,
                                    write_app, write_connection)

SST = Path(__file__).parents[1] / "data" / "sst_train_30.tsv"
ALLOWED = {"round", "epsilon", "val_loss", "val_acc", "val_ppl"}  # what the accountant covers (and the server's data)


def _health(address: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            try:
                return health_pb2.HealthCheckResponse.ServingStatus.Name(
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status)
            except grpc.RpcError:
                time.sleep(0.2)
    return "unreachable"


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} within {timeout} s:\n{path.read_text(errors='replace')[-3000:]}")


def test_flwr_run_on_a_superlink_with_two_supernodes_one_killed_mid_round(sst_llama_base, tmp_path):
    """Two rounds under client-level DP; SuperNode 1 stalls in round 2 and is killed: the round aggregates the other,
    the epsilon is spent as planned, and nothing un-noised about a client is written."""
    out, home, logs = tmp_path / "fed", tmp_path / "flwr-home", tmp_path
    fc = FederateConfig(model=str(sst_llama_base), data=str(SST), out=str(out), clients=2, rounds=2, local_steps=1,
                        batch_size=4, lora_r=4, dp_epsilon=50.0, dp_clip=0.5, round_timeout=180, connect_timeout=120)
    app = write_app(tmp_path / "app", fc)
    link, addr = start_superlink(logs / "superlink.log", flwr_home=home)
    nodes = []
    try:
        health = [addr["health"]]
        for i in range(2):  # each SuperNode holds its partition of the data (on real machines: its own file)
            proc, node_addr = start_supernode(addr["address"], logs / f"supernode-{i}.log",
                                              f"partition-id={i} num-partitions=2", flwr_home=home,
                                              env={FAIL_ENV: "1:2"} if i == 1 else None)
            nodes.append(proc)
            health.append(node_addr["health"])
        # Flower's gRPC health servers answer (grpcio-health-checking's code must match the installed protobuf)
        assert [_health(h) for h in health] == ["SERVING"] * 3, [p.read_text()[-2000:] for p in logs.glob("*.log")]
        write_connection(home, "test", addr["address"])
        t0 = time.time()
        result = {}
        runner = threading.Thread(target=lambda: result.update(
            rc=flwr_run(app, home, "test", log=logs / "run.log", timeout=300)))
        runner.start()
        _wait_for(logs / "supernode-1.log", "stalling in round 2", 240)
        stop(nodes[1])  # SIGTERM to the SuperNode and its ClientApp process, mid-round
        runner.join(300)
        seconds = time.time() - t0
    finally:
        for proc in [*nodes, link]:
            stop(proc)
    run_log = (logs / "run.log").read_text()
    assert result.get("rc") == 0, run_log[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2], run_log[-3000:]
    assert all(set(r) <= ALLOWED for r in rows)  # no client's loss, norm, count or participation
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] <= 50
    dp = json.loads((out / "run_config.json").read_text())["dp"]
    assert dp["sampling"] == "poisson" and dp["rounds"] == 2
    assert dp["epsilon_spent"] == pytest.approx(rows[2]["epsilon"], abs=1e-3)
    assert "round 2: 1 client(s) failed" in run_log  # the server's console (the trusted curator's view)
    assert json.loads((out / "result.json").read_text())["epsilon"] == pytest.approx(rows[2]["epsilon"], abs=1e-3)
    from safetensors.numpy import load_file

    from llmkit.model.checkpoint import load_model

    tensors = load_file(str(out / "adapter_model.safetensors"))  # the global adapter: a PEFT folder
    b = [v for k, v in tensors.items() if ".lora_B." in k]
    assert b and any(np.abs(t).max() > 0 for t in b)  # LoRA B starts at zero: the rounds moved it
    assert load_model(out).config.num_labels == 2
    print(f"deployment run: {seconds:.1f} s")
