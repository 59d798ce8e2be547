"""Measuring a guard: labelled records from JSONL, and precision, recall and F1 per PII type or category
(`llmkit guard eval`). Re-exported by llmkit.trust.guard."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmkit.trust.guard import Guard


def read_labeled(path) -> list[dict]:
    """Records {"text", "entities": [{"type", "start", "end"}]} of a JSONL file, validated line by line."""
    import json

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        lines = p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not isinstance(r.get("entities", []), list):
            raise ValueError(f"{path}:{n}: need {{\"text\": str, \"entities\": [{{\"type\", \"start\", \"end\"}}]}}")
        for e in r.get("entities", []):
            ok = isinstance(e, dict) and isinstance(e.get("type"), str) and all(
                isinstance(e.get(k), int) for k in ("start", "end"))
            if not ok or not 0 <= e["start"] < e["end"] <= len(r["text"]):
                raise ValueError(f"{path}:{n}: each entity needs a type and 0 <= start < end <= len(text)")
        out.append({"text": r["text"], "entities": r.get("entities", [])})
    if not out:
        raise ValueError(f"{path} has no records")
    return out


def evaluate_guard(guard: Guard, records: list[dict]) -> dict:
    """Precision, recall and F1 per type: a finding counts when a gold entity of the same type overlaps it."""
    import time

    stats: dict[str, Counter] = {}
    t0, size = time.perf_counter(), 0
    for r in records:
        text, gold = r["text"], r["entities"]
        size += len(text.encode())
        found = guard.scan(text)
        hit = set()
        for f in found:
            c = stats.setdefault(f.type, Counter())
            match = [j for j, e in enumerate(gold) if e["type"] == f.type and e["start"] < f.end and f.start < e["end"]]
            c["tp" if match else "fp"] += 1
            hit.update(match)
        for j, e in enumerate(gold):
            if j not in hit:
                stats.setdefault(e["type"], Counter())["fn"] += 1
    seconds = time.perf_counter() - t0

    def prf(c):
        p = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else 1.0
        rec = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else 1.0
        return {"tp": c["tp"], "fp": c["fp"], "fn": c["fn"], "precision": round(p, 4), "recall": round(rec, 4),
                "f1": round(2 * p * rec / (p + rec), 4) if p + rec else 0.0}

    per_type = {t: prf(c) for t, c in sorted(stats.items())}
    return {"n": len(records), "per_type": per_type, "micro": prf(sum(stats.values(), Counter())),
            "mb_per_s": round(size / 1e6 / max(seconds, 1e-9), 3), "seconds": round(seconds, 3)}
