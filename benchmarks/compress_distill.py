"""Distillation of the default model into a half-depth student: cross-entropy only vs knowledge distillation.

Teacher: the default model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized, float32, 30 blocks). Student: a copy of
the teacher keeping every other block (15 blocks, about half the non-embedding parameters), the same start for both
runs. Each run trains for the same wall-clock budget (--minutes, including its periodic validation) on the same text
(WikiText-2 validation, blocks of --block tokens) through `llmkit.compress.distill.distill`, i.e. train.py's loop:
(a) CE only (alpha = 0: no teacher forward at all), (b) KD (Hinton: --loss forward_kl at --temperature, mixed with
CE by --alpha). By default the teacher runs on the fly, so a KD step costs more and (b) takes fewer steps in the
budget; with --teacher-cache the teacher's top-k next tokens are computed once before (b) (timed apart, reported as
cache_seconds: the one-off cost that later runs and epochs reuse), and a KD step then costs about what a CE step does.
Both are then scored on held-out text: WikiText-2 *test* token perplexity (first --ppl-chars characters,
--context-token windows) and HellaSwag acc_norm (first --eval-limit items of the shared sample); the teacher and the
untrained student are scored too. Curves: validation cross-entropy (WikiText-2 test characters after the scored
ones) against training time, both runs in one plot.

The issue asks for ~20 minutes a run (`--minutes 20`); the default is 3 minutes a run and 20 HellaSwag items (a noisy
figure) for a quick look. Writes benchmarks/results/compress_distill.json and compress_distill.png.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/compress_distill.py \
        [--minutes 3] [--loss forward_kl] [--temperature 2] [--alpha 0.5] [--eval-limit 20] [--teacher-cache]
"""
import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget of each run")
    ap.add_argument("--loss", default="forward_kl")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--block", type=int, default=128, help="tokens per training example")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--ppl-chars", type=int, default=2000)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--eval-limit", type=int, default=20, help="HellaSwag items")
    ap.add_argument("--teacher-cache", action="store_true",
                    help="KD reads the teacher's top-k from a cache built once before its run (not on the fly)")
    ap.add_argument("--top-k", type=int, default=64, help="tokens per position in the teacher cache")
    ap.add_argument("--cache-dir", default=None, help="keep the teacher cache here (reused when it matches)")
    ap.add_argument("--reuse-ce", default=None, metavar="JSON",
                    help="take the CE-only run, teacher and untrained-student rows from this earlier result (same "
                    "budget, lr, block, batch and scoring flags, checked) and run only KD")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress_distill.json"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a machine loaded by other jobs, fewer thread hand-offs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llmkit.eval import evaluate
    from llmkit.utils.io import read_utf8, write_results
    from llmkit.model.checkpoint import load_model, save_model
    from llmkit.compress.distill import DistillConfig, distill, keep_layers
    from llmkit.compress.report import non_embedding_params
    from llmkit.train.loop import TrainConfig

    t_start, load_before = time.time(), uptime()
    teacher = load_model("default", dtype="float32")
    tok = teacher.tokenizer
    test = read_utf8(SHARED / "wikitext-2" / "test.txt")
    tmp = Path(tempfile.mkdtemp(prefix="llmkit-distill-bench-"))
    (tmp / "val.txt").write_text(test[args.ppl_chars:args.ppl_chars + 6000])  # curves: text after the scored part
    tokens = evaluate.tok_encode(tok, test[:args.ppl_chars])
    prefix = evaluate.prefix_token_id(tok)
    layers = list(range(0, teacher.config.n_layer, 2))
    student0 = keep_layers(teacher.model, layers)
    save_model(tmp / "student0", student0, tok, teacher.generation_config)
    sizes = {"teacher_non_embedding": non_embedding_params(teacher.model),
             "student_non_embedding": non_embedding_params(student0), "kept_layers": layers}
    print(f"student: {len(layers)} of {teacher.config.n_layer} blocks, {sizes['student_non_embedding']:,} of "
          f"{sizes['teacher_non_embedding']:,} non-embedding parameters", file=sys.stderr)

    def score(path_or_lm, name) -> dict:
        lm = load_model(path_or_lm, dtype="float32") if isinstance(path_or_lm, (str, Path)) else path_or_lm
        t0 = time.time()
        r = evaluate.rolling_loglikelihood(lm.model, tokens, prefix, args.context, batch_size=4)
        hs = evaluate.evaluate_choice(lm, SHARED / "hellaswag" / "val_1000.jsonl", limit=args.eval_limit)
        row = {"name": name, "ppl": math.exp(-r["loglikelihood"] / r["tokens"]), "hellaswag_acc_norm": hs["acc_norm"],
               "hellaswag_ci": hs.get("acc_norm_ci"), "eval_seconds": round(time.time() - t0, 1)}
        print(f"{name:<28} ppl {row['ppl']:8.2f}  HellaSwag acc_norm {row['hellaswag_acc_norm']:.3f}",
              file=sys.stderr, flush=True)
        return row

    runs, reused = {}, None
    plan = (("ce_only", 0.0), ("kd", args.alpha))
    if args.reuse_ce:
        reused = json.loads(Path(args.reuse_ce).read_text())
        same = ("minutes", "lr", "block", "batch_size", "eval_every", "ppl_chars", "context", "eval_limit", "threads")
        differ = [k for k in same if reused["args"].get(k) != getattr(args, k)]
        if differ:
            sys.exit(f"--reuse-ce {args.reuse_ce}: its {', '.join(differ)} differ from this run's")
        runs["ce_only"] = reused["runs"]["ce_only"]
        plan = plan[1:]
    for name, alpha in plan:
        out = tmp / name
        dc = DistillConfig(teacher="default", data=str(SHARED / "wikitext-2" / "valid.txt"), out=str(out),
                           student=str(tmp / "student0"), loss=args.loss, temperature=args.temperature, alpha=alpha,
                           task="text", val_data=str(tmp / "val.txt"), max_length=args.block,
                           batch_size=args.batch_size, progress=False, report=False, top_k=args.top_k,
                           teacher_cache=(args.cache_dir or str(tmp / "cache"))
                           if args.teacher_cache and alpha > 0 else None)
        tc = TrainConfig(max_steps=100000, max_time=args.minutes * 60, lr=args.lr, min_lr=args.lr, warmup_steps=5,
                         weight_decay=0.0, eval_every=args.eval_every, log_every=args.eval_every, out=str(out),
                         progress=False)
        t0 = time.time()
        res = distill(dc, tc)
        curve = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {"alpha": alpha, "steps": res["step"], "train_seconds": round(res["time"], 1),
                      "run_seconds": round(time.time() - t0, 1),
                      "teacher": "top-k cache" if dc.teacher_cache else ("on the fly" if alpha > 0 else "none"),
                      "temperature": args.temperature, "loss": args.loss,
                      "final_val_ce": res.get("val_ce"),
                      "curve": [{"step": r["step"], "time": r["time"], "val_ce": r["val_ce"]}
                                for r in curve if "val_ce" in r]}
        print(f"{name}: {res['step']} steps in {runs[name]['train_seconds']} s, val_ce {res.get('val_ce')}",
              file=sys.stderr, flush=True)

    if reused:  # the teacher, the untrained student and the CE-only student as scored in that run
        rows = [*reused["rows"][:3], score(tmp / "kd", f"student KD ({args.loss})")]
    else:
        rows = [score(teacher, "teacher (30 blocks)"), score(tmp / "student0", "student before training"),
                score(tmp / "ce_only", "student CE only"), score(tmp / "kd", f"student KD ({args.loss})")]
    png = Path(args.out).with_suffix(".png")
    plot(runs, png)
    ce, kd = rows[2], rows[3]
    result = {
        "benchmark": f"distilling the default model into {len(layers)} of its blocks, {args.minutes} min per run; "
                     f"WikiText-2 test ppl on the first {args.ppl_chars} characters ({len(tokens)} tokens), "
                     f"HellaSwag acc_norm on the first {args.eval_limit} items",
        "command": "flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/compress_distill.py"
                   + "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                             for k, v in vars(args).items() if v != ap.get_default(k)),
        "args": vars(args), "sizes": sizes, "runs": runs, "rows": rows,
        "ce_reused_from": reused["command"] if reused else None,
        "kd_vs_ce_ppl_ratio": kd["ppl"] / ce["ppl"],
        "kd_minus_ce_acc_norm": kd["hellaswag_acc_norm"] - ce["hellaswag_acc_norm"],
        "plot": str(png.relative_to(ROOT)), "torch_threads": torch.get_num_threads(),
        "load_before": load_before, "load_after": uptime(), "seconds": round(time.time() - t_start, 1),
        "note": f"budget {args.minutes} min of training per run (the issue asks ~20), including each run's "
                "validation; run_seconds - train_seconds is loading (and, with --teacher-cache, building the cache "
                "once: " + (f"top-{args.top_k}" if args.teacher_cache else "not used") + ")",
    }
    write_results(args.out, result)
    print("\n| model | WikiText-2 ppl | HellaSwag acc_norm |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['ppl']:.2f} | {r['hellaswag_acc_norm']:.3f} |")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in runs.items():
        label = "CE only" if name == "ce_only" else \
            f"KD ({r.get('loss', 'forward_kl')}, T {r.get('temperature', 2.0):g}, alpha {r['alpha']}, {r['teacher']})"
        ax.plot([p["time"] / 60 for p in r["curve"]], [p["val_ce"] for p in r["curve"]], "o-", ms=3,
                label=f"{label}: {r['steps']} steps")
    ax.set_xlabel("training time (minutes, same budget)")
    ax.set_ylabel("held-out cross-entropy (WikiText-2 test slice)")
    ax.set_title("Half-depth student of SmolLM2-135M: CE only vs distillation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
