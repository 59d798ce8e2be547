"""`--dtype auto`: the fastest format (and quantized kernel input) here among those that keep the model's answers.

Which format decodes fastest depends on the machine: on an AVX-512 CPU with bf16 the int4 kernels win, on AVX2-only
CPUs bf16 is emulated and the order changes. So on first use of a model on a machine each candidate is loaded and
timed (a 32-token prefill and batch-1 decode steps, best of a few after a warm-up; chosen by the cost of a chat turn,
32 prompt + 64 new tokens), and the choice is cached in $LLMKIT_HOME/auto_dtype.json keyed by the CPU's flags, the
torch version, the device and the model (path, size, mtime).

A stopwatch may choose the path, never the answer's quality: before it is chosen, a candidate must pass a probe on
this machine, teacher-forced top-1 agreement with the float32 path of at least PROBE_MIN_AGREEMENT over a built-in
text (probe_text.txt, 320 tokens), fastest candidate first until one passes. The probe's figures go in the cache entry
and `llmkit info` shows them. A timing taken while the load average is above the core count, or whose steps vary by
more than 1.5x, is disturbed: the shipped format (with bf16 kernel inputs) is used if it passes the probe, the probe is
cached, and the choice is not; starts in the next RETRY_AFTER_S (10 minutes) use it untimed, then one times again. A
candidate whose first decode step is 3x slower than the best so far is not timed further (it cannot win).

Candidates stay within the quality budget by construction (benchmarks/compress_quantize.py measures it):
  - a GGUF (and the default model): its own blocks (Q4_0/Q4_1 -> int4, Q8_0 -> int8) with bfloat16 or float32 kernel
    inputs, float32 and bfloat16 of the same weights; a file with other block types: float32 and bfloat16;
  - a quantized folder: its own format only; a float folder: float32 and bfloat16 (llmkit never quantizes a model
    unasked: int4 from float weights costs up to a few % of perplexity, that is `llmkit quantize`'s job).
Compiled steps are not candidates: a compile takes 30-60 s on a 2-core CPU, far beyond the few seconds this may take
at first start; `--compile` stays an explicit choice.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from llmkit.model import quant as quantize
from llmkit.model import quant_io

CACHE_FILE = "auto_dtype.json"


def _home() -> Path:
    return Path(os.environ.get("LLMKIT_HOME") or Path.home() / ".cache" / "llmkit")


def cpu_flags() -> str:
    """The CPU's model and instruction-set flags (what decides which kernels are fast)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags")), "")
        return f"{model}|{flags}"
    except OSError:
        return platform.processor() or platform.machine()


def model_identity(spec, path) -> str:
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.suffix in (".json", ".safetensors", ".gguf"))
    parts = [f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files if f.exists()]
    return "|".join([str(spec)] + parts)


def cache_key(spec, path, device) -> str:
    raw = "\n".join([cpu_flags(), torch.__version__, str(device), model_identity(spec, path)])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _read_cache() -> dict:
    try:
        return json.loads((_home() / CACHE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def cached(spec, path, device="cpu") -> dict | None:
    """The cached choice for this model on this machine ({"choice", "step_ms", ...}) or None."""
    return _read_cache().get(cache_key(spec, path, device))


def candidates(path) -> list[str]:
    """Formats of the model at `path` that keep its quality (see the module docstring), the shipped one first."""
    import gguf

    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                return ["float32"]  # not a model: loading says so
        try:
            kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(p)).tensors if len(t.shape) == 2}
        except Exception as e:
            raise ValueError(f"cannot read GGUF file {p}: {e} (truncated or corrupt?)") from None
        native = [] if kinds - set(quant_io.GGUF_NATIVE) - {"F32", "F16", "BF16"} else \
            (["int4"] if kinds & {"Q4_0", "Q4_1"} else ["int8"] if "Q8_0" in kinds else [])
        return native + ["float32", "bfloat16"]
    cfg = p / "config.json"
    if cfg.exists():
        qc = json.loads(cfg.read_text()).get("quantization_config")
        if isinstance(qc, dict) and qc.get("method") in ("int8", "int4"):
            return [qc["method"]]
    return ["float32", "bfloat16"]


