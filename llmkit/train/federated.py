"""Federated LoRA fine-tuning on Flower (`flwr`): the data stays with its owners, only adapter weights travel.

The run is a Flower App (fl_app.py: `server_app`, `client_app`). The server holds the global adapter (LoRA A/B
matrices plus, for classification, the head), samples a fraction of the connected clients (SuperNodes) each round,
sends them the adapter, and aggregates what they send back (Flower's FedAvg, weighted by shard size, or FedProx, whose
clients add (mu / 2) ||w - w_global||^2 to their loss; McMahan et al. 2017, Li et al. 2020). Clients run llmkit's
training loop (train.py) for --local-steps steps on their own data. After every round the server evaluates the global
adapter on its validation split and appends a row to metrics.jsonl; the final global adapter is written as a normal
PEFT adapter folder.

This module holds what both sides share (the config, which travels as Flower's run config, the data splits, the model
both sides build) and the launchers: `federate` runs the app in Flower's Simulation Engine (a SuperLink started with
--simulation, `flwr run` with --clients virtual SuperNodes on Ray), `write_app` writes the app's pyproject.toml for
`flwr run` against a SuperLink with SuperNodes started apart (docs/federated.md), and `start_superlink`,
`start_supernode`, `flwr_run` start Flower's own commands as processes (the CLI and the tests use them). A client that
fails, disconnects or does not answer within --round-timeout is a failure of that round: the others are aggregated,
the failure is logged (in metrics.jsonl unless under DP), and later rounds go on without it.

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

import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from llmkit.infer.classify import pad_id_for
from llmkit.model import lora as lora_lib
from llmkit.train import dp as privacy
from llmkit.train.dp import ClientDP
from llmkit.train.losses import classify_loss, clm_loss
from llmkit.train.setup import FinetuneConfig, prepare
from llmkit.utils.plot import save_figure

APP = "llmkit.train.fl_app"  # the Flower App's module: server_app and client_app

STRATEGIES = ("fedavg", "fedprox")
FAIL_ENV = "LLMKIT_FEDERATE_FAIL"  # "CLIENT:ROUND": that client stalls mid-round (tests kill its SuperNode)


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
    connect_timeout: float = 300.0  # round 1 waits this long for --clients nodes
    client_cpus: float = 1.0  # simulation: CPUs of one virtual client (Ray actor)
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
            raise ValueError(f"--clients {self.clients}: at most 1000 clients")
        if not 0 < self.fraction_fit <= 1:
            raise ValueError(f"--fraction-fit must be in (0, 1], not {self.fraction_fit}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"--mu must be >= 0, not {self.mu}")
        if not (math.isfinite(self.client_cpus) and self.client_cpus > 0):
            raise ValueError(f"--client-cpus must be > 0, not {self.client_cpus}")
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            raise ValueError(f"--round-timeout must be > 0, not {self.round_timeout}")
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
# the config as Flower's run config (TOML scalars: None is "", lists are comma-separated)

_NONE_IS_EMPTY = {"task": str, "lora_layers": int, "dp_epsilon": float}


def to_run_config(fc: FederateConfig) -> dict:
    """The `[tool.flwr.app.config]` table of a FederateConfig (keys with dashes, as Flower writes them)."""
    rc = {}
    for k, v in asdict(fc).items():
        rc[k.replace("_", "-")] = "" if v is None else ",".join(v) if isinstance(v, list) else v
    return rc


def from_run_config(rc) -> FederateConfig:
    """The FederateConfig of a run config (missing keys take their defaults; `flwr run --run-config` overrides)."""
    kw = {}
    for f in fields(FederateConfig):
        key = f.name.replace("_", "-")
        if key not in rc:
            continue
        v = rc[key]
        if f.name in _NONE_IS_EMPTY:
            v = None if v in ("", None) else _NONE_IS_EMPTY[f.name](v)
        elif f.name == "lora_targets":
            v = [t.strip() for t in str(v).split(",") if t.strip()]
        elif isinstance(f.default, float):
            v = float(v)
        kw[f.name] = v
    return FederateConfig(**kw)


# ---------------------------------------------------------------------------------------------------------------
# the model both sides build, and the adapter as named arrays (the only thing that travels)


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


def adapter_arrays(record, keys) -> list[np.ndarray]:
    """The tensors of a Flower ArrayRecord, in `keys` order, as float32 arrays."""
    sd = record.to_torch_state_dict()
    return [sd[k].float().numpy() for k in keys]


def set_adapter(model, keys, record) -> None:
    """Load an ArrayRecord of adapter tensors into the model, checking names and shapes line up."""
    sd, got = model.state_dict(), record.to_torch_state_dict()
    if set(got) != set(keys):
        raise ValueError(f"received adapter tensors {sorted(set(got) ^ set(keys))[:3]}... that this model's adapter "
                         f"does not have (or lacks): base model, --lora-* and --task must match on every party")
    for k in keys:
        if tuple(got[k].shape) != tuple(sd[k].shape):
            raise ValueError(f"adapter tensor {k} has shape {tuple(got[k].shape)}, this model needs "
                             f"{tuple(sd[k].shape)}")
    model.load_state_dict({k: got[k].to(sd[k].dtype) for k in keys}, strict=False)


def quiet_flower():
    # Flower logs every message exchange at INFO; llmkit prints its own lines
    logging.getLogger("flwr").setLevel(logging.WARNING)


def summarise(rows: list[dict], wall: float, dp: ClientDP | None) -> dict:
    """The run's result (the last round's val scores, rounds, wall time; bytes and failures unless under DP)."""
    result = {k: v for k, v in rows[-1].items() if k.startswith("val_")}
    result.update(rounds=len(rows) - 1, wall_seconds=round(wall, 2))
    if dp is None:  # under client-level DP the rows hold no per-round client counts or bytes
        result.update(bytes_sent=sum(r.get("bytes_sent", 0) for r in rows),
                      bytes_received=sum(r.get("bytes_received", 0) for r in rows),
                      client_failures=sum(r.get("clients_failed", 0) for r in rows))
    else:
        result["epsilon"] = dp.summary(len(rows) - 1)["epsilon_spent"]
    return result


# ---------------------------------------------------------------------------------------------------------------
# Flower's own commands as processes: a SuperLink, SuperNodes, `flwr run`


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home=None) -> dict:
    """The environment for Flower's commands: this Python's scripts first on PATH (SuperLink and SuperNode start
    `flwr-serverapp`, `flwr-clientapp` and `flwr-simulation` by name), llmkit importable, FLWR_HOME (where Flower
    keeps installed apps and state; default ~/.flwr) if given."""
    env = dict(os.environ)
    if flwr_home:
        env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def _command(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def write_app(folder, fc: FederateConfig) -> Path:
    """FOLDER/pyproject.toml: the Flower App (llmkit's server_app and client_app by module path) with `fc` as its run
    config; `flwr run FOLDER CONNECTION` sends it to a SuperLink. Returns FOLDER."""
    import tomli_w  # comes with flwr

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"project": {"name": "llmkit-federate", "version": "1.0.0", "license": "Apache-2.0",
                       "description": "llmkit federated LoRA fine-tuning (written by llmkit federate --write-app)",
                       "dependencies": []},  # installed beforehand on every machine: Flower installs nothing
           "tool": {"flwr": {"app": {"publisher": "llmkit",
                                     "components": {"serverapp": f"{APP}:server_app", "clientapp": f"{APP}:client_app"},
                                     "config": to_run_config(fc)}}}}
    (folder / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return folder


def write_connection(flwr_home, name: str, address: str) -> Path:
    """FLWR_HOME/config.toml naming one SuperLink connection (plain HTTP, as on loopback or inside a private
    network; give real deployments TLS: docs/federated.md)."""
    import tomli_w

    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    cfg = {"superlink": {"default": name, name: {"address": address, "insecure": True}}}
    (home / "config.toml").write_text(tomli_w.dumps(cfg))
    return home


def _wait_port(address: str, proc, timeout: float, what: str) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} while starting") from None
            if time.time() >= deadline:
                raise RuntimeError(f"{what} did not listen on {address} within {timeout:.0f} s") from None
            time.sleep(0.2)


def start_superlink(log, simulation: bool = False, host: str = "127.0.0.1", port: int | None = None,
                    health: bool = True, flwr_home=None, timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    """`flower-superlink --insecure` on HOST:PORT (free ports by default) in its own process group, logging to `log`;
    returns once it listens: (process, {"address": its HTTP API, "health": its gRPC health server or None})."""
    address = f"{host}:{port or free_port()}"
    cmd = [_command("flower-superlink"), "--insecure", "--host", host, "--port", address.rpartition(":")[2],
           "--disable-runtime-dependency-installation"]  # else it runs `uv sync` on the app's dependencies
    addresses = {"address": address, "health": f"{host}:{free_port()}" if health else None}
    if health:
        cmd += ["--health-server-address", addresses["health"]]
    if simulation:
        cmd.append("--simulation")
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=flower_env(flwr_home),
                                start_new_session=True)
    _wait_port(address, proc, timeout, "flower-superlink")
    return proc, addresses


def start_supernode(superlink: str, log, node_config: str = "", host: str = "127.0.0.1", health: bool = True,
                    flwr_home=None, env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    """`flower-supernode --insecure` connected to SUPERLINK (HOST:PORT) with `node_config` (e.g. "partition-id=0
    num-partitions=2" or 'data="my.tsv"'), in its own process group: (process, {"address", "health"})."""
    addresses = {"address": f"{host}:{free_port()}", "health": f"{host}:{free_port()}" if health else None}
    cmd = [_command("flower-supernode"), "--insecure", "--superlink", superlink, "--host", host,
           "--port", addresses["address"].rpartition(":")[2]]
    if node_config:
        cmd += ["--node-config", node_config]
    if health:
        cmd += ["--health-server-address", addresses["health"]]
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**flower_env(flwr_home), **(env or {})},
                                start_new_session=True)
    return proc, addresses


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, grace: float = 10.0) -> None:
    """End a process started here with its process group (a SuperNode's ClientApp processes, a SuperLink's
    ServerApp or simulation): `sig`, then SIGKILL after `grace` seconds."""
    for s, wait in ((sig, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def flwr_run(app, flwr_home, connection: str, federation_config: str = "", run_config: str = "", log=None,
             echo=None, timeout: float | None = None) -> int:
    """`flwr run APP CONNECTION --stream`: submit the app and follow its logs until the run ends. Each output line
    goes to `log` (a file) and, when `echo(line)` says so, to stderr. Returns flwr's exit code."""
    cmd = [_command("flwr"), "run", str(app), connection, "--stream"]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    if run_config:
        cmd += ["--run-config", run_config]
    env = flower_env(flwr_home)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = None if timeout is None else time.time() + timeout
    with open(log or os.devnull, "a") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if echo and echo(line):
                print(line.rstrip(), file=sys.stderr, flush=True)
            if deadline and time.time() > deadline:
                stop(proc)
                raise TimeoutError(f"flwr run did not end within {timeout:.0f} s")
    return proc.wait()


def federate(fc: FederateConfig, verbose: bool = False) -> dict:
    """Run the Flower App in Flower's Simulation Engine: a SuperLink with --simulation, `flwr run` with --clients
    virtual SuperNodes (Ray actors of --client-cpus CPUs each; node i trains on shard i). Writes OUT/metrics.jsonl,
    OUT/federate.png, OUT/run_config.json, OUT/result.json, OUT/flower-logs/ and the final adapter; returns the
    result. Bad settings raise ValueError before anything is written."""
    fc.check()
    for module, need in (("flwr", "Flower"), ("ray", "Ray (Flower's Simulation Engine)")):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"llmkit federate needs {need}: pip install 'llmkit[private]' (flwr[simulation])")
    out = Path(fc.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty; choose a new --out")
    if fc.dp_epsilon is not None:
        ClientDP(fc)  # an unreachable epsilon fails here
    p = build(fc)
    labels = [e["labels"] for e in p["train"]] if p["task"] == "classify" else None
    split_shards(len(p["train"]), fc.clients, fc.split, labels, fc.seed)  # fails here on bad splits
    del p
    logs = out / "flower-logs"
    logs.mkdir(parents=True)
    cpus = fc.client_cpus
    with tempfile.TemporaryDirectory(prefix="llmkit-federate-") as tmp:
        app = write_app(Path(tmp) / "app", FederateConfig(**{**asdict(fc), "out": str(out.resolve()),
                                                              "data": str(Path(fc.data).resolve())}))
        home = Path(tmp) / "flwr-home"
        link, addr = start_superlink(logs / "superlink.log", simulation=True, health=False, flwr_home=home)
        try:
            write_connection(home, "llmkit-simulation", addr["address"])
            fed = (f"num-supernodes={fc.clients} client-resources-num-cpus={cpus:g} "
                   f"init-args-num-cpus={max(math.ceil(cpus), os.cpu_count() or 1)}")
            rc = flwr_run(app, home, "llmkit-simulation", fed, log=logs / "run.log",
                          echo=lambda line: verbose or ("server:" in line and "done:" not in line))
        finally:
            stop(link)
    result = out / "result.json"
    if not result.exists():
        raise RuntimeError(f"the Flower run ended (flwr run exit code {rc}) without a result: see {logs}")
    return json.loads(result.read_text())


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
