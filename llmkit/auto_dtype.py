"""`--dtype auto`: time one decode step of a model in each format that keeps its quality, keep the fastest, cache it.

Which format decodes fastest depends on the machine: on an AVX-512 CPU with bf16 the int4 kernels win, on AVX2-only
CPUs bf16 is emulated and the order changes. So nothing is assumed: on first use of a model on a machine, each
candidate is loaded and one batch-1 decode step timed (best of a few after a warm-up), and the choice is cached in
$LLMKIT_HOME/auto_dtype.json keyed by the CPU's flags, the torch version, the device and the model (path, size, mtime).

Candidates stay within the quality budget by construction (benchmarks/compress_quantize.py measures it):
  - a GGUF (and the default model): its own blocks (Q4_0/Q4_1 -> int4, Q8_0 -> int8), float32 and bfloat16 of the
    same weights; a file with other block types: float32 and bfloat16;
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

    from llmkit import quantize

    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                return ["float32"]  # not a model: loading says so
        try:
            kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(p)).tensors if len(t.shape) == 2}
        except Exception as e:
            raise ValueError(f"cannot read GGUF file {p}: {e} (truncated or corrupt?)") from None
        native = [] if kinds - set(quantize.GGUF_NATIVE) - {"F32", "F16", "BF16"} else \
            (["int4"] if kinds & {"Q4_0", "Q4_1"} else ["int8"] if "Q8_0" in kinds else [])
        return native + ["float32", "bfloat16"]
    cfg = p / "config.json"
    if cfg.exists():
        qc = json.loads(cfg.read_text()).get("quantization_config")
        if isinstance(qc, dict) and qc.get("method") in ("int8", "int4"):
            return [qc["method"]]
    return ["float32", "bfloat16"]


def time_decode_step(model, prompt_len: int = 32, repeats: int = 5) -> float:
    """Milliseconds of one batch-1 decode step after a prompt_len prefill (best of `repeats`, after a warm-up)."""
    from llmkit.model import KVCache

    cfg = model.config
    dev = next(model.parameters()).device
    cache = KVCache(cfg, 1, prompt_len + repeats + 3, dtype=model.activation_dtype, device=dev)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=dev)
    with torch.inference_mode():
        model(ids, cache=cache, last_only=True)
        tok = ids[:, -1:]
        model(tok, cache=cache)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(tok, cache=cache)
            best = min(best, time.perf_counter() - t0)
    return best * 1e3


def choose(spec, path, device, load) -> str:
    """The fastest candidate format of `spec` (files at `path`) here, cached; load(spec, dtype) loads one."""
    if not str(device).startswith("cpu"):
        return "bfloat16"  # GPUs: bf16 tensor cores (the quantized CUDA path is untested, so not chosen unasked)
    key = cache_key(spec, path, device)
    entry = _read_cache().get(key)
    if entry:
        return entry["choice"]
    cands = candidates(path)
    if len(cands) == 1:
        return cands[0]
    t0 = time.time()
    lm = load(spec, cands[0])  # a model that cannot load fails here, before anything is printed
    load_s = {cands[0]: round(time.time() - t0, 2)}
    if not lm.model.config.causal or lm.model.config.num_labels:
        # encoders and classifiers have no decode step to time; they score in float32 (cached: no second load)
        _write(key, {"choice": "float32", "step_ms": {}, "load_s": load_s, "model": str(spec),
                     "torch": torch.__version__, "device": str(device), "when": time.strftime("%Y-%m-%d %H:%M:%S")})
        return "float32"
    print(f"[dtype auto: timing {', '.join(cands)} once on this machine ...]", file=sys.stderr)
    step_ms = {}
    for dt in cands:
        if lm is None:
            t1 = time.perf_counter()
            lm = load(spec, dt)
            load_s[dt] = round(time.perf_counter() - t1, 2)
        step_ms[dt] = round(time_decode_step(lm.model), 2)
        lm = None
        gc.collect()
    choice = min(step_ms, key=step_ms.get)
    entry = {"choice": choice, "step_ms": step_ms, "load_s": load_s, "model": str(spec), "torch": torch.__version__,
             "cpu": cpu_flags().split("|")[0], "device": str(device), "seconds": round(time.time() - t0, 1),
             "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write(key, entry)
    print(f"[dtype auto: {choice} ({', '.join(f'{k} {v} ms' for k, v in step_ms.items())} per decode step); "
          f"cached in {_home() / CACHE_FILE}]", file=sys.stderr)
    return choice


def _write(key: str, entry: dict):
    from llmkit.tokenizer import write_atomic

    data = _read_cache()
    data[key] = entry
    _home().mkdir(parents=True, exist_ok=True)
    write_atomic(_home() / CACHE_FILE, json.dumps(data, indent=2) + "\n")
