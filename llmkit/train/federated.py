"""Federated LoRA fine-tuning on Flower (`flwr`): the data stays with its owners, only adapter weights travel.

A Flower server holds the global adapter (LoRA A/B matrices plus, for classification, the head), samples a fraction
of the connected clients each round, sends them the adapter, and aggregates what they send back (FedAvg, weighted by
shard size, or FedProx, whose clients add (mu / 2) ||w - w_global||^2 to their loss; McMahan et al. 2017, Li et al.
2020). Clients run llmkit's training loop (train.py) for --local-steps steps on their own shard. After every round the
server evaluates the global adapter on the validation set and appends a row to metrics.jsonl; the final global adapter
is written as a normal PEFT adapter folder.

Transport: Flower's gRPC server/client (`flwr.server.start_server` / `flwr.client.start_client`), which runs the same
way on one machine (clients as local processes on loopback) and across machines. Flower's simulation engine needs
Ray (`flwr[simulation]` pins ray, several hundred MB), and its SuperLink/SuperNode deployment needs a Flower App
bundle launched with `flwr run`, so llmkit uses the direct gRPC entry points, which Flower 1.42 still ships (marked
deprecated since 1.13). A client that fails or disconnects mid-round is a failure of that round: the others are
aggregated (accept_failures), the failure is logged (in metrics.jsonl unless under DP), and later rounds go on
without it.

Client-level differential privacy (optional, --dp-epsilon; DP-FedAvg, McMahan et al. 2018; dp.ClientDP): each round
the server samples every connected client independently with probability q = m / --clients (Poisson sampling, the
mechanism the RDP accountant bounds; m is what --fraction-fit would pick of all --clients), clips each update (its
adapter minus the global one, L2 over all tensors) to --dp-clip, divides the sum by the fixed m (a failed client adds
a zero update) and adds Gaussian noise of standard deviation noise * clip / m. A client that drops is never sampled
again and no one else's q grows, so the account holds as clients leave. The noise multiplier spends --dp-epsilon
over --rounds rounds. It protects whole clients, not single examples, and needs many clients to learn anything.
Under DP, metrics.jsonl and the plot hold only the round, the noised adapter's validation scores (the server's own
data) and the epsilon spent: no client's loss, update norm, clip count, example count or participation.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmkit.data.sft import ExampleLoader
from llmkit.infer.classify import pad_id_for
from llmkit.model import lora as lora_lib
from llmkit.train import dp as privacy
from llmkit.train.dp import ClientDP
from llmkit.train.loop import TrainConfig, evaluate, train
from llmkit.train.losses import classify_loss, clm_loss
from llmkit.train.setup import FinetuneConfig, prepare
from llmkit.utils.io import write_json
from llmkit.utils.plot import save_figure

STRATEGIES = ("fedavg", "fedprox")
FAIL_ENV = "LLMKIT_FEDERATE_FAIL"  # "SHARD:ROUND": that client exits mid-round (tests a dying client)


@dataclass
class FederateConfig:
    model: str
    data: str
    out: str
    clients: int = 4
    rounds: int = 5
    split: str = "iid"  # iid | dirichlet:ALPHA
    strategy: str = "fedavg"
    mu: float = 0.01  # FedProx proximal weight
    fraction_fit: float = 1.0
    local_steps: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    max_length: int = 128
    val_fraction: float = 0.1
    task: str | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    lora_layers: int | None = None
    seed: int = 0
    round_timeout: float = 1800.0
    connect_timeout: float = 300.0
    dp_epsilon: float | None = None  # client-level DP on the aggregated updates (DP-FedAvg)
    dp_delta: float = 1e-5
    dp_clip: float = 1.0  # L2 bound on one client's adapter update

    def check(self) -> "FederateConfig":
        """Raise ValueError on out-of-range settings (before anything loads or is written)."""
        ints = {"--clients": (self.clients, 1), "--rounds": (self.rounds, 1), "--local-steps": (self.local_steps, 1),
                "--batch-size": (self.batch_size, 1), "--max-length": (self.max_length, 2)}
        for flag, (v, lo) in ints.items():
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{flag} must be an integer >= {lo}, not {v!r}")
        if self.clients > 1000:
            raise ValueError(f"--clients {self.clients}: at most 1000 local clients")
        if not 0 < self.fraction_fit <= 1:
            raise ValueError(f"--fraction-fit must be in (0, 1], not {self.fraction_fit}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"--mu must be >= 0, not {self.mu}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be > 0, not {self.lr}")
        parse_split(self.split)
        if self.dp_epsilon is not None:
            privacy.DPConfig(self.dp_epsilon, self.dp_delta, self.dp_clip, "rdp").check()
        return self

    def sampled_per_round(self) -> int:
        """Clients Flower's FedAvg samples per round when all are connected (int(n * fraction), at least 1)."""
        return max(1, int(self.clients * self.fraction_fit))


