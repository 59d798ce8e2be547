"""The Flower App of `llmkit federate`: `server_app` and `client_app` (module path `llmkit.train.fl_app`).

Flower starts them, never llmkit: in its Simulation Engine (`llmkit federate`, many virtual clients on Ray) or, in a
deployment, `flwr run` sends the app's pyproject.toml (written by `llmkit federate --write-app`) to a SuperLink, whose
ServerApp process imports `server_app` here, and each SuperNode's ClientApp process imports `client_app`. The run
config (`[tool.flwr.app.config]`) is the FederateConfig; a SuperNode's node config says which data it holds
(`partition-id`/`num-partitions`: its shard of `data`; or `data=PATH`: a file of its own).

Only the adapter travels: an ArrayRecord of the LoRA A/B tensors (and the classification head), by name. The server
runs Flower's FedAvg or FedProx message strategy with llmkit's hooks: round 1 waits for --clients nodes, every round
the global adapter is scored on the server's validation split (metrics.jsonl), failed or missing replies are counted,
and under client-level DP (dp.ClientDP) the strategy Poisson-samples nodes and replaces the weighted mean by the
clipped, noised one.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from llmkit.data.sft import ExampleLoader
from llmkit.model import lora as lora_lib
from llmkit.train.dp import ClientDP
from llmkit.train.federated import (FAIL_ENV, FederateConfig, adapter_arrays, build, from_run_config, plot_rounds,
                                    quiet_flower, set_adapter, split_shards, summarise)
from llmkit.train.loop import TrainConfig, evaluate, train
from llmkit.utils.io import write_json

server_app = ServerApp()
client_app = ClientApp()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# server


def make_strategy(fc: FederateConfig, dp: ClientDP | None):
    """Flower's FedAvg/FedProx with llmkit's sampling (wait for all in round 1; Poisson under DP), failure counts,
    per-round rows and, under DP, the clipped and noised mean in place of the weighted one."""
    base = FedProx if fc.strategy == "fedprox" else FedAvg
    kw = {"proximal_mu": fc.mu} if fc.strategy == "fedprox" else {}

    class Strategy(base):
        current: ArrayRecord | None = None

        def configure_train(self, server_round, arrays, config, grid):
            if server_round == 1:  # start when every expected node is there; later rounds use those still there
                _say(f"server: waiting for {fc.clients} clients")
                deadline = time.time() + fc.connect_timeout
                while len(list(grid.get_node_ids())) < fc.clients and time.time() < deadline:
                    time.sleep(0.5)
                n = len(list(grid.get_node_ids()))
                if n < fc.clients:
                    _say(f"server: only {n} of {fc.clients} clients connected within {fc.connect_timeout:.0f} s; "
                         "going on with them")
            nodes = list(grid.get_node_ids())
            if not nodes:
                raise RuntimeError(f"round {server_round}: no client is connected")
            config["local-steps"] = fc.local_steps
            if dp is None:
                msgs = list(super().configure_train(server_round, arrays, config, grid))
            else:  # Poisson sampling at the accountant's q, not Flower's fixed-size sample of those still there
                config["server-round"], config["dp"] = server_round, True
                config.update({"proximal-mu": fc.mu} if fc.strategy == "fedprox" else {})
                msgs = list(self._construct_messages(RecordDict({self.arrayrecord_key: arrays,
                                                                 self.configrecord_key: config}),
                                                     dp.sample(nodes), "train"))
            self.current = arrays
            self.rows[server_round] = {"round": server_round, "clients_sampled": len(msgs),
                                       "bytes_sent": arrays.count_bytes() * len(msgs), "t0": time.time()}
            return msgs

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            row = self.rows[server_round]
            failed = row["clients_sampled"] - len(ok)
            why = sorted({m.error.reason.split(".")[0].split(" — ")[0][:80] for m in replies if m.has_error()} |
                         ({"no reply within --round-timeout"} if len(replies) < row["clients_sampled"] else set()))
            metrics = [m.content["metrics"] for m in ok]
            row.update(clients_ok=len(ok), clients_failed=failed,
                       bytes_received=sum(m.content["arrays"].count_bytes() for m in ok),
                       client_train_loss={str(int(r["client"])): round(float(r["train-loss"]), 6)
                                          for r in metrics if "train-loss" in r},
                       client_examples={str(int(r["client"])): int(r["num-examples"]) for r in metrics})
            if failed:
                row["failures"] = why
                _say(f"server: round {server_round}: {failed} client(s) failed ({'; '.join(why)}); "
                     f"aggregating the other {len(ok)}")
            if dp is not None:
                keys = list(self.current)
                new, info = dp.aggregate(adapter_arrays(self.current, keys),
                                         [adapter_arrays(m.content["arrays"], keys) for m in ok])
                _say(f"server: round {server_round}: {info['clipped']} of {len(ok)} update(s) clipped")
                return ArrayRecord(torch_state_dict={k: torch.from_numpy(a) for k, a in zip(keys, new)}), None
            if not ok:
                _say(f"server: round {server_round}: no client finished; the global adapter is unchanged")
                return None, None
            return super().aggregate_train(server_round, ok)

    strategy = Strategy(fraction_train=fc.fraction_fit, fraction_evaluate=0.0, min_train_nodes=1,
                        min_available_nodes=1, **kw)
    strategy.rows = {}  # round -> its metrics.jsonl row, filled in by configure_train, aggregate_train, evaluate_fn
    return strategy


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Train the global adapter for --rounds rounds; write OUT/metrics.jsonl, federate.png, run_config.json,
    result.json and the final adapter (a PEFT folder)."""
    quiet_flower()
    fc = from_run_config(context.run_config).check()
    out = Path(fc.out)
    if out.exists() and (not out.is_dir() or any(p.name != "flower-logs" for p in out.iterdir())):
        raise ValueError(f"{out} exists and is not empty; choose a new --out")
    dp = ClientDP(fc) if fc.dp_epsilon is not None else None
    p = build(fc)
    model, keys = p["lm"].model, p["keys"]
    labels = [e["labels"] for e in p["train"]] if p["task"] == "classify" else None
    shards = split_shards(len(p["train"]), fc.clients, fc.split, labels, fc.seed)
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.write_text("")
    write_json(out / "run_config.json", {"federate": {**fc.__dict__, "task": p["task"], "n_train": len(p["train"]),
                                                      "n_val": len(p["val"]),
                                                      "shard_sizes": [len(s) for s in shards]}})
    _say(f"server: federated {p['task']} fine-tuning: {fc.clients} clients ({fc.split}, shard sizes "
         f"{[len(s) for s in shards]}), {fc.rounds} rounds of {fc.local_steps} local steps, {fc.strategy}")
    if dp is not None:
        _say(f"server: client-level DP: clip {dp.clip:g}, noise multiplier {dp.noise:.3f} over {dp.m} clients a "
             f"round (target epsilon {fc.dp_epsilon:g} at delta {fc.dp_delta:g} after {fc.rounds} rounds)")

    def log_row(row):
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    strategy = make_strategy(fc, dp)
    val = ExampleLoader(p["val"], fc.batch_size, p["pad"], shuffle=False)
    id2label = json.dumps(model.config.id2label) if p["task"] == "classify" else ""

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter(model, keys, arrays)
        ev = evaluate(model, val, p["loss"], len(val), None, torch.device("cpu"))
        row = strategy.rows.get(server_round, {"round": server_round})
        row.update({k: round(float(v), 6) for k, v in ev.items()})
        if "t0" in row:
            row["seconds"] = round(time.time() - row.pop("t0"), 2)
        if dp is not None:  # only what the accountant covers: the noised adapter's score on the server's own data
            row = {"round": server_round, **{k: v for k, v in row.items() if k.startswith("val_")}}
            if server_round:
                row["epsilon"] = round(dp.epsilon(server_round), 4)
        log_row(row)
        acc = f", val_acc {ev['val_acc']:.4f}" if "val_acc" in ev else ""
        eps = f", epsilon {row['epsilon']:.3f}" if "epsilon" in row else ""
        _say(f"server: round {server_round}: val_loss {ev['val_loss']:.4f}{acc}{eps}")
        return MetricRecord({k: float(v) for k, v in ev.items()})

    t0 = time.time()
    initial = ArrayRecord(torch_state_dict={k: v.detach().float().cpu()
                                            for k, v in model.state_dict().items() if k in set(keys)})
    result = strategy.start(grid, initial, num_rounds=fc.rounds, timeout=fc.round_timeout,
                            train_config=ConfigRecord({"id2label": id2label}), evaluate_fn=evaluate_fn)
    set_adapter(model, keys, result.arrays if result.arrays is not None else initial)
    base = fc.model if fc.model == "default" else str(Path(fc.model).resolve())
    lora_lib.save_adapter(out, model, p["lora"], base=base, tokenizer=p["lm"].tokenizer, extra=p["extra"])
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    plot_rounds(rows, out / "federate.png")
    res = summarise(rows, time.time() - t0, dp)
    if dp is not None:
        cfg = json.loads((out / "run_config.json").read_text())
        write_json(out / "run_config.json", {**cfg, "dp": dp.summary(len(rows) - 1)})
    write_json(out / "result.json", res)
    _say("server: done: " + " ".join(f"{k} {v}" for k, v in res.items()))


# ---------------------------------------------------------------------------------------------------------------
# client

_BUILT: dict = {}  # one model per process and config: a simulation actor serves many virtual clients


def _client_data(fc: FederateConfig, node_config) -> tuple[dict, list, int]:
    """(the built model, this node's training examples, its client number) from the node config: `data=PATH` (a
    file of its own) or `partition-id`/`num-partitions` (its shard of the run config's data, split with --split)."""
    own = str(node_config.get("data", "") or "")
    part = int(node_config.get("partition-id", 0))
    parts = int(node_config.get("num-partitions", fc.clients))
    key = json.dumps([fc.__dict__, own])
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = build(FederateConfig(**{**fc.__dict__, "data": own or fc.data}))
    p = _BUILT[key]
    if own:
        return p, p["train"], part
    if not 0 <= part < parts:
        raise ValueError(f"node config partition-id {part} is not in 0..{parts - 1}")
    labels = [e["labels"] for e in p["train"]] if p["task"] == "classify" else None
    return p, [p["train"][i] for i in split_shards(len(p["train"]), parts, fc.split, labels, fc.seed)[part]], part


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Train the received adapter for local-steps steps on this node's examples; reply with the new adapter."""
    quiet_flower()
    fc = from_run_config(context.run_config)
    p, examples, client = _client_data(fc, context.node_config)
    model, keys = p["lm"].model, p["keys"]
    config = msg.content["config"]
    rnd = int(config.get("server-round", 0))
    name = f"client {client}"
    if os.environ.get(FAIL_ENV, "") == f"{client}:{rnd}":  # tests: this client stops answering mid-round
        _say(f"{name}: stalling in round {rnd} ({FAIL_ENV})")
        time.sleep(3600)
    id2label = str(config.get("id2label", ""))
    if id2label and json.loads(id2label) != {str(k): v for k, v in model.config.id2label.items()}:
        raise ValueError(f"{name}: this client's labels {model.config.id2label} differ from the server's")
    set_adapter(model, keys, msg.content["arrays"])
    trainable = [q for q in model.parameters() if q.requires_grad]
    mu = float(config.get("proximal-mu", 0.0))
    anchor = [q.detach().clone() for q in trainable]

    def loss_fn(m, batch):  # FedProx: stay near the global adapter
        out = p["loss"](m, batch)
        loss, extras = (out[0], out[1]) if isinstance(out, tuple) else (out, {})
        if mu > 0:
            loss = loss + mu / 2 * sum(((q - a) ** 2).sum() for q, a in zip(trainable, anchor))
        return loss, extras

    loader = ExampleLoader(examples, min(fc.batch_size, len(examples)), p["pad"], seed=fc.seed + 1000 * client + rnd)
    tc = TrainConfig(max_steps=int(config.get("local-steps", fc.local_steps)), lr=fc.lr, min_lr=fc.lr,
                     warmup_steps=0, weight_decay=0.0, eval_every=0, log_every=10 ** 9, seed=fc.seed + rnd,
                     device="cpu", dtype="float32", progress=False)
    t0 = time.time()
    res = train(model, loader, loss_fn, tc)
    private = bool(config.get("dp", False))  # client-level DP: the loss is this client's data; it stays here
    loss = "" if private else f", train_loss {res['train_loss']:.4f}"
    _say(f"{name}: round {rnd}: {tc.max_steps} local steps{loss} ({time.time() - t0:.1f} s)")
    sd = model.state_dict()
    arrays = ArrayRecord(torch_state_dict={k: sd[k].detach().float().cpu() for k in keys})
    metrics = MetricRecord({"num-examples": len(examples), "client": client,
                            **({} if private else {"train-loss": float(res["train_loss"])})})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
