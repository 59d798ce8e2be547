"""The before/after report of model compression (quantize, prune, distill) and `llmkit compare`.

    rows = [measure("default"), measure("pruned/", run_seconds=312.0)]
    print(render(rows))
    write_report("pruned/", rows)          # compress_report.json + compress_report.md

Each row measures one model folder (or .gguf file, or "default", the default model's bf16 folder): the weights it runs
in (a float folder in float32 on a CPU, a quantized one in its own format; `dtype` overrides), parameters and non-zero
parameters (a quantized layer counts its logical in_features x out_features weights, its non-zero ones those of its
dequantized matrix), bytes of the weight files on disk, peak RSS and decode tokens/s (llmkit.compress.probe: a fresh
process per row, same prompt, tokens and threads, best of 3), WikiText-2 test perplexity (evaluate_perplexity,
lm-eval's rolling windows) on the first `ppl_chars` characters, HellaSwag acc_norm (evaluate_choice) on the first
`eval_limit` items, and the run time of the compression that produced it. The default sizes (EVAL_LIMIT, PPL_CHARS,
DECODE_TOKENS) make a report of two rows of the default model take about a minute on a 2-core CPU. The data comes from
the caller (the commands' --wikitext / --hellaswag flags); without a file, the small excerpts shipped in
llmkit/eval/data/ are scored, which shows the report works but is no benchmark. Metrics a model cannot have (an
encoder has no perplexity, a folder without a tokenizer cannot read text) are None and the row says why in "notes".

A measured row is cached in $LLMKIT_HOME/compress_report/<key>.json, the key a hash of the model's content (its weight,
config and tokenizer files), the data files' content, every setting that changes a figure (dtype, sizes, context,
decode tokens, threads), this CPU, torch's and llmkit's versions and MEASURE_VERSION: the same base model is measured
once, and every later report (quantize, prune, distill or compare, any folder holding the same bytes) reads it; the
row says so ("cached"). Entries are written atomically; one that cannot be read is ignored and measured again.
`use_cache=False` (--no-cache) measures again and refreshes the entry.

Progress: with progress=True each stage of a row is one plain line on stderr ("[report 12.3 s] before: perplexity,
..."), terminal or not (a log file or a pipe gets whole lines); off a terminal a stage still running says so every
30 s, on a terminal the evaluation's bars show.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from llmkit.compress.probe import PROBE_REPEATS, probe
from llmkit.eval.evaluate import HELLASWAG_SAMPLE, WIKITEXT_SAMPLE, evaluate_choice, evaluate_perplexity
from llmkit.model.auto_dtype import cpu_flags
from llmkit.model.checkpoint import default_model_dir, llmkit_home, load_model
from llmkit.model.quant import QuantLinear
from llmkit.utils.io import read_utf8, write_atomic, write_json

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
# the files whose bytes make a model what it is (the cache key): weights, config and tokenizer
CONTENT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# the default sizes (the commands' flags repeat them): a two-row report of the default model in about a minute here
EVAL_LIMIT = 20
PPL_CHARS = 4_000
DECODE_TOKENS = 32
CACHE_DIR = "compress_report"
MEASURE_VERSION = 3  # bumped when what a row holds or how it is measured changes: older cache entries are not read

COLUMNS = [  # (key, header, format)
    ("name", "model", "{}"),
    ("weights", "weights", "{}"),
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
    return str({"wikitext": WIKITEXT_SAMPLE, "hellaswag": HELLASWAG_SAMPLE}[kind])


def weight_bytes(spec) -> int:
    """Bytes of the weight files of a model folder (or the size of a single .gguf file)."""
    p = _resolve(spec)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
               and not f.name.startswith("."))


def count_params(model) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a module, tied tensors counted once. A quantized layer (int8/int4) counts
    its logical in_features x out_features weights and its bias, not its packed bytes; its non-zero weights are
    those of its dequantized matrix (one layer at a time). A layer shared by a tied embedding and head counts once."""
    total = nonzero = 0
    with torch.no_grad():
        for m in model.modules():  # each module once, however many names it has
            if isinstance(m, QuantLinear):
                w = m.dequantize()
                total += w.numel() + (0 if m.bias is None else m.bias.numel())
                nonzero += int(torch.count_nonzero(w)) + (0 if m.bias is None else int(torch.count_nonzero(m.bias)))
                del w
        seen = set()
        for p in model.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
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


def weights_kind(model, path) -> str:
    """What the row's model runs in: "int8", "int4 g32", or its float dtype, with the file's when it differs."""
    qc = model.__dict__.get("quantization_config")
    if qc:
        return qc.get("method", "quantized") + (f" g{qc['group_size']}" if qc.get("group_size") else "")
    running = str(next(model.parameters()).dtype).split(".")[-1]
    stored = storage_dtype(path)
    return running if stored in (None, running) else f"{running} (file {stored})"


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


# ---------------------------------------------------------------------------------------------------------------
# the cache of measured rows


def _sha256(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def content_hash(spec) -> str:
    """SHA-256 of what makes a model what it is: a .gguf file's bytes, or a folder's weight, config and tokenizer
    files (names and bytes; run logs, checkpoints and reports beside them do not count)."""
    p = _resolve(spec)
    if p.is_file():
        return _sha256([p])
    return _sha256(sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                          and (f.name.endswith(WEIGHT_SUFFIXES) or f.name in CONTENT_FILES)))


def _llmkit_version() -> str:
    try:
        return version("llmkit")
    except PackageNotFoundError:
        return "unknown"


def cache_key(spec, settings: dict) -> tuple[str, dict]:
    """(key, what it hashes) of a row: the model's content, the data files' content, the settings, the machine."""
    parts = {"measure_version": MEASURE_VERSION, "llmkit": _llmkit_version(), "torch": torch.__version__,
             "cpu": cpu_flags(), "model": content_hash(spec), "probe_repeats": PROBE_REPEATS}
    for k, v in sorted(settings.items()):
        parts[k] = _sha256([Path(v)]) if k in ("wikitext", "hellaswag") and v else v
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], parts


def cache_path(key: str) -> Path:
    return llmkit_home() / CACHE_DIR / f"{key}.json"


def read_cache(key: str) -> dict | None:
    """The cached entry {"key", "parts", "measured_at", "row"}, or None (absent, unreadable or not an entry)."""
    try:
        entry = json.loads(cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("row"), dict):
        return None
    return entry