def parse_split(split: str) -> tuple[str, float | None]:
    """('iid', None) or ('dirichlet', alpha) from --split."""
    if split == "iid":
        return "iid", None
    if split.startswith("dirichlet:"):
        try:
            alpha = float(split.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if math.isfinite(alpha) and alpha > 0:
            return "dirichlet", alpha
    raise ValueError(f"--split must be iid or dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.5), not {split!r}")


def split_shards(n: int, clients: int, split: str, labels: list[int] | None = None, seed: int = 0) -> list[list[int]]:
    """Example indices of each client: iid (a shuffled even split) or Dirichlet(alpha) label proportions per client.

    Dirichlet: for each class, the share of its examples each client gets is drawn from Dir(alpha, ..., alpha)
    (Hsu et al. 2019); small alpha gives clients few classes. Draws are repeated until every client has an example.
    """
    kind, alpha = parse_split(split)
    if clients > n:
        raise ValueError(f"--clients {clients} is more than the {n} training examples: each client needs at least one")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [sorted(s.tolist()) for s in np.array_split(rng.permutation(n), clients)]
    if labels is None:
        raise ValueError("--split dirichlet needs class labels: use it with classification data (or --split iid)")
    labels = np.asarray(labels)
    for _ in range(1000):
        shards: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k] += part.tolist()
        if min(len(s) for s in shards) > 0:
            return [sorted(s) for s in shards]
    raise ValueError(f"--split {split}: could not give each of {clients} clients an example in 1000 draws; "
                     "use fewer clients or a larger alpha")


# ---------------------------------------------------------------------------------------------------------------
# the model both sides build, and the adapter as a list of arrays (the only thing that travels)


def _finetune_config(fc: FederateConfig) -> FinetuneConfig:
    return FinetuneConfig(data=fc.data, out=fc.out, model=fc.model, task=fc.task, method="lora",
                          val_fraction=fc.val_fraction, max_length=fc.max_length, batch_size=fc.batch_size,
                          lora_r=fc.lora_r, lora_alpha=fc.lora_alpha, lora_dropout=0.0,
                          lora_targets=list(fc.lora_targets), lora_layers=fc.lora_layers, seed=fc.seed)


def build(fc: FederateConfig) -> dict:
    """setup.prepare's model (LoRA + head) and examples; the same on the server and on every client."""
    torch.manual_seed(fc.seed)  # the same adapter initialisation everywhere (the server's is sent out anyway)
    p = prepare(_finetune_config(fc))
    p["loss"] = classify_loss if p["task"] == "classify" else clm_loss
    p["keys"] = list(lora_lib.lora_state_dict(p["lm"].model, p["extra"]))
    p["pad"] = pad_id_for(p["lm"].tokenizer, p["lm"].model.config)
    return p


def get_weights(model, keys) -> list[np.ndarray]:
    """The adapter tensors (in `keys` order) as float32 arrays."""
    sd = model.state_dict()
    return [sd[k].detach().float().cpu().numpy() for k in keys]


