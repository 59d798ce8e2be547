"""`llmkit quantize`: weight-only int8/int4 quantization into a new model folder, with a before/after report."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def register(sub):
    p = sub.add_parser("quantize", help="weight-only int8/int4 quantization into a model folder every command loads")
    p.add_argument("--model", default="default", help="model folder, .gguf file or 'default' (a GGUF is "
                   "dequantized first)")
    p.add_argument("--out", required=True, help="output model folder (must be new or empty)")
    p.add_argument("--method", required=True, choices=["int8", "int4"],
                   help="int8: one scale per output channel; int4: groups along the input dimension")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128 (must divide each "
                   "layer's in_features)")
    p.add_argument("--skip", action="append", default=[], help="layer to keep in float, e.g. lm_head (repeatable)")
    p.add_argument("--eval-limit", type=int, default=200, help="HellaSwag items in the report")
    p.add_argument("--ppl-chars", type=int, default=100_000, help="characters of WikiText-2 test scored in the report")
    p.add_argument("--no-report", action="store_true", help="skip the before/after report (size, RSS, speed, quality)")
    p.set_defaults(handler=cmd_quantize)


def _check_source(spec: str):
    p = Path(spec)
    cfg = p / "config.json"
    if p.is_dir() and cfg.exists():
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config")
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg} is not valid JSON ({e})") from None
        if qc:
            raise ValueError(f"{spec} is already quantized ({qc.get('method', qc)}); quantize its float original")


def cmd_quantize(args):
    import torch

    from llmkit.model import quant as quantize
    from llmkit.model.checkpoint import load_model, save_model

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty; choose a new output folder")
    if args.method == "int4" and args.group_size not in quantize.GROUP_SIZES:
        raise ValueError(f"--group-size must be one of 32, 64, 128, got {args.group_size}")
    if args.eval_limit < 1 or args.ppl_chars < 1:
        raise ValueError("--eval-limit and --ppl-chars must be >= 1")
    _check_source(args.model)
    t0 = time.time()
    lm = load_model(args.model, dtype="float32")
    if quantize.is_quantized(lm.model):
        raise ValueError(f"{args.model} is already quantized; quantize its float original")
    with torch.no_grad(), quantize.keep_portable():
        qc = quantize.quantize_model(lm.model, args.method, args.group_size, skip=args.skip)
    seconds = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(tmp, lm.model, lm.tokenizer, lm.generation_config)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    os.chmod(out, 0o755)
    del lm
    fallback = f", {len(qc['int8_fallback'])} layers int8 (int4 kernel shape rules)" if qc["int8_fallback"] else ""
    print(f"wrote {out} ({args.method}{f', groups of {args.group_size}' if args.method == 'int4' else ''}"
          f"{fallback}) in {seconds:.1f} s", file=sys.stderr)
    if args.no_report:
        return 0
    from llmkit.compress import report as R

    kw = dict(eval_limit=args.eval_limit, ppl_chars=args.ppl_chars, progress=sys.stderr.isatty())
    rows = [R.measure(args.model, name=f"{Path(str(args.model)).name} (float32)", dtype="float32", **kw),
            R.measure(out, name=f"{out.name} ({args.method})", run_seconds=seconds, **kw)]
    notes = [f"quantization_config: {json.dumps(qc)}"]
    R.write_report(out, rows, notes)
    print(R.render(rows, notes))
    print(f"report: {out / 'compress_report.md'}", file=sys.stderr)
    return 0
