"""The training loop: one plain function used by pretraining, fine-tuning and distillation.

train(model, train_data, loss_fn, cfg, ...) runs AdamW with warmup + cosine decay, gradient accumulation and clipping,
autocast where the device has fast bf16, optional torch.compile, DDP/FSDP2 under torchrun, periodic evaluation,
atomic resumable checkpoints and a metrics.jsonl log. Everything model- or task-specific comes in as arguments:
loss_fn(model, batch) -> loss or (loss, {"name": value}), save_fn(dir, model) writes a model folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps; also the length of the cosine schedule
    max_time: float | None = None  # seconds: stop early (the schedule still assumes max_steps)
    lr: float = 3e-4
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    eval_every: int = 250  # 0 disables periodic evaluation (the end is still evaluated)
    eval_steps: int = 20
    early_stopping: int = 0  # stop after this many evaluations without a better val_loss (0: never)
    log_every: int = 10
    save_every: int = 0  # 0: save only at the end
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"  # auto: the local CUDA device when present, else CPU
    dtype: str = "auto"  # auto | float32 | bfloat16
    compile: bool = False
    fsdp: bool = False
    out: str | None = None  # None: nothing written (tests, notebooks)
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False


# ---------------------------------------------------------------------------------------------------------------
# devices and processes


def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --dtype: bf16 only where the hardware runs it natively; None means plain float32."""
    if dtype in ("float32", "fp32"):
        return None
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype != "auto":
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, not {dtype!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPUs without AMX/avx512_bf16 emulate bf16 slowly: stay in float32


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to min_lr at max_steps (step counts from 0)."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices and embeddings (>= 2-D), never on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    # the fused kernel (one op for all parameters) cuts Python overhead; DTensor (FSDP) parameters need foreach
    fused = not cfg.fsdp and device.type in ("cpu", "cuda")
    try:
        return torch.optim.AdamW(groups, fused=fused, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def scored_count(batch: dict) -> torch.Tensor:
    """How many targets a batch's loss averages over: labels that are not IGNORE (-100), else every input token."""
    labels = batch.get("labels")
    if labels is None:
        return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
    return (labels != -100).sum()


def real_tokens(batch: dict) -> int:
    """Tokens a batch holds, padding not counted (the attention mask's ones where the batch has one)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _unpack(out):
    return (out[0], out[1]) if isinstance(out, tuple) else (out, {})


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: out/checkpoints/step-000100/{model folder, trainer_state.pt}, written to a temp dir then renamed


def find_checkpoint(out) -> Path | None:
    """The newest complete checkpoint folder under out/checkpoints, or None."""
    ck = Path(out) / "checkpoints"
    done = sorted(p for p in ck.glob("step-*") if (p / "trainer_state.pt").is_file()) if ck.is_dir() else []
    return done[-1] if done else None


def load_trainer_state(path) -> dict:
    """A checkpoint's trainer_state.pt, read with weights_only=True: tensors, numbers, strings and containers only
    (what the model, optimizer, data and RNG states hold), so a crafted file cannot run code when resumed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((l.strip() for l in first if "Unsupported global" in l), first[0] if first else "")
        raise ValueError(f"--resume: {path} holds more than tensors and plain values, refused (weights_only=True"
                         f"{': ' + why if why else ''})") from None
    if not isinstance(state, dict):
        raise ValueError(f"--resume: {path} is not a trainer state (a {type(state).__name__}, not a dict)")
    return state


def _full_state(model, optimizer, fsdp: bool):
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _write_checkpoint(out: Path, step: int, state: dict, plain_model, save_fn, keep_last: int, best_step):
    ck = out / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    final, tmp = ck / f"step-{step:06d}", ck / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed while saving
    if save_fn is not None:
        save_fn(tmp, plain_model)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():  # the same step saved by an earlier attempt: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)  # a checkpoint exists completely or not at all
    done = sorted(p for p in ck.glob("step-*") if (p / "trainer_state.pt").is_file())
    keep = set(done[-max(1, keep_last):]) | ({ck / f"step-{best_step:06d}"} if best_step is not None else set())
    for p in done:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def _plot(out: Path):
    """loss.png from metrics.jsonl: train and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in rows if "train_loss" in r]
    ax.plot([r["step"] for r in tr], [r["train_loss"] for r in tr], label="train")
    va = [r for r in rows if "val_loss" in r]
    if va:
        ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out / "loss.png")


# ---------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, data, loss_fn, steps: int, amp: torch.dtype | None, device: torch.device) -> dict:
    """Loss (and loss_fn's extra metrics) over the first `steps` batches of data, each batch's mean weighted by its
    scored tokens: the mean over all scored tokens, as one big batch would give it."""
    was = model.training
    model.eval()
    sums, n, batches = {}, 0.0, 0
    for i, batch in enumerate(data):
        if i >= steps:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, extras = _unpack(loss_fn(model, batch))
        batches += 1
        count = float(scored_count(batch))
        if not count:  # nothing scored: its mean is NaN and weighs nothing
            continue
        for k, v in {"loss": loss, **extras}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * count
        n += count
    model.train(was)
    if not batches:
        raise ValueError("the validation data holds no complete batch: use more validation data or a smaller batch")
    if not n:
        raise ValueError("the validation data scores no token (every label is ignored): check the data")
    out = {f"val_{k}": v / n for k, v in sums.items()}
    out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the loop


def train(model: torch.nn.Module, train_data, loss_fn: Callable, cfg: TrainConfig, val_data=None,
          save_fn: Callable | None = None, sample_fn: Callable | None = None, run_config: dict | None = None,
          wrap: Callable | None = None, val_loss_fn: Callable | None = None) -> dict:
    """Train model in place; returns the last logged metrics (with val_* after the final evaluation).

    train_data yields batches (dicts of tensors) forever and has state_dict()/load_state_dict() for resuming;
    val_data is re-iterable from the start. save_fn(dir, model) writes a model folder; sample_fn(model) -> str.
    wrap(model, optimizer, train_data) -> (model, optimizer, train_data, metrics_fn) replaces the three before the
    first step (DP-SGD: privacy.DPTraining); metrics_fn() -> dict joins every evaluation row.
    val_loss_fn (default loss_fn) scores val_data: a run whose training loss differs from the usual one (DP-SGD's
    per-example means) still reports the validation loss every other run reports.
    Every rank saves and restores its own random state (dropout masks differ between ranks and resume exactly).
    """
    rank, world, device = setup_distributed(cfg.device)
    is_main = rank == 0
    out = Path(cfg.out) if cfg.out else None
    amp = autocast_dtype(cfg.dtype, device)
    model.to(device)
    raw = model  # the plain module: state_dict, evaluation, saving

    # ---- resume or start fresh (never overwrite an earlier run's checkpoints)
    ckpt = find_checkpoint(out) if out else None
    state = None
    if cfg.resume:
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out}/checkpoints; start without --resume")
        state = load_trainer_state(ckpt / "trainer_state.pt")
        saved_cfg, now = state.get("model_config"), _model_config(raw)
        if saved_cfg is not None and now is not None and saved_cfg != now:
            diff = sorted(k for k in set(saved_cfg) | set(now) if saved_cfg.get(k) != now.get(k))
            raise ValueError(f"--resume: {ckpt} was trained with a different model config ({', '.join(diff)}); "
                             f"use the same flags or a new --out")
        changed = _shape_changes(state, world, _data_shape(train_data), cfg.grad_accum)
        if changed:
            raise ValueError(f"--resume: {ckpt} used a different {', '.join(changed)}; the resumed run would not "
                             f"continue the same batches: use the same settings or a new --out")
        raw.load_state_dict(state["model"])
    elif ckpt is not None:
        raise ValueError(f"{out} already holds checkpoints ({ckpt.name}): pass --resume to continue, or a new --out")

    # ---- wrap for several processes; compile
    if world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in getattr(raw, "layers", []):
                fully_shard(block)
            fully_shard(raw)
            model = raw
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    elif cfg.fsdp:
        raise ValueError("--fsdp needs several processes: launch with torchrun --nproc-per-node N")
    fwd = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(raw, cfg, device)

    step, tokens, best, best_step, elapsed = 0, 0, math.inf, None, 0.0
    torch.manual_seed(cfg.seed + rank)  # dropout; model init was seeded by the caller
    wrap_metrics = None
    if wrap is not None:
        fwd, optimizer, train_data, wrap_metrics = wrap(fwd, optimizer, train_data)
    if state is not None:
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(raw, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        step, tokens, best, best_step = state["step"], state["tokens"], state["best_val"], state["best_step"]
        elapsed = state.get("elapsed", 0.0)
        train_data.load_state_dict(state["data"])
        rng = state["rng"][rank] if isinstance(state["rng"], list) else state["rng"]  # a list: one per rank
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)

    # ---- output folder: run config, metrics (a resumed run drops lines logged after its checkpoint)
    metrics_path = out / "metrics.jsonl" if out else None
    writer = None
    if out and is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"train": dataclasses.asdict(cfg), "model": _model_config(raw), "world_size": world,
                    **(run_config or {})}
        (out / "run_config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
        kept = []
        if state is not None and metrics_path.is_file():
            kept = [l for l in metrics_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        metrics_path.write_text("".join(l + "\n" for l in kept))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print("warning: tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)

    def log(row: dict):
        if not is_main:
            return
        if metrics_path:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if writer:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(k, v, row["step"])

    def plain_model(full_model):
        if not cfg.fsdp:
            return raw
        plain = type(raw)(raw.config)  # a plain CPU copy to hand to save_fn
        plain.load_state_dict(full_model)
        return plain

    pending = torch.zeros((), dtype=torch.float64, device=device)  # tokens of other ranks not yet added (world > 1)

    def count_tokens() -> int:
        """tokens, with what the processes counted since the last call (one device sync, on logging steps)."""
        nonlocal tokens
        if world > 1:
            tokens += int(pending.item())
            pending.zero_()
        return tokens

    def save(step_now: int, last_val: float | None, last_save: bool) -> bool:
        full_model, full_optim = _full_state(raw, optimizer, cfg.fsdp)
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        every_rng = [rng]
        if world > 1:  # every rank's generators: each draws its own dropout masks, and must go on drawing them
            every_rng = [None] * world
            dist.all_gather_object(every_rng, rng)
        n_tokens = count_tokens()
        if not is_main:
            return last_save
        plain = plain_model(full_model)
        st = {"model": full_model, "optimizer": full_optim, "step": step_now, "tokens": n_tokens, "best_val": best,
              "best_step": best_step, "val_loss": last_val, "data": train_data.state_dict(), "elapsed": elapsed,
              "rng": every_rng,
              "model_config": _model_config(raw), "world_size": world, "data_shape": _data_shape(train_data),
              "train_config": dataclasses.asdict(cfg)}
        _write_checkpoint(out, step_now, st, plain, save_fn, cfg.keep_last, best_step)
        if last_save and save_fn is not None:  # the final model at the top of out, from the same gathered state
            save_fn(out, plain)
        return last_save

    # ---- loop
    from tqdm import tqdm

    final_saved = False
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and is_main), unit="step",
               dynamic_ncols=True)
    model.train()
    last = {"step": step, "tokens": tokens}
    if state is not None and state.get("val_loss") is not None:
        last["val_loss"] = state["val_loss"]
    if state is not None and step >= cfg.max_steps and is_main:
        print(f"the run in {out} already reached step {step} of --max-steps {cfg.max_steps}: nothing to train "
              "(raise --max-steps to continue it)", file=sys.stderr)
    t0, t_log, tok_log = time.time() - elapsed, time.time(), tokens
    params = [p for p in raw.parameters() if p.requires_grad]
    batches = iter(train_data)  # after load_state_dict: a resumed loader continues where the checkpoint was
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        host_batches = [next(batches) for _ in range(cfg.grad_accum)]
        step_tokens = sum(real_tokens(b) for b in host_batches)  # counted on the host: no device sync
        micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in host_batches]
        # each micro-batch's mean loss is weighted by its share of the scored tokens of the whole step, over all
        # processes: the gradient of the big batch, whatever the number of scored (e.g. assistant) tokens per batch
        counts = torch.stack([scored_count(b) for b in micro_batches]).float()
        total = counts.sum()
        if world > 1:  # scored targets and real tokens of every process, in one collective
            both = torch.stack([total.double(), torch.tensor(float(step_tokens), dtype=torch.float64, device=device)])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            total = both[0].float()
            pending += both[1]
        else:
            tokens += step_tokens
        weights = counts * world / total.clamp(min=1)  # DDP/FSDP average gradients over processes: undo the 1/world
        for micro, batch in enumerate(micro_batches):
            # gradients are averaged across processes only on the last micro-batch
            sync = micro == cfg.grad_accum - 1
            ctx = contextlib.nullcontext()
            if world > 1 and cfg.fsdp:
                model.set_requires_gradient_sync(sync)
            elif world > 1 and not sync:
                ctx = model.no_sync()
            with ctx, torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _ = _unpack(loss_fn(fwd, batch))
                # nothing scored in this micro-batch: its mean is NaN; it adds no gradient (no device sync here)
                loss = torch.where(counts[micro] > 0, loss, torch.zeros_like(loss))
                (loss * weights[micro]).backward()
            loss_sum += loss.detach() * weights[micro] / world
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        elapsed = time.time() - t0
        out_of_time = cfg.max_time is not None and elapsed >= cfg.max_time
        final = step >= cfg.max_steps or out_of_time

        eval_now = val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or final)
        if step % cfg.log_every == 0 or step == 1 or final or eval_now:  # an eval row carries its own step and time
            train_loss = loss_sum  # already the token-weighted mean of this process's share
            if world > 1:  # the token-weighted mean over processes (.item() syncs only on logging steps)
                dist.all_reduce(train_loss, op=dist.ReduceOp.SUM)
            now = time.time()
            count_tokens()
            tps = (tokens - tok_log) / max(now - t_log, 1e-9)
            t_log, tok_log = now, tokens
            last = {"step": step, "tokens": tokens, "lr": lr, "train_loss": round(train_loss.item(), 6),
                    "tok_per_s": round(tps, 1), "time": round(elapsed, 2)}
            bar.set_postfix(loss=f"{last['train_loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            if not eval_now:
                if final and wrap_metrics is not None and val_data is None:  # no evaluation: the end carries them
                    last.update(wrap_metrics())
                log(last)
        if eval_now:
            ev = evaluate(raw, val_data, val_loss_fn or loss_fn, cfg.eval_steps, amp, device)
            if ev["val_loss"] < best:
                best, best_step = ev["val_loss"], step
            last.update({k: round(v, 6) for k, v in ev.items()})
            if wrap_metrics is not None:
                last.update(wrap_metrics())
            if sample_fn is not None:  # on every rank: an FSDP forward needs them all
                was = raw.training
                raw.eval()  # greedy and without dropout: sampling draws no random number, so it leaves training alone
                last["sample"] = sample_fn(raw)
                raw.train(was)
            msg = " ".join(f"{k} {v:.4f}" for k, v in ev.items())
            if is_main:
                bar.write(f"step {step}: {msg}" + (f"\n  sample: {last['sample']!r}" if "sample" in last else ""))
            log(last)
            last.pop("sample", None)
        # patience counted from the best step, so a resumed run stops where the uninterrupted one would
        stale = (cfg.early_stopping and cfg.eval_every and val_data is not None and best_step is not None
                 and step - best_step >= cfg.early_stopping * cfg.eval_every)
        if out and ((cfg.save_every and step % cfg.save_every == 0) or final or stale):
            final_saved = save(step, last.get("val_loss"), last_save=final or stale)
        if stale and not final:
            bar.write(f"stopping at step {step}: no better val_loss in {cfg.early_stopping} evaluations "
                      f"(best {best:.4f} at step {best_step})")
            break
        if out_of_time:
            bar.write(f"stopping at step {step}: --max-time {cfg.max_time}s reached")
            break
    bar.close()

    # ---- final model at the top of out: a normal model folder (already written if the loop ended with a save)
    if out:
        if not final_saved:  # e.g. resumed from a finished run: the loop did not step
            full_model = _full_state(raw, optimizer, True)[0] if cfg.fsdp else None  # a collective: every rank
            if is_main and save_fn is not None:
                save_fn(out, plain_model(full_model))
        if is_main and metrics_path.stat().st_size:
            _plot(out)
    if writer:
        writer.close()
    last["best_val_loss"], last["best_step"] = (best if best < math.inf else None), best_step
    return last


def _model_config(model) -> dict | None:
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def _data_shape(data) -> dict | None:
    """What fixes a loader's batches: block size, batch size, objective (those the loader has)."""
    shape = {k: getattr(data, k) for k in ("block_size", "batch_size", "objective") if hasattr(data, k)}
    return shape or None


def _shape_changes(state: dict, world: int, shape: dict | None, grad_accum: int) -> list[str]:
    """What a resume would change about the batches: the checkpoint's settings against this run's."""
    changed = []
    if state.get("world_size", world) != world:
        changed.append(f"number of processes ({state['world_size']}, now {world})")
    saved = state.get("data_shape")
    if saved is not None and saved != shape:
        changed += [f"{k.replace('_', ' ')} ({saved.get(k)}, now {(shape or {}).get(k)})" for k in
                    sorted(set(saved) | set(shape or {})) if saved.get(k) != (shape or {}).get(k)]
    old_accum = (state.get("train_config") or {}).get("grad_accum", grad_accum)
    if old_accum != grad_accum:
        changed.append(f"gradient accumulation ({old_accum}, now {grad_accum})")
    return changed