def time_decode_step(model, prompt_len: int = 32, repeats: int = 5, give_up_ms: float | None = None) -> tuple:
    """(best, median) milliseconds of one batch-1 decode step after a prompt_len prefill (after a warm-up), and the
    prefill's milliseconds per prompt token. A first step slower than give_up_ms ends the timing there (the candidate
    cannot win; the prefill is then not timed: infinite), so a very slow path costs one step, not a whole prefill."""
    from llmkit.model.transformer import KVCache

    cfg = model.config
    dev = next(model.parameters()).device
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=dev, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if give_up_ms is not None:
            probe = KVCache(cfg, 1, 4, dtype=model.activation_dtype, device=dev)
            model(ids[:, :1], cache=probe)
            t0 = time.perf_counter()
            model(ids[:, 1:2], cache=probe)
            first = (time.perf_counter() - t0) * 1e3
            if first > give_up_ms:
                return first, first, float("inf")
        cache = KVCache(cfg, 1, prompt_len + repeats + 3, dtype=model.activation_dtype, device=dev)
        t0 = time.perf_counter()
        model(ids, cache=cache, last_only=True)
        prefill = (time.perf_counter() - t0) / prompt_len
        tok = ids[:, -1:]
        model(tok, cache=cache)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(tok, cache=cache)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[0] * 1e3, times[len(times) // 2] * 1e3, prefill * 1e3


def turn_ms(timing) -> float:
    """What a chat turn costs in a candidate, the figure the fastest is chosen by: 32 prompt tokens, 64 new ones."""
    step, _, prefill = timing
    return 32 * prefill + 64 * step


# ---------------------------------------------------------------------------------------------------------------
# the quality probe: a candidate must pick the float32 path's top token on a built-in text

RETRY_AFTER_S = 600  # after a disturbed timing, starts within this use the shipped format untimed, then time again
PROBE_FILE = Path(__file__).with_name("probe_text.txt")
PROBE_TOKENS = 320
PROBE_MIN_AGREEMENT = 0.94  # int4 of the default model: 0.97-0.99 here; a broken kernel falls far below


def probe_ids(tokenizer, cfg) -> list[int]:
    """The probe text's token ids (or a fixed pseudo-random sequence for a model without a tokenizer)."""
    n = min(PROBE_TOKENS, cfg.max_position_embeddings)
    if tokenizer is not None:
        return tokenizer.encode(PROBE_FILE.read_text(encoding="utf-8"))[:n]
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def top1(model, ids: list[int]) -> torch.Tensor:
    """Teacher-forced top-1 token at every position of ids."""
    with torch.inference_mode():
        return model(torch.tensor([ids], device=next(model.parameters()).device))[0].argmax(-1)


# ---------------------------------------------------------------------------------------------------------------
# choosing

def _load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


def _busy(load: float) -> str | None:
    cores = os.cpu_count() or 1
    return f"load average {load} above the {cores} cores" if load > cores else None


def _noisy(step_ms: dict) -> str | None:
    noisy = [k for k, (best, median, _) in step_ms.items() if median > 1.5 * best]
    return f"steps of {', '.join(noisy)} varied by more than 1.5x" if noisy else None


def choose(spec, path, device, load) -> tuple[dict, object]:
    """(entry, loaded model or None): entry["choice"] is the fastest candidate format of `spec` (files at `path`)
    here that passes the quality probe, entry["kernel_input"] the quantized kernels' input dtype (or None);
    load(spec, dtype) loads one. The loaded model is the chosen one when it was loaded for timing anyway.
    Cached unless the timing was disturbed."""
    if not str(device).startswith("cpu"):  # GPUs: bf16 tensor cores (the quantized CUDA path is untested)
        return {"choice": "bfloat16", "kernel_input": None}, None
    key = cache_key(spec, path, device)
    old = _read_cache().get(key) or {}
    if "choice" in old:
        return old, None
    if time.time() < old.get("retry_after", 0):  # disturbed a few minutes ago: the shipped format, untimed, quietly
        first = old.get("first_candidate")
        if first and old.get("probe", {}).get(first, 0) >= PROBE_MIN_AGREEMENT:
            choice, _, kin = first.partition("/")
            return {"choice": choice, "kernel_input": kin or None, "disturbed": old["disturbed"]}, None
    cands = candidates(path)
    if len(cands) == 1:
        return {"choice": cands[0], "kernel_input": None}, None
    t0, load_before = time.time(), _load_avg()
    loaded = {cands[0]: load(spec, cands[0])}  # a model that cannot load fails here, before anything is printed
    cfg = loaded[cands[0]].model.config
    base = {"model": str(spec), "torch": torch.__version__, "cpu": cpu_flags().split("|")[0], "device": str(device),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not cfg.causal or cfg.num_labels:
        # encoders and classifiers have no decode step to time; they score in float32 (cached: no second load)
        entry = {"choice": "float32", "kernel_input": None, "step_ms": {}, **base}
        _write(key, entry)
        return entry, loaded.get("float32")
    first_kin = str(quantize.default_act_dtype()).split(".")[-1]
    kins = [first_kin] + [k for k in quantize.KERNEL_INPUTS if k != first_kin]  # the default kernel input first
    names = [n for dt in cands for n in ([f"{dt}/{k}" for k in kins] if dt in quantize.METHODS else [dt])]
    why = _busy(load_before)
    if why:  # a busy machine is not timed at all: the shipped format with the default kernel input, if it passes
        names = names[:1]
    else:
        print(f"[dtype auto: timing {', '.join(cands)} once on this machine and checking each against float32 ...]",
              file=sys.stderr)
    for dt in dict.fromkeys(n.partition("/")[0] for n in names):
        if dt not in loaded:
            loaded[dt] = load(spec, dt)
    ids = probe_ids(loaded[cands[0]].tokenizer, cfg)
    step_ms = {}
    for name in [] if why else names:
        dt, _, kin = name.partition("/")
        if kin:
            quantize.set_act_dtype(loaded[dt].model, getattr(torch, kin))
        best = min((v[0] for v in step_ms.values()), default=None)  # 3x slower than the best: it cannot win
        step_ms[name] = [round(v, 2) for v in time_decode_step(loaded[dt].model, give_up_ms=best and 3 * best)]
    why = why or _busy(_load_avg()) or _noisy(step_ms)
    # the probe, fastest first (or in the candidates' order when the timing is disturbed), until one passes
    probe, ref, name = dict(old.get("probe", {})), None, "float32"
    for cand in (names if why else sorted(names, key=lambda n: turn_ms(step_ms[n]))):
        dt, _, kin = cand.partition("/")
        if kin:
            quantize.set_act_dtype(loaded[dt].model, getattr(torch, kin))
        if cand not in probe:
            if ref is None:
                if "float32" not in loaded:
                    loaded["float32"] = load(spec, "float32")
                ref = top1(loaded["float32"].model, ids)
            agree = 1.0 if cand == "float32" else float((top1(loaded[dt].model, ids) == ref).float().mean())
            probe[cand] = round(agree, 4)
        if probe[cand] >= PROBE_MIN_AGREEMENT:
            name = cand
            break
    choice, _, kin = name.partition("/")
    entry = {"choice": choice, "kernel_input": kin or None, "step_ms": {k: v[0] for k, v in step_ms.items()},
             "prefill_ms_per_token": {k: v[2] for k, v in step_ms.items()}, "probe": probe, "probe_tokens": len(ids),
             "load_avg": [load_before, _load_avg()],
             "seconds": round(time.time() - t0, 1), **base}
    chosen = loaded.pop(choice, None)  # None: load_model loads it
    loaded = None
    gc.collect()
    if why:  # keep the probe (quality does not depend on load) but not the choice: time again in RETRY_AFTER_S
        _write(key, {"probe": probe, "probe_tokens": len(ids), "disturbed": why, "first_candidate": names[0],
                     "retry_after": time.time() + RETRY_AFTER_S, **base})
        print(f"[dtype auto: not timed ({why}); using {name}, not cached: timed again after "
              f"{RETRY_AFTER_S // 60} minutes]", file=sys.stderr)
        return entry | {"disturbed": why}, chosen
    _write(key, entry)
    print(f"[dtype auto: {name} ({', '.join(f'{k} {v[0]} ms' for k, v in step_ms.items())} per decode step; "
          f"top-1 agreement with float32: {', '.join(f'{k} {v}' for k, v in probe.items())}); "
          f"cached in {_home() / CACHE_FILE}]", file=sys.stderr)
    return entry, chosen


def _write(key: str, entry: dict):
    from llmkit.utils.io import write_atomic

    data = _read_cache()
    data[key] = entry
    _home().mkdir(parents=True, exist_ok=True)
    write_atomic(_home() / CACHE_FILE, json.dumps(data, indent=2) + "\n")
