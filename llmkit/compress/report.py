"""The before/after report of model compression (quantize, prune, distill) and `llmkit compare`.

    rows = [measure("default"), measure("pruned/", run_seconds=312.0)]
    print(render(rows))
    write_report("pruned/", rows)          # compress_report.json + compress_report.md

Each row measures one model folder (or .gguf file, or "default"): parameters, non-zero parameters, bytes of the
weight files on disk, peak RSS of a fresh process that loads the model and decodes, decode tokens/s (greedy, batch 1),
WikiText-2 test perplexity (evaluate.evaluate_perplexity, lm-eval's rolling windows) on the first `ppl_chars`
characters, HellaSwag acc_norm (evaluate.evaluate_choice) on the first `eval_limit` items, and the run time of the
compression that produced it. The data comes from the caller (the commands' --wikitext / --hellaswag flags); without
a file, the small excerpts shipped in llmkit/eval/data/ are scored, which shows the report works but is no
benchmark. Metrics a model cannot have (an encoder has no perplexity, a folder without a tokenizer cannot read text)
are None and the row says why in "notes".
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
from llmkit.model.checkpoint import default_model_dir, load_model
from llmkit.utils.io import read_utf8, write_atomic, write_json

# the folder holding this copy of the llmkit package: the probe's subprocess imports the same copy
IMPORT_ROOT = Path(__file__).resolve().parents[2]
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")

COLUMNS = [  # (key, header, format)
    ("name", "model", "{}"),
    ("params", "params", "{:,}"),
    ("nonzero_params", "non-zero", "{:,}"),
    ("file_mb", "file MB", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("wikitext_ppl", "WikiText-2 ppl", "{:.2f}"),
    ("hellaswag_acc_norm", "HellaSwag acc_norm", "{:.3f}"),
    ("run_seconds", "run time s", "{:.0f}"),
]


def default_data(kind: str) -> str:
    """The excerpt shipped with llmkit that the report scores when no file is given: "wikitext" (4 KB of WikiText-2
    test) or "hellaswag" (8 HellaSwag items)."""
    from llmkit.eval.evaluate import HELLASWAG_SAMPLE, WIKITEXT_SAMPLE  # imported here: see measure()

    return str({"wikitext": WIKITEXT_SAMPLE, "hellaswag": HELLASWAG_SAMPLE}[kind])


def weight_bytes(spec) -> int:
    """Bytes of the weight files of a model folder (or the size of a single .gguf file)."""
    p = _resolve(spec)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
               and not f.name.startswith("."))


def count_params(model) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a module, tied tensors counted once."""
    seen, total, nonzero = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        nonzero += int((p != 0).sum())
    return total, nonzero


def non_embedding_params(model) -> int:
    """Parameters outside the token/position embeddings and the LM head."""
    skip = ("embed_tokens.", "embed_positions.", "embed_types.", "lm_head.")
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def storage_dtype(spec) -> str | None:
    """The dtype a model folder stores its weights in ("bfloat16", "float16", "float32"), or None if unknown;
    compressed copies are saved in it so that file sizes compare like with like."""
    try:
        p = _resolve(spec)
        dt = json.loads((p / "config.json").read_text()).get("torch_dtype") if p.is_dir() else None
    except (OSError, ValueError):
        return None
    return dt if dt in ("bfloat16", "float16", "float32") else None


def _resolve(spec) -> Path:
    if str(spec) == "default":
        return default_model_dir()
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {spec}")
    return p


def _ppl_lines(path, chars: int) -> int:
    """How many whole lines of the file fit in `chars` characters (at least one)."""
    n, total = 0, 0
    for line in read_utf8(path).splitlines(keepends=True):
        if n and total + len(line) > chars:
            break
        n, total = n + 1, total + len(line)
    return n


def probe(spec, decode_tokens: int = 64, dtype=None) -> dict:
    """Load and decode in a fresh Python process: its peak RSS and the decode rate (greedy, batch 1, EOS ignored)."""
    # the same number of threads as the caller: rates measured side by side stay comparable
    code = ("import json,sys,torch; torch.set_num_threads(int(sys.argv[4])); "
            "from llmkit.compress.report import _probe_main; "
            "print(json.dumps(_probe_main(sys.argv[1], int(sys.argv[2]), sys.argv[3] or None)))")
    path = os.pathsep.join([str(IMPORT_ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x])
    env = {**os.environ, "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", code, str(spec), str(decode_tokens), dtype or "",
                        str(torch.get_num_threads())], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"measuring {spec} in a subprocess failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _probe_main(spec: str, decode_tokens: int, dtype: str | None) -> dict:
    import resource

    torch.manual_seed(0)
    lm = load_model(spec, dtype=dtype)
    out = {"decode_tok_s": None}
    if lm.model.config.causal and not lm.model.config.num_labels:
        engine = Engine(lm.model, lm.tokenizer, lm.generation_config)
        prompt = [lm.config.bos_token_id if lm.config.bos_token_id >= 0 else 0] + [1, 2, 3]
        params = SamplingParams(temperature=0.0, max_new_tokens=decode_tokens, ignore_eos=True)
        engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))  # warm-up
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            n = len(engine.generate([prompt], params)[0].token_ids)
            best = min(best, time.perf_counter() - t0)
        out["decode_tok_s"] = n / best
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return out


