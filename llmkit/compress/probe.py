"""The speed and memory columns of a compression report row, measured the same way for every row.

Each row's model is loaded and decoded in a fresh Python process (`probe`), so that no row inherits the memory or the
warm caches of the process that measured the rows before it, and every row gets the same recipe:

- the same load: the model path and dtype the row's quality was scored with (a float folder in float32 on a CPU, a
  quantized folder in its own format), so the figures belong to the model the other columns describe;
- the same threads: torch.set_num_threads(n) before anything runs, n passed by the caller (its own thread count);
- the same prompt and tokens: the model's BOS id (or 0) then ids 1, 2, 3, greedy, `decode_tokens` new tokens with
  EOS ignored (so every row decodes exactly as many tokens), batch 1, one 4-token warm-up generation first;
- the decode rate: tokens / seconds of the fastest of PROBE_REPEATS generations (best of N: other processes on a
  shared machine only ever slow a run down);
- the peak RSS: the process's own high-water mark at the end (VmHWM in /proc/self/status), i.e. the most memory it
  held while importing, loading and decoding. Not getrusage's ru_maxrss: Linux carries that across fork and exec,
  so a child's figure starts at its parent's RSS when it was spawned, and the same model read 1,114 MB in one report
  and 1,645 MB in another, as much as the measuring process happened to hold.

The probe also records the 1-minute load average when it started: a figure taken while the load is above the core
count plus the report's own threads (its last minute of scoring counts in the average) was taken on a busy machine,
and the report says so beside the row.

This module imports only torch, the model loader and the engine: its own import is part of what the probe measures.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmkit.infer.engine import Engine, SamplingParams
from llmkit.model.checkpoint import load_model

PROBE_REPEATS = 3  # generations timed per row; the fastest counts
# the folder holding this copy of the llmkit package: the probe's subprocess imports the same copy
IMPORT_ROOT = Path(__file__).resolve().parents[2]


def probe(path, decode_tokens: int = 64, dtype: str | None = None, threads: int | None = None) -> dict:
    """Load `path` (in `dtype`) and decode in a fresh Python process with `threads` threads (default: the caller's);
    returns decode_tok_s (None for a model that does not generate), peak_rss_mb, probe_threads, probe_repeats and
    load_avg (see the module docstring)."""
    threads = threads or torch.get_num_threads()
    code = ("import json,sys,torch; torch.set_num_threads(int(sys.argv[4])); "
            "from llmkit.compress.probe import probe_main; "
            "print(json.dumps(probe_main(sys.argv[1], int(sys.argv[2]), sys.argv[3] or None)))")
    pythonpath = os.pathsep.join([str(IMPORT_ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    r = subprocess.run([sys.executable, "-c", code, str(path), str(decode_tokens), dtype or "", str(threads)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"measuring {path} in a subprocess failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def probe_main(path: str, decode_tokens: int, dtype: str | None) -> dict:
    """The probe's body, run inside the fresh process."""
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.manual_seed(0)
    lm = load_model(path, dtype=dtype)
    out = {"decode_tok_s": None, "probe_threads": torch.get_num_threads(), "probe_repeats": PROBE_REPEATS,
           "load_avg": load_avg}
    if lm.model.config.causal and not lm.model.config.num_labels:
        engine = Engine(lm.model, lm.tokenizer, lm.generation_config)
        prompt = [lm.config.bos_token_id if lm.config.bos_token_id >= 0 else 0] + [1, 2, 3]
        params = SamplingParams(temperature=0.0, max_new_tokens=decode_tokens, ignore_eos=True)
        engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))  # warm-up
        best, n = math.inf, 0
        for _ in range(PROBE_REPEATS):
            t0 = time.perf_counter()
            n = len(engine.generate([prompt], params)[0].token_ids)
            best = min(best, time.perf_counter() - t0)
        out["decode_tok_s"] = n / best
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM (this address space's own high-water mark); where there is no
    /proc, ru_maxrss (which may include the parent's memory at spawn: see the module docstring)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere
