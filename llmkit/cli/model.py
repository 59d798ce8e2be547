"""Model folder commands: `llmkit info`, `llmkit convert`, `llmkit merge` and `llmkit quantize` (weight-only
int8/int4 into a new model folder, with a before/after report)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import model_flags, report_flags, report_kwargs

# ---------------------------------------------------------------------------------------------------------------
# info


def add_info(sub):
    p = sub.add_parser("info", help="family, parameters, dtype, context length and size of a model")
    model_flags(p)
    p.set_defaults(handler=cmd_info)


def cmd_info(args):
    lm = common.load(args)
    cfg, m = lm.config, lm.model
    p = Path(lm.path)
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else p.stat().st_size
    qc = getattr(m, "quantization_config", None)
    dtype = qc.get("method", "quantized") if qc else str(next(m.parameters()).dtype).split(".")[-1]
    n = m.num_params() + sum(q.in_features * q.out_features for q in {id(x): x for x in m.modules()
                                                                       if hasattr(x, "method")}.values()
                             if type(q).__name__ != "RowSlice")
    rows = [("path", lm.path), ("family", cfg.family), ("architecture", _arch(cfg)),
            ("parameters", f"{n:,} ({n / 1e6:.1f} M)"), ("stored as", _stored_as(p)), ("runs as", dtype),
            ("context length", cfg.max_position_embeddings), ("layers", cfg.n_layer),
            ("heads / kv heads", f"{cfg.n_head} / {cfg.n_kv_head}"), ("hidden size", cfg.n_embd),
            ("vocabulary", cfg.vocab_size), ("size on disk", f"{size / 2**20:.1f} MiB"),
            ("chat template", "yes" if lm.tokenizer is not None and getattr(lm.tokenizer, "chat_template", None)
             else "no")]
    rows += _auto_rows(args)
    if cfg.causal:
        from llmkit.infer.compiled import describe

        rows.append(("compiled step", describe(m)))
    for k, v in rows:
        print(f"{k:<16} {v}")
    return 0


def _stored_as(p) -> str:
    """The weights' format on disk: config.json's torch_dtype (or quantization), or a GGUF's tensor types."""
    if p.is_dir():
        hf = json.loads((p / "config.json").read_text()) if (p / "config.json").exists() else {}
        qc = hf.get("quantization_config")
        return qc.get("method", "quantized") if isinstance(qc, dict) else str(hf.get("torch_dtype", "unknown"))
    import gguf

    kinds = sorted({t.tensor_type.name for t in gguf.GGUFReader(str(p)).tensors if len(t.shape) == 2})
    return "GGUF " + ", ".join(kinds)


def _auto_rows(args):
    from llmkit.model import auto_dtype
    from llmkit.model.checkpoint import default_gguf_path

    path = default_gguf_path() if args.model == "default" else Path(args.model)
    entry = auto_dtype.cached(args.model, path, common.device(args)) or {}
    cands = auto_dtype.candidates(path) if "choice" not in entry else []
    rows = []
    if "choice" not in entry and len(cands) == 1:
        rows.append(("dtype auto", f"{cands[0]} (the model's own format, nothing to time)"))
    elif "choice" not in entry:
        why = f"; the last timing was disturbed: {entry['disturbed']}" if entry.get("disturbed") else ""
        rows.append(("dtype auto", f"not timed yet on this machine (the first load with --dtype auto times it{why})"))
    elif not entry["step_ms"]:
        rows.append(("dtype auto", f"{entry['choice']} (an encoder or classifier: no decode step to time)"))
    else:
        kin = f" with {entry['kernel_input']} kernel inputs" if entry.get("kernel_input") else ""
        times = ", ".join(f"{k} {v} ms" for k, v in entry["step_ms"].items())
        load = entry.get("load_avg")
        rows.append(("dtype auto", f"{entry['choice']}{kin} (one decode step: {times}; timed {entry['when']}"
                     + (f", load average {load[0]}-{load[1]}" if load else "") + ")"))
    if entry.get("probe"):
        rows.append(("quality probe", ", ".join(f"{k} {v}" for k, v in entry["probe"].items())
                     + f" top-1 agreement with float32 on {entry.get('probe_tokens', '?')} tokens "
                     f"(at least {auto_dtype.PROBE_MIN_AGREEMENT} to be chosen)"))
    return rows


def _arch(cfg):
    from llmkit.model.checkpoint import config_to_hf

    return config_to_hf(cfg)["architectures"][0]


# ---------------------------------------------------------------------------------------------------------------
# convert / merge


def add_convert(sub):
    p = sub.add_parser("convert", help="GGUF file or HF folder in, model folder out")
    p.add_argument("src", help="a .gguf file, a model folder, or 'default'")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", default="hf", choices=["hf", "llmkit", "gguf"],
                   help="output format (llmkit's folder is HF's layout; gguf writes one llama.cpp file, OUT)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights")
    p.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_0", "q4_1"],
                   help="GGUF weight type (with --to gguf; q4_*: embedding in q8_0, as llama.cpp does)")
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args):
    from llmkit.model.checkpoint import export_hf, load_model

    out = Path(args.out)
    if args.to == "gguf":
        from llmkit.model.gguf_export import export_gguf

        checks.output_file(out, "OUT")
        if out.exists():
            raise ValueError(f"{out} already exists; choose a new output file")
        lm = load_model(args.src, dtype="float32")
        export_gguf(lm, out, quant=args.quant)
        print(f"wrote {out} ({args.quant.upper()}, {out.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
        return 0
    checks.output_dir(out, "OUT", empty=True)
    lm = load_model(args.src, dtype="float32")
    export_hf(lm, out, dtype=args.dtype)
    print(f"wrote {out} ({lm.config.family}, {lm.model.num_params():,} parameters)", file=sys.stderr)
    return 0


def add_merge(sub):
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model: a plain model folder out")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output model folder (must be new or empty)")
    p.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights")
    p.set_defaults(handler=cmd_merge)


def cmd_merge(args):
    from llmkit.model.checkpoint import merge_adapter

    checks.output_dir(args.out, empty=True)
    out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"wrote {out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# quantize


def add_quantize(sub):
    p = sub.add_parser("quantize", help="weight-only int8/int4 quantization into a model folder every command loads")
    p.add_argument("--model", default="default", help="model folder, .gguf file or 'default' (a GGUF is "
                   "dequantized first)")
    p.add_argument("--out", required=True, help="output model folder (must be new or empty)")
    p.add_argument("--method", required=True, choices=["int8", "int4"],
                   help="int8: one scale per output channel; int4: groups along the input dimension")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128 (must divide each "
                   "layer's in_features)")
    p.add_argument("--skip", action="append", default=[], help="layer to keep in float, e.g. lm_head (repeatable)")
    p.add_argument("--no-report", action="store_true", help="skip the before/after report (size, RSS, speed, quality)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")
    report_flags(p)
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
    report_kw = report_kwargs(args)
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

    rows = [R.measure(args.model, name=Path(str(args.model)).name, **report_kw),
            R.measure(out, name=out.name, run_seconds=seconds, **report_kw)]
    notes = [f"quantization_config: {json.dumps(qc)}"]
    R.write_report(out, rows, notes)
    print(R.render(rows, notes))
    print(f"report: {out / 'compress_report.md'}", file=sys.stderr)
    return 0