def measure(spec, *, name: str | None = None, wikitext: str | None | bool = None, hellaswag: str | None | bool = None,
            eval_limit: int = 100, ppl_chars: int = 100_000, context: int = 1024, decode_tokens: int = 64,
            run_seconds: float | None = None, dtype: str | None = None, progress: bool = False) -> dict:
    """One report row for a model folder / .gguf file / "default".

    wikitext / hellaswag: a file, None for the excerpt shipped with llmkit (default_data), or False to skip that
    metric. eval_limit: HellaSwag items; ppl_chars: characters of WikiText scored (whole lines); context: perplexity
    window (capped by the model's positions).
    """
    # imported here, not above: the probe's subprocess imports this module, and its peak RSS is what it measures
    from llmkit.eval.evaluate import evaluate_choice, evaluate_perplexity

    if eval_limit < 1 or ppl_chars < 1 or decode_tokens < 1 or context < 2:
        raise ValueError("eval_limit, ppl_chars and decode_tokens must be >= 1 and context >= 2")
    wikitext = default_data("wikitext") if wikitext is None else wikitext
    hellaswag = default_data("hellaswag") if hellaswag is None else hellaswag
    for f in (wikitext, hellaswag):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"data file not found: {f}")
    t0 = time.time()
    path = _resolve(spec)
    lm = load_model(str(path), dtype=dtype)
    cfg = lm.model.config
    params, nonzero = count_params(lm.model)
    row = {"name": name or (str(spec) if str(spec) == "default" else path.name), "path": str(path),
           "params": params, "nonzero_params": nonzero, "sparsity": 1 - nonzero / params,
           "file_mb": weight_bytes(path) / 2**20, "peak_rss_mb": None, "decode_tok_s": None, "wikitext_ppl": None,
           "hellaswag_acc_norm": None, "run_seconds": run_seconds, "notes": []}
    lm_ok = cfg.causal and not cfg.num_labels
    if not lm_ok:
        row["notes"].append("not a causal LM: no perplexity, HellaSwag or decode rate")
    elif lm.tokenizer is None:
        row["notes"].append("no tokenizer.json: no perplexity or HellaSwag")
    if lm_ok and lm.tokenizer is not None and wikitext:
        lines = _ppl_lines(wikitext, ppl_chars)
        r = evaluate_perplexity(lm, wikitext, context=min(context, cfg.max_position_embeddings), limit=lines,
                                progress=progress)
        row.update(wikitext_ppl=r["token_perplexity"], wikitext_data=str(wikitext), wikitext_tokens=r["n_tokens"],
                   wikitext_context=r["context"])
    if lm_ok and lm.tokenizer is not None and hellaswag:
        r = evaluate_choice(lm, hellaswag, limit=eval_limit, progress=progress)
        row.update(hellaswag_acc_norm=r["acc_norm"], hellaswag_ci=r.get("acc_norm_ci"), hellaswag_data=str(hellaswag),
                   hellaswag_n=r["n"])
    del lm
    row.update(probe(path, decode_tokens, dtype))
    row["measure_seconds"] = time.time() - t0
    return row


def render(rows: list[dict], notes: list[str] | None = None) -> str:
    """The rows as a markdown table (missing metrics as "-"), then any notes as a list."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if k == "name" else "---:" for k, _, _ in COLUMNS) + "|"]
    for r in rows:
        cells = []
        for k, _, fmt in COLUMNS:
            v = r.get(k)
            cells.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    all_notes = list(notes or [])
    for r in rows:
        all_notes += [f"{r['name']}: {n}" for n in r.get("notes", [])]
    if rows and any(r.get("wikitext_tokens") for r in rows):
        r0 = next(r for r in rows if r.get("wikitext_tokens"))
        all_notes.append(f"perplexity: token perplexity of the first {r0['wikitext_tokens']:,} tokens of "
                         f"{Path(r0['wikitext_data']).name}, {r0['wikitext_context']}-token windows")
    if rows and any(r.get("hellaswag_n") for r in rows):
        r0 = next(r for r in rows if r.get("hellaswag_n"))
        all_notes.append(f"HellaSwag: 0-shot acc_norm on the first {r0['hellaswag_n']} items of "
                         f"{Path(r0['hellaswag_data']).name}")
    if all_notes:
        lines += [""] + [f"- {n}" for n in all_notes]
    return "\n".join(lines)


def write_report(out_dir, rows: list[dict], notes: list[str] | None = None, command: str | None = None) -> Path:
    """compress_report.json (rows, notes, command) and compress_report.md in out_dir; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(["llmkit"] + sys.argv[1:])
    write_json(out / "compress_report.json", {"rows": rows, "notes": notes or [], "command": command})
    write_atomic(out / "compress_report.md", render(rows, notes) + f"\n\ncommand: `{command}`\n")
    return out / "compress_report.json"
