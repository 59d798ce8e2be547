"""`llmkit compare`, `llmkit prune`, `llmkit distill`: model compression with one before/after report."""
from __future__ import annotations

import sys

from llmkit.cli.flags import report_flags, report_kwargs


def add_compare(sub):
    p = sub.add_parser("compare", help="the compression report table (size, sparsity, RSS, speed, perplexity, "
                       "HellaSwag) for model folders")
    p.add_argument("models", nargs="+", help="model folders, .gguf files or 'default'")
    p.add_argument("--out", help="also write compress_report.json and compress_report.md into this folder")
    report_flags(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")
    p.set_defaults(handler=cmd_compare)


def _common(p):
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the before/after report (it loads and evaluates both models)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars or lines")


def cmd_compare(args):
    from pathlib import Path

    from llmkit.compress import report as cr

    kw = report_kwargs(args)
    for m in args.models:  # every path checked before minutes of measuring
        if m != "default" and not Path(m).exists():
            raise FileNotFoundError(f"model not found: {m}")
    rows = [cr.measure(m, **kw) for m in args.models]
    print(cr.render(rows))
    if args.out:
        print(f"wrote {cr.write_report(args.out, rows)}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# prune


def add_prune(sub):
    p = sub.add_parser("prune", help="sparsify (magnitude, Wanda, SparseGPT; unstructured or N:M) or shrink "
                       "(structured heads/mlp/layers) a model, with a before/after report")
    a = p.add_argument
    a("--model", default="default", help="model folder, .gguf file or 'default'")
    a("--out", required=True, help="output model folder (with prune_config.json and compress_report.*)")
    a("--method", default="magnitude", choices=["magnitude", "wanda", "sparsegpt", "structured"],
      help="magnitude (no data), wanda / sparsegpt (calibration text), structured (smaller config)")
    a("--sparsity", type=float, help="share of weights set to zero, in (0, 1); implied by an N:M --pattern")
    a("--pattern", default="unstructured", help="unstructured, or N:M such as 2:4 or 4:8 (N kept of every M)")
    a("--target", default="mlp", help="structured: comma-separated heads (whole GQA groups), mlp, layers")
    a("--ratio", type=float, default=0.25, help="structured: share of heads / channels / layers removed")
    a("--calib-data", help="calibration text file (wanda, sparsegpt, structured, --recover)")
    a("--calib-samples", type=int, default=128, help="calibration samples (default 128)")
    a("--calib-seq-len", type=int, default=128, help="tokens per calibration sample (default 128)")
    a("--recover", type=int, default=0, metavar="STEPS",
      help="then fine-tune for STEPS steps on --calib-data (pruned weights stay zero)")
    a("--recover-method", choices=["full", "lora"], default="full",
      help="recovery fine-tunes all weights (full, default) or LoRA adapters on every linear, merged at the end "
      "(lora; structured pruning only)")
    a("--recover-lr", type=float, default=5e-5, help="recovery learning rate (default 5e-5)")
    a("--recover-batch-size", type=int, default=4, help="recovery batch size (default 4)")
    _common(p)
    report_flags(p)
    p.set_defaults(handler=cmd_prune)


def cmd_prune(args):
    from llmkit.compress.prune import PruneConfig, prune_model

    pc = PruneConfig(model=args.model, out=args.out, method=args.method, sparsity=args.sparsity,
                     pattern=args.pattern, target=args.target, ratio=args.ratio, calib_data=args.calib_data,
                     calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, recover=args.recover,
                     recover_method=args.recover_method,
                     recover_lr=args.recover_lr, recover_batch_size=args.recover_batch_size, seed=args.seed,
                     device=args.device, progress=args.progress, report=args.report,
                     report_kwargs=report_kwargs(args))
    prune_model(pc)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# distill


def add_distill(sub):
    p = sub.add_parser("distill", help="knowledge distillation: train a student on a teacher's distributions "
                       "(KL / JSD at temperature T mixed with the hard-label loss)")
    a = p.add_argument
    a("--teacher", default="default", help="teacher model folder, .gguf or 'default'")
    a("--student", help="student: a preset (its shape, the teacher's vocabulary), a config.json or a model folder "
      "(e.g. from llmkit prune)")
    a("--init-from-teacher", action="store_true", help="student = the teacher's blocks listed by --keep-layers")
    a("--keep-layers", help="with --init-from-teacher: comma-separated block indices (default: every other block)")
    a("--data", required=True, help="text (.txt), chat JSONL ({messages}), Alpaca JSON/JSONL, or CSV/TSV/JSONL "
      "(text, label) for a classifier teacher")
    a("--out", required=True, help="student model folder (checkpoints/, metrics.jsonl, loss.png, report)")
    a("--task", choices=["text", "chat", "instruct", "classify"], help="default: detected from the file")
    a("--loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "symmetric_kl", "jsd"],
      help="divergence between teacher and student (default forward_kl, Hinton's)")
    a("--temperature", type=float, default=2.0, help="softening temperature T (the KD term is scaled by T^2)")
    a("--alpha", type=float, default=0.5, help="weight of the KD term; 1 - alpha weighs the hard-label loss")
    a("--teacher-cache", help="folder for the teacher's top-k outputs, computed once and reused across runs")
    a("--top-k", type=int, default=64, help="teacher tokens kept per position in the cache (default 64)")
    a("--val-data", help="validation file (default: hold out --val-fraction of --data)")
    a("--val-fraction", type=float, default=0.1, help="share of --data held out (default 0.1)")
    a("--max-length", type=int, default=512, help="tokens per example (default 512)")
    a("--batch-size", type=int, default=8, help="examples per micro-step")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--epochs", type=float, default=None, help="passes over the data (sets --max-steps)")
    a("--max-steps", type=int, default=None, help="optimizer steps (default: 1 epoch)")
    a("--max-time", type=float, default=None, help="stop after this many seconds")
    a("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    a("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 3%% of the steps)")
    a("--eval-every", type=int, default=100, help="validate every N steps")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (default: only at the end)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    _common(p)
    report_flags(p)
    p.set_defaults(handler=cmd_distill)


def cmd_distill(args):
    from llmkit.compress.distill import DistillConfig, distill
    from llmkit.train.loop import TrainConfig

    layers = None
    if args.keep_layers:
        try:
            layers = [int(x) for x in args.keep_layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--keep-layers must be comma-separated integers, got {args.keep_layers!r}") from None
    dc = DistillConfig(teacher=args.teacher, data=args.data, out=args.out, student=args.student,
                       init_from_teacher=args.init_from_teacher, keep_layers=layers, loss=args.loss,
                       temperature=args.temperature, alpha=args.alpha, teacher_cache=args.teacher_cache,
                       top_k=args.top_k, task=args.task, val_data=args.val_data, val_fraction=args.val_fraction,
                       max_length=args.max_length, batch_size=args.batch_size, seed=args.seed, device=args.device,
                       progress=args.progress, report=args.report, report_kwargs=report_kwargs(args))
    tc = TrainConfig(max_steps=args.max_steps or 0, max_time=args.max_time, lr=args.lr,
                     warmup_steps=args.warmup_steps if args.warmup_steps is not None else -1, weight_decay=0.0,
                     grad_accum=args.grad_accum, eval_every=args.eval_every, save_every=args.save_every,
                     seed=args.seed, device=args.device, out=args.out, resume=args.resume, progress=args.progress)
    res = distill(dc, tc, epochs=args.epochs)
    keys = ("step", "train_loss", "val_loss", "val_kd", "val_ce")
    print(" ".join(f"{k} {res[k]:.4g}" if isinstance(res[k], float) else f"{k} {res[k]}" for k in keys if k in res))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
