"""The review queue: what the policy's `flag` action sends to people (`llmkit guard review`).

A Guard with a ReviewQueue (`guard.review`) writes every text it flags (an input, or a finished output) to a SQLite
database: the text, direction, policy, categories, findings and request id. A reviewer marks each item `allowed` or
`blocked` with a note; `export_labeled` writes the decisions in the JSONL `llmkit guard eval` reads (`read_labeled`):
a blocked item keeps its flagged findings as gold entities, an allowed one has none (its findings were false
alarms), so reviews become test data for the next policy.

Thread safety: WAL mode, one connection per thread, a busy timeout, and one lock around writes from this process, so
the server's threads never see "database is locked".
"""
from __future__ import annotations

import contextvars
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

DECISIONS = ("allowed", "blocked")
REQUEST_ID: contextvars.ContextVar = contextvars.ContextVar("llmkit_review_request_id", default=None)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    request_id TEXT,
    direction TEXT NOT NULL,
    policy TEXT,
    action TEXT NOT NULL,
    categories TEXT NOT NULL,
    findings TEXT NOT NULL,
    text TEXT NOT NULL,
    decision TEXT,
    note TEXT NOT NULL DEFAULT '',
    decided REAL
)"""


def default_review_db() -> Path:
    """$LLMKIT_HOME/review.db (LLMKIT_HOME defaults to ~/.cache/llmkit)."""
    return Path(os.environ.get("LLMKIT_HOME") or Path.home() / ".cache" / "llmkit") / "review.db"


class ReviewQueue:
    """Flagged items in a SQLite database; safe to share between threads."""

    def __init__(self, path, policy: str | None = None):
        self.path = Path(path)
        self.policy = policy  # recorded with each item: which policy flagged it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write = threading.Lock()
        try:
            with self._write:
                db = self._db()
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
                db.commit()
        except sqlite3.Error as e:
            raise ValueError(f"cannot open the review database {self.path}: {e}") from None

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    # -----------------------------------------------------------------------------------------------------------
    def record(self, guard, text: str, findings: list, direction: str, request_id: str | None = None) -> int | None:
        """Queue text if any finding's action is `flag` (called by Guard); the new item's id, or None."""
        flagged = [f for f in findings if guard.action_for(f, direction) == "flag"]
        if not flagged:
            return None
        rank = {"allow": 0, "flag": 1, "redact": 2, "refuse": 3}
        action = max((guard.action_for(f, direction) for f in findings), key=rank.__getitem__)
        return self.add(text, direction, flagged, action=action,
                        request_id=request_id if request_id is not None else REQUEST_ID.get())

    def add(self, text: str, direction: str, findings: list, action: str = "flag", request_id: str | None = None,
            policy: str | None = None) -> int:
        """Queue one item; findings are Finding objects or dicts with type, start, end (and category, text)."""
        rows = [f.to_dict() if hasattr(f, "to_dict") else dict(f) for f in findings]
        cats = sorted({r.get("category") or r["type"] for r in rows})
        with self._write:
            db = self._db()
            cur = db.execute("INSERT INTO items (created, request_id, direction, policy, action, categories, "
                             "findings, text) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (time.time(), request_id, direction, policy or self.policy, action, json.dumps(cats),
                              json.dumps(rows, ensure_ascii=False), text))
            db.commit()
            return cur.lastrowid

    def items(self, status: str = "all", limit: int | None = None) -> list[dict]:
        """Items, oldest first; status: all | pending (no decision yet) | decided."""
        where = {"all": "", "pending": " WHERE decision IS NULL", "decided": " WHERE decision IS NOT NULL"}
        if status not in where:
            raise ValueError(f"status must be all, pending or decided, got {status!r}")
        sql = "SELECT * FROM items" + where[status] + " ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        return [self._item(r) for r in self._db().execute(sql).fetchall()]

    def get(self, item_id: int) -> dict | None:
        r = self._db().execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return self._item(r) if r is not None else None

    @staticmethod
    def _item(r) -> dict:
        d = dict(r)
        d["categories"], d["findings"] = json.loads(d["categories"]), json.loads(d["findings"])
        return d

    def decide(self, item_id: int, decision: str, note: str = "") -> dict:
        """Mark an item allowed or blocked with a note; the updated item. KeyError for an unknown id."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
        if not isinstance(note, str):
            raise ValueError("note must be a string")
        with self._write:
            db = self._db()
            cur = db.execute("UPDATE items SET decision = ?, note = ?, decided = ? WHERE id = ?",
                             (decision, note, time.time(), item_id))
            db.commit()
        if cur.rowcount == 0:
            raise KeyError(f"no review item {item_id}")
        return self.get(item_id)

    def counts(self) -> dict:
        rows = self._db().execute("SELECT decision, COUNT(*) FROM items GROUP BY decision").fetchall()
        out = {"pending": 0, "allowed": 0, "blocked": 0}
        for d, n in rows:
            out[d or "pending"] = n
        return out

    def export_labeled(self, path) -> int:
        """Write decided items as `guard eval` records ({text, entities, ...}); the number written."""
        from llmkit.utils.io import write_atomic

        lines = []
        for it in self.items("decided"):
            ents = [{"type": f["type"], "start": f["start"], "end": f["end"]} for f in it["findings"]
                    if it["decision"] == "blocked" and 0 <= f["start"] < f["end"] <= len(it["text"])]
            lines.append(json.dumps({"text": it["text"], "entities": ents, "decision": it["decision"],
                                     "note": it["note"], "direction": it["direction"], "policy": it["policy"],
                                     "request_id": it["request_id"], "review_id": it["id"]}, ensure_ascii=False))
        write_atomic(Path(path), "".join(x + "\n" for x in lines))
        return len(lines)

    def close(self):
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