def _write_cache(key: str, parts: dict, row: dict) -> None:
    keep = {k: v for k, v in row.items() if k not in ("name", "path", "run_seconds", "cached", "measure_seconds")}
    try:
        cache_path(key).parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_path(key), {"key": key, "parts": parts, "measured_at": row["measured_at"], "row": keep})
    except OSError as e:  # a read-only home costs the cache, never the report
        print(f"[report] could not write the cache ({e})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# measuring a row


class _Say:
    """One plain progress line per stage on stderr, with the seconds since the row began; off a terminal (where no bar
    shows) a stage still running after `every` seconds says so every `every` seconds. A `last` line starts no stage;
    stop() ends the running one."""

    def __init__(self, on: bool, name: str, every: float = 30.0):
        self.on, self.name, self.every, self.t0 = on, name, every, time.time()
        self._stopped: threading.Event | None = None

    def _line(self, msg: str):
        print(f"[report {time.time() - self.t0:5.1f} s] {self.name}: {msg}", file=sys.stderr, flush=True)

    def __call__(self, msg: str, last: bool = False):
        self.stop()
        if not self.on:
            return
        self._line(msg)
        if not last and not sys.stderr.isatty():
            stopped = self._stopped = threading.Event()

            def beat():
                while not stopped.wait(self.every):
                    self._line(f"{msg}: still running")

            threading.Thread(target=beat, daemon=True).start()

    def stop(self):
        if self._stopped is not None:
            self._stopped.set()
            self._stopped = None


def measure(spec, *, name: str | None = None, wikitext: str | None | bool = None, hellaswag: str | None | bool = None,
            eval_limit: int = EVAL_LIMIT, ppl_chars: int = PPL_CHARS, context: int = 1024,
            decode_tokens: int = DECODE_TOKENS, run_seconds: float | None = None, dtype: str | None = None,
            progress: bool = False, use_cache: bool = True) -> dict:
    """One report row for a model folder / .gguf file / "default".

    wikitext / hellaswag: a file, None for the excerpt shipped with llmkit (default_data), or False to skip that
    metric. eval_limit: HellaSwag items; ppl_chars: characters of WikiText scored (whole lines); context: perplexity
    window (capped by the model's positions); decode_tokens: tokens each timed generation decodes. dtype: what to
    load the model in (default: a float folder in float32 on a CPU, a quantized one in its format). use_cache: read
    the row from the cache when its key matches (it is written either way).
    """
    if eval_limit < 1 or ppl_chars < 1 or decode_tokens < 1 or context < 2:
        raise ValueError("eval_limit, ppl_chars and decode_tokens must be >= 1 and context >= 2")
    wikitext = default_data("wikitext") if wikitext is None else wikitext
    hellaswag = default_data("hellaswag") if hellaswag is None else hellaswag
    for f in (wikitext, hellaswag):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"data file not found: {f}")
    t0 = time.time()
    path = _resolve(spec)
    name = name or (str(spec) if str(spec) == "default" else path.name)
    say = _Say(progress, name)
    threads = torch.get_num_threads()
    key, parts = cache_key(path, dict(dtype=dtype, wikitext=wikitext, hellaswag=hellaswag, eval_limit=eval_limit,
                                      ppl_chars=ppl_chars, context=context, decode_tokens=decode_tokens,
                                      threads=threads))
    entry = read_cache(key) if use_cache else None
    if entry:
        row = {**entry["row"], "name": name, "path": str(path), "run_seconds": run_seconds, "cached": True}
        row.update({k: str(v) for k, v in (("wikitext_data", wikitext), ("hellaswag_data", hellaswag))
                    if row.get(k)})  # the same bytes, maybe under another path now
        row["measure_seconds"] = time.time() - t0
        say(f"read from the cache ({cache_path(key)}, measured {entry['measured_at']})", last=True)
        return row
    try:
        row = _score(path, name, dtype, wikitext, hellaswag, eval_limit, ppl_chars, context, say, progress)
        say(f"peak RSS and decode speed: a fresh process decodes {decode_tokens} tokens x {PROBE_REPEATS}, "
            f"{threads} threads")
        row.update(probe(path, decode_tokens, dtype, threads))
    finally:
        say.stop()
    row.update(decode_tokens=decode_tokens, run_seconds=run_seconds, cached=False,
               measured_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    row["measure_seconds"] = time.time() - t0
    _write_cache(key, parts, row)
    say(f"done in {row['measure_seconds']:.0f} s", last=True)
    return row


def _score(path, name, dtype, wikitext, hellaswag, eval_limit, ppl_chars, context, say, progress) -> dict:
    """The in-process half of a row: load, count, perplexity, HellaSwag."""
    say(f"loading {path}")
    lm = load_model(str(path), dtype=dtype)
    cfg = lm.model.config
    params, nonzero = count_params(lm.model)
    row = {"name": name, "path": str(path), "weights": weights_kind(lm.model, path), "params": params,
           "nonzero_params": nonzero, "sparsity": 1 - nonzero / params, "file_mb": weight_bytes(path) / 2**20,
           "peak_rss_mb": None, "decode_tok_s": None, "wikitext_ppl": None, "hellaswag_acc_norm": None,
           "eval_limit": eval_limit, "ppl_chars": ppl_chars, "notes": []}
    lm_ok = cfg.causal and not cfg.num_labels
    if not lm_ok:
        row["notes"].append("not a causal LM: no perplexity, HellaSwag or decode rate")
    elif lm.tokenizer is None:
        row["notes"].append("no tokenizer.json: no perplexity or HellaSwag")
    bars = progress and sys.stderr.isatty()  # tqdm bars rewrite one line: on a terminal only
    if lm_ok and lm.tokenizer is not None and wikitext:
        lines = _ppl_lines(wikitext, ppl_chars)
        say(f"WikiText-2 perplexity, {lines:,} lines (up to {ppl_chars:,} characters) of {Path(wikitext).name}")
        r = evaluate_perplexity(lm, wikitext, context=min(context, cfg.max_position_embeddings), limit=lines,
                                progress=bars)
        row.update(wikitext_ppl=r["token_perplexity"], wikitext_data=str(wikitext), wikitext_tokens=r["n_tokens"],
                   wikitext_context=r["context"])
    if lm_ok and lm.tokenizer is not None and hellaswag:
        say(f"HellaSwag acc_norm, up to {eval_limit} items of {Path(hellaswag).name}")
        r = evaluate_choice(lm, hellaswag, limit=eval_limit, progress=bars)
        row.update(hellaswag_acc_norm=r["acc_norm"], hellaswag_ci=r.get("acc_norm_ci"), hellaswag_data=str(hellaswag),
                   hellaswag_n=r["n"])
    del lm
    return row


# ---------------------------------------------------------------------------------------------------------------
# the table


def render(rows: list[dict], notes: list[str] | None = None) -> str:
    """The rows as a markdown table (missing metrics as "-"), then any notes as a list."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("name", "weights") else "---:" for k, _, _ in COLUMNS) + "|"]
    for r in rows:
        cells = []
        for k, _, fmt in COLUMNS:
            v = r.get(k)
            cells.append("-" if v is None else fmt.format(v) + (" (cached)" if k == "name" and r.get("cached") else ""))
        lines.append("| " + " | ".join(cells) + " |")
    all_notes = list(notes or [])
    for r in rows:
        all_notes += [f"{r['name']}: {n}" for n in r.get("notes", [])]
    all_notes += _method_notes(rows)
    if all_notes:
        lines += [""] + [f"- {n}" for n in all_notes]
    return "\n".join(lines)


def _method_notes(rows: list[dict]) -> list[str]:
    """How the figures were taken: the data and sizes, the probe, rows read from the cache, busy machines."""
    out = []
    r0 = next((r for r in rows if r.get("wikitext_tokens")), None)
    if r0:
        out.append(f"perplexity: token perplexity of the first {r0['wikitext_tokens']:,} tokens of "
                   f"{Path(r0['wikitext_data']).name} (whole lines up to --ppl-chars {r0.get('ppl_chars', 0):,} "
                   f"characters), {r0['wikitext_context']}-token windows")
    r0 = next((r for r in rows if r.get("hellaswag_n")), None)
    if r0:
        out.append(f"HellaSwag: 0-shot acc_norm on the first {r0['hellaswag_n']} items of "
                   f"{Path(r0['hellaswag_data']).name} (--eval-limit {r0.get('eval_limit', r0['hellaswag_n'])})")
    r0 = next((r for r in rows if r.get("probe_threads")), None)
    if r0:
        out.append(f"peak RSS and decode tok/s: each row in a fresh process that loads the model and decodes "
                   f"{r0.get('decode_tokens', '?')} tokens greedily (batch 1, the same 4-token prompt, "
                   f"{r0['probe_threads']} threads), fastest of {r0.get('probe_repeats', '?')} runs")
    for r in rows:
        if r.get("cached"):
            out.append(f"{r['name']}: read from the cache, measured {r.get('measured_at', '?')} with the same weights, "
                       "data and settings (--no-cache measures again)")
        load, own = r.get("load_avg"), r.get("probe_threads") or 1
        if load is not None and load > _cpu_count() + own:  # the report's own last minute counts about `own`
            out.append(f"{r['name']}: measured on a busy machine (load average {load:.1f} on {_cpu_count()} cores): "
                       "its decode rate is lower than an idle machine's")
    return out


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_report(out_dir, rows: list[dict], notes: list[str] | None = None, command: str | None = None) -> Path:
    """compress_report.json (rows, notes, command) and compress_report.md in out_dir; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = command or " ".join(["llmkit"] + sys.argv[1:])
    write_json(out / "compress_report.json", {"rows": rows, "notes": notes or [], "command": command})
    write_atomic(out / "compress_report.md", render(rows, notes) + f"\n\ncommand: `{command}`\n")
    return out / "compress_report.json"
