"""What the command handlers share: the device, the --model loaded and checked, sampling parameters, the engine,
the cleaning config of --clean, and the clean-up after a failed command. Heavy imports stay inside the functions, so
`llmkit --help` stays fast."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import llmkit.cli.checks as checks
from llmkit.cli.flags import check_speculative, compile_mode


def device(args):
    import torch

    if args.device:
        checks.device(args.device)
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(args, check=None):
    """The --model, checked by check(lm) (if given) before anything is printed."""
    from llmkit.model.checkpoint import load_model

    t0 = time.time()
    lm = load_model(args.model, dtype=args.dtype, device=device(args))
    if check is not None:
        check(lm)
    print(f"[loaded {lm.path} in {time.time() - t0:.2f} s]", file=sys.stderr)
    return lm


def params(args, default_temperature=0.0):
    from llmkit.infer.engine import SamplingParams

    check_speculative(args)  # fails before the model loads
    t = default_temperature if args.temperature is None else args.temperature
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=t, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop)


def draft_model(spec, dtype, device_name):
    """--speculative: "ngram", None, or a draft model loaded from a folder or .gguf (same tokenizer as the model)."""
    if spec in (None, "ngram"):
        return spec
    from llmkit.model.checkpoint import load_model

    return load_model(spec, dtype=dtype, device=device_name).model


def engine(lm, args):
    from llmkit.infer.engine import Engine

    spec = draft_model(getattr(args, "speculative", None), args.dtype, device(args))
    mode = {"on": True, "auto": "cached", "off": False}[compile_mode(args)]
    e = Engine(lm.model, lm.tokenizer, lm.generation_config, compile=mode if spec is None else False,
               kv_cache_mb=args.kv_cache_mb, batch_invariant=args.batch_invariant, speculative=spec,
               draft_tokens=getattr(args, "draft_tokens", 4))
    if mode == "cached" and spec is None:
        from llmkit.infer.compiled import build_if_missing

        note = build_if_missing(e, args.model, args.dtype)
        if note:
            print(f"[{note}]", file=sys.stderr)
    return e


def clean_config(args):
    """CleanConfig from parsed flags (data clean, pretrain/finetune --clean)."""
    from llmkit.data.clean import CleanConfig

    dedup = [x.strip() for x in args.dedup.split(",") if x.strip() and x.strip() != "none"]
    return CleanConfig(dedup=dedup, near_threshold=args.near_threshold, shingle=args.shingle, num_perm=args.num_perm,
                       min_chars=args.min_chars, quality=args.quality,
                       langs=[x.strip() for x in args.lang.split(",") if x.strip()] if args.lang else [],
                       lang_threshold=args.lang_threshold,
                       pii=None if args.pii == "none" else args.pii)


def run_config(args):
    """RunConfig (where the datatrove pipeline runs) from parsed flags."""
    from llmkit.data.pipeline import RunConfig

    return RunConfig(executor=args.executor, tasks=args.tasks, workers=args.workers, work_dir=args.work_dir,
                     partition=args.partition, time=args.slurm_time, cpus_per_task=args.cpus_per_task,
                     mem_per_cpu_gb=args.mem_per_cpu_gb)


def remove_partial(out):
    """Remove what a failed command left at an --out path that did not exist before it (never a run's checkpoints)."""
    p = Path(out)
    if p.is_dir() and not (p / "checkpoints").exists():
        shutil.rmtree(p, ignore_errors=True)
    elif p.is_file():
        p.unlink(missing_ok=True)