def set_weights(model, keys, arrays) -> None:
    """Load adapter arrays (in `keys` order) into the model, checking names and shapes line up."""
    sd = model.state_dict()
    if len(arrays) != len(keys):
        raise ValueError(f"received {len(arrays)} adapter tensors, this model has {len(keys)}")
    new = {}
    for k, a in zip(keys, arrays):
        if tuple(a.shape) != tuple(sd[k].shape):
            raise ValueError(f"adapter tensor {k} has shape {tuple(a.shape)}, this model needs {tuple(sd[k].shape)}")
        new[k] = torch.from_numpy(np.ascontiguousarray(a)).to(sd[k].dtype)
    model.load_state_dict(new, strict=False)


def _quiet_flower():
    # Flower logs every message exchange at INFO and a deprecation banner at WARNING; llmkit prints its own lines
    logging.getLogger("flwr").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------------------
# client


def make_client(fc: FederateConfig, shard: int | None, p: dict | None = None):
    """A Flower NumPyClient that trains the adapter on this client's examples with train.py's loop."""
    import flwr as fl

    p = p or build(fc)
    model, keys = p["lm"].model, p["keys"]
    examples = p["train"]
    if shard is not None:
        labels = [e["labels"] for e in examples] if p["task"] == "classify" else None
        examples = [examples[i] for i in split_shards(len(examples), fc.clients, fc.split, labels, fc.seed)[shard]]
    loader = ExampleLoader(examples, min(fc.batch_size, len(examples)), p["pad"], seed=fc.seed + (shard or 0))
    trainable = [q for q in model.parameters() if q.requires_grad]
    fail = os.environ.get(FAIL_ENV, "")
    client_id = str(shard) if shard is not None else f"{socket.gethostname()}-{os.getpid()}"
    name = f"client {client_id}"

    class LoRAClient(fl.client.NumPyClient):
        def get_parameters(self, config):
            return get_weights(model, keys)

        def fit(self, parameters, config):
            rnd = int(config.get("server_round", 0))
            if fail == f"{shard}:{rnd}":
                print(f"{name}: exiting in round {rnd} ({FAIL_ENV})", file=sys.stderr, flush=True)
                os._exit(3)
            if "id2label" in config and p["task"] == "classify" and \
                    json.loads(str(config["id2label"])) != model.config.id2label:
                raise ValueError(f"{name}: this client's labels {model.config.id2label} differ from the server's")
            set_weights(model, keys, parameters)
            mu = float(config.get("proximal_mu", 0.0))
            anchor = [q.detach().clone() for q in trainable]

            def loss_fn(m, batch):  # FedProx: stay near the global adapter
                loss, extras = _unpack(p["loss"](m, batch))
                if mu > 0:
                    loss = loss + mu / 2 * sum(((q - a) ** 2).sum() for q, a in zip(trainable, anchor))
                return loss, extras

            tc = TrainConfig(max_steps=int(config.get("local_steps", fc.local_steps)), lr=fc.lr, min_lr=fc.lr,
                             warmup_steps=0, weight_decay=0.0, eval_every=0, log_every=10 ** 9, seed=fc.seed + rnd,
                             device="cpu", dtype="float32", progress=False)
            t0 = time.time()
            res = train(model, loader, loss_fn, tc)
            private = bool(config.get("dp"))  # client-level DP: the loss is this client's data; it stays here
            loss = "" if private else f", train_loss {res['train_loss']:.4f}"
            print(f"{name}: round {rnd}: {tc.max_steps} local steps{loss} ({time.time() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
            return get_weights(model, keys), len(examples), \
                {"client": client_id, **({} if private else {"train_loss": float(res["train_loss"])})}

        def evaluate(self, parameters, config):
            return 0.0, len(examples), {}

    return LoRAClient()


def _unpack(out):
    return (out[0], out[1]) if isinstance(out, tuple) else (out, {})


def run_client(fc: FederateConfig, server: str, shard: int | None = None) -> None:
    """Connect to a Flower server and train when asked, until the server ends the run."""
    import flwr as fl

    _quiet_flower()
    client = make_client(fc, shard)
    print(f"client {'' if shard is None else shard}: connecting to {server}", file=sys.stderr, flush=True)
    wait_for_server(server, fc.connect_timeout)
    try:
        fl.client.start_client(server_address=server, client=client.to_client(), max_wait_time=fc.connect_timeout)
    except Exception as e:  # gRPC's errors are pages long: one line says what happened
        detail = e.details() if callable(getattr(e, "details", None)) else None  # grpc.RpcError
        raise ConnectionError(f"lost the connection to the server at {server}: {detail or type(e).__name__}") from e


def wait_for_server(address: str, timeout: float) -> None:
    """Return once HOST:PORT accepts TCP connections (a server may still be loading its model), or raise.

    Flower's bidirectional gRPC client does not retry a refused first connection, so clients started before their
    server (or on other machines, in any order) wait here."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--server must be HOST:PORT, not {address!r}")
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except OSError as e:
            if time.time() >= deadline:
                raise ConnectionError(f"no Flower server answered at {address} within {timeout:.0f} s "
                                      f"(--connect-timeout): {e.strerror or e}") from None
            time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------------------
# server


def _strategy(fc: FederateConfig, p: dict, log_row, dp: ClientDP | None = None):
    """FedAvg or FedProx that evaluates the global adapter after each round and logs clients, failures and bytes."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg, FedProx

    model, keys = p["lm"].model, p["keys"]
    val = ExampleLoader(p["val"], fc.batch_size, p["pad"], shuffle=False)
    base = FedProx if fc.strategy == "fedprox" else FedAvg
    id2label = json.dumps(model.config.id2label) if p["task"] == "classify" else None

    rows: dict = {}

    class Strategy(base):
        final: list | None = None
        current: list | None = None
        pending: list | None = None

        def configure_fit(self, server_round, parameters, client_manager):
            if server_round == 1:  # start when every expected client is there; later rounds use those still there
                print(f"server: waiting for {fc.clients} clients", file=sys.stderr, flush=True)
                if not client_manager.wait_for(fc.clients, timeout=fc.connect_timeout):
                    print(f"server: only {client_manager.num_available()} of {fc.clients} clients connected "
                          f"within {fc.connect_timeout:.0f} s; going on with them", file=sys.stderr, flush=True)
            if client_manager.num_available() == 0:
                raise ValueError(f"round {server_round}: no client is connected (local runs: see OUT/client-logs)")
            if dp is None:
                ins = super().configure_fit(server_round, parameters, client_manager)
            else:  # Poisson sampling at the accountant's q, not Flower's fixed-size sample of those still there
                if self.pending is not None:  # the last round sampled no one: its noised adapter is the global one
                    parameters = ndarrays_to_parameters(self.pending)
                config = {"proximal_mu": fc.mu} if fc.strategy == "fedprox" else {}
                ins = [(c, FitIns(parameters, dict(config))) for c in dp.sample(list(client_manager.all().values()))]
                self.current, self.pending = parameters_to_ndarrays(parameters), None
                if not ins:  # Flower skips a round with no client: release the noised adapter all the same
                    self.pending = dp.aggregate(self.current, [])[0]
            for _, fit_ins in ins:
                fit_ins.config.update({"server_round": server_round, "local_steps": fc.local_steps,
                                       **({"id2label": id2label} if id2label else {}), **({"dp": 1} if dp else {})})
            size = sum(len(t) for t in parameters.tensors)
            rows[server_round] = {"round": server_round, "clients_sampled": len(ins),
                                  "bytes_sent": size * len(ins), "t0": time.time()}
            return ins

        def aggregate_fit(self, server_round, results, failures):
            row = rows[server_round]
            row["clients_ok"], row["clients_failed"] = len(results), len(failures)
            row["bytes_received"] = sum(len(t) for _, r in results for t in r.parameters.tensors)
            row["client_train_loss"] = {str(r.metrics.get("client", i)): round(float(r.metrics["train_loss"]), 6)
                                        for i, (_, r) in enumerate(results) if "train_loss" in r.metrics}
            row["client_examples"] = {str(r.metrics.get("client", i)): r.num_examples
                                      for i, (_, r) in enumerate(results)}
            if failures:
                why = sorted({type(f).__name__ if isinstance(f, BaseException) else "error result" for f in failures})
                row["failures"] = why
                print(f"server: round {server_round}: {len(failures)} client(s) failed ({', '.join(why)}); "
                      f"aggregating the other {len(results)}", file=sys.stderr, flush=True)
            if not results:
                print(f"server: round {server_round}: no client finished; the global adapter is unchanged",
                      file=sys.stderr, flush=True)
            if dp is None:
                return super().aggregate_fit(server_round, results, failures)
            new, info = dp.aggregate(self.current, [parameters_to_ndarrays(r.parameters) for _, r in results])
            print(f"server: round {server_round}: {info['clipped']} of {len(results)} update(s) clipped",
                  file=sys.stderr, flush=True)  # the curator's console; metrics.jsonl gets none of it
            return ndarrays_to_parameters(new), {}

    def evaluate_fn(server_round, arrays, config):
        if getattr(strategy, "pending", None) is not None:  # a DP round that sampled no client
            arrays = strategy.pending
        set_weights(model, keys, arrays)
        ev = evaluate(model, val, p["loss"], len(val), None, torch.device("cpu"))
        row = rows.get(server_round, {"round": server_round})
        row.update({k: round(float(v), 6) for k, v in ev.items()})
        if "t0" in row:
            row["seconds"] = round(time.time() - row.pop("t0"), 2)
        if dp is not None:  # only what the accountant covers: the noised adapter's score on the server's own data
            row = {"round": server_round, **{k: v for k, v in row.items() if k.startswith("val_")}}
            if server_round:
                row["epsilon"] = round(dp.epsilon(server_round), 4)
        strategy.final = arrays
        log_row(row)
        acc = f", val_acc {ev['val_acc']:.4f}" if "val_acc" in ev else ""
        eps = f", epsilon {row['epsilon']:.3f}" if "epsilon" in row else ""
        print(f"server: round {server_round}: val_loss {ev['val_loss']:.4f}{acc}{eps}", file=sys.stderr, flush=True)
        return float(ev["val_loss"]), {}

    kw = dict(fraction_fit=fc.fraction_fit, fraction_evaluate=0.0, min_fit_clients=1, min_evaluate_clients=1,
              min_available_clients=1, accept_failures=True, evaluate_fn=evaluate_fn,
              initial_parameters=ndarrays_to_parameters(get_weights(model, keys)))
    if fc.strategy == "fedprox":
        kw["proximal_mu"] = fc.mu
    strategy = Strategy(**kw)
    return strategy


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_command(fc: FederateConfig, server: str, shard: int) -> list[str]:
    """A local client process: client_main on shard `shard` (clients on other machines run `llmkit federate --role
    client`, which calls run_client the same way)."""
    code = "import sys; from llmkit.train.federated import client_main; raise SystemExit(client_main(sys.argv[1:]))"
    return [sys.executable, "-c", code, json.dumps(asdict(fc)), server, str(shard)]


def client_main(argv: list[str]) -> int:
    """The entry point of a local client process: argv is [the FederateConfig as JSON, server HOST:PORT, shard].
    Errors end it with one line, as the CLI's would."""
    config, server, shard = argv
    fc = FederateConfig(**json.loads(config))
    try:
        fc.check()
        run_client(fc, server, int(shard))
    except (ValueError, OSError) as e:
        msg = str(e) if isinstance(e, ValueError) or not e.strerror else f"{e.strerror}: {e.filename}"
        print(f"llmkit federate: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def federate(fc: FederateConfig, role: str = "local", listen: str | None = None) -> dict:
    """Run the server (role "server": clients connect to `listen`; "local": also start --clients local client
    processes on loopback). Writes OUT/metrics.jsonl, OUT/federate.png, OUT/run_config.json and the final adapter."""
    import flwr as fl

    fc.check()
    out = Path(fc.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty; choose a new --out")
    dp = ClientDP(fc) if fc.dp_epsilon is not None else None  # an unreachable epsilon fails here
    p = build(fc)
    labels = [e["labels"] for e in p["train"]] if p["task"] == "classify" else None
    shards = split_shards(len(p["train"]), fc.clients, fc.split, labels, fc.seed)  # fails here on bad splits
    _quiet_flower()
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.write_text("")
    write_json(out / "run_config.json", {"federate": {**asdict(fc), "role": role, "task": p["task"],
                                                      "n_train": len(p["train"]), "n_val": len(p["val"]),
                                                      "shard_sizes": [len(s) for s in shards]}})
    print(f"federated {p['task']} fine-tuning: {fc.clients} clients ({fc.split}, shard sizes "
          f"{[len(s) for s in shards]}), {fc.rounds} rounds of {fc.local_steps} local steps, {fc.strategy}",
          file=sys.stderr, flush=True)

    def log_row(row):
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    strategy = _strategy(fc, p, log_row, dp)
    if dp is not None:
        print(f"client-level DP: clip {dp.clip:g}, noise multiplier {dp.noise:.3f} over {dp.m} clients a round "
              f"(target epsilon {fc.dp_epsilon:g} at delta {fc.dp_delta:g} after {fc.rounds} rounds)",
              file=sys.stderr, flush=True)
    address = listen or f"127.0.0.1:{free_port()}"
    procs = []
    if role == "local":
        logs = out / "client-logs"
        logs.mkdir()
        for k in range(fc.clients):
            with open(logs / f"client-{k}.log", "w") as log:
                procs.append(subprocess.Popen(_client_command(fc, address, k), stdout=log, stderr=subprocess.STDOUT))
    t0 = time.time()
    try:
        fl.server.start_server(server_address=address, strategy=strategy,
                               config=fl.server.ServerConfig(num_rounds=fc.rounds, round_timeout=fc.round_timeout))
    finally:
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    wall = time.time() - t0
    set_weights(p["lm"].model, p["keys"], strategy.final)
    base = fc.model if fc.model == "default" else str(Path(fc.model).resolve())
    lora_lib.save_adapter(out, p["lm"].model, p["lora"], base=base, tokenizer=p["lm"].tokenizer, extra=p["extra"])
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    plot_rounds(rows, out / "federate.png")
    last = rows[-1]
    result = {k: v for k, v in last.items() if k.startswith("val_")}
    result.update(rounds=len(rows) - 1, wall_seconds=round(wall, 2))
    if dp is None:  # under client-level DP the rows hold no per-round client counts or bytes
        result.update(bytes_sent=sum(r.get("bytes_sent", 0) for r in rows),
                      bytes_received=sum(r.get("bytes_received", 0) for r in rows),
                      client_failures=sum(r.get("clients_failed", 0) for r in rows))
    if dp is not None:
        summary = dp.summary(len(rows) - 1)
        result["epsilon"] = summary["epsilon_spent"]
        cfg = json.loads((out / "run_config.json").read_text())
        write_json(out / "run_config.json", {**cfg, "dp": summary})
    return result


def plot_rounds(rows: list[dict], path) -> None:
    """federate.png: global validation loss (and accuracy) and each client's training loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    r = [row["round"] for row in rows]
    a.plot(r, [row["val_loss"] for row in rows], "o-", label="global val loss")
    if "val_acc" in rows[0]:
        a2 = a.twinx()
        a2.plot(r, [row["val_acc"] for row in rows], "s--", color="tab:green", label="global val accuracy")
        a2.set_ylabel("accuracy")
        a2.legend(loc="lower right")
    a.set_xlabel("round")
    a.set_ylabel("loss")
    a.legend(loc="upper left")
    a.set_title("server-side evaluation of the global adapter")
    clients = sorted({c for row in rows for c in row.get("client_train_loss", {})},
                     key=lambda c: (0, int(c), c) if c.isdigit() else (1, 0, c))
    for c in clients:
        pts = [(row["round"], row["client_train_loss"][c]) for row in rows if c in row.get("client_train_loss", {})]
        b.plot(*zip(*pts), "o-", label=f"client {c}")
    for row in rows:
        if row.get("clients_failed"):
            b.axvline(row["round"], color="red", ls=":", lw=1)
    b.set_xlabel("round")
    b.set_ylabel("local train loss (last step)")
    b.set_title("clients (red line: a client failed)" if clients or "epsilon" not in rows[-1] else
                "per-client losses are not released under client-level DP")
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if clients:
        b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
