"""The review queue (issue 22, human review): texts the policy flags go to SQLite with their policy, categories,
findings and request id; reviewers' decisions export as `guard eval` data."""
import json
import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from llmkit.trust.guard import Guard, evaluate_guard, load_policy, read_labeled
from llmkit.trust.review import REQUEST_ID, ReviewQueue, default_review_db

POLICY = """\
pii:
  types: [email]
  input: redact
  output: redact
categories:
  weapons:
    block: [build a bomb]
    input: refuse
    output: refuse
  spam:
    block: [free money, crypto giveaway]
    input: flag
    output: flag
"""


@pytest.fixture()
def policy_file(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return p


@pytest.fixture()
def guard(policy_file, tmp_path):
    g = Guard(load_policy(policy_file))
    g.review = ReviewQueue(tmp_path / "review.db", policy=str(policy_file))
    return g


def test_a_flagged_input_is_queued_with_policy_categories_findings_and_request_id(guard, policy_file):
    token = REQUEST_ID.set("chatcmpl-abc")
    try:
        v = guard.check("FREE MONEY for bob@example.com")
    finally:
        REQUEST_ID.reset(token)
    assert v.action == "redact"  # the flag does not change what the guard does
    guard.check("hello there")  # nothing flagged: nothing queued
    guard.check("how to build a bomb")  # refused, not flagged: nothing queued
    assert guard.check("free money to build a bomb").refused  # refused (and flagged): the guard stopped it already
    [it] = guard.review.items()
    assert it["text"] == "FREE MONEY for bob@example.com" and it["direction"] == "input"
    assert it["request_id"] == "chatcmpl-abc" and it["policy"] == str(policy_file)
    assert it["categories"] == ["spam"] and it["action"] == "redact" and it["decision"] is None
    assert [(f["type"], f["start"], f["end"]) for f in it["findings"]] == [("spam", 0, 10)]
    db = sqlite3.connect(guard.review.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_flagged_output_is_queued_when_the_stream_ends(guard):
    sg = guard.stream()
    sg.request_id = "cmpl-1"
    out = "".join(sg.wrap(iter(["win a cry", "pto give", "away today"])))
    assert out == "win a crypto giveaway today"
    [it] = guard.review.items("pending")
    assert it["direction"] == "output" and it["text"] == out and it["request_id"] == "cmpl-1"
    assert it["categories"] == ["spam"] and it["findings"][0]["text"] == "crypto giveaway"


def test_guard_without_a_queue_writes_nothing(policy_file, tmp_path):
    g = Guard(load_policy(policy_file))
    assert g.check("free money").action == "flag" and not list(tmp_path.glob("*.db"))


def test_concurrent_writes_from_many_threads_all_land(guard):
    errors, barrier = [], threading.Barrier(8)

    def work(t):
        try:
            barrier.wait()
            for i in range(50):
                token = REQUEST_ID.set(f"r{t}-{i}")
                guard.check(f"thread {t} item {i}: free money")
                REQUEST_ID.reset(token)
                if i % 10 == 0:
                    guard.review.items("pending", limit=5)  # readers alongside the writers
        except Exception as e:  # "database is locked" would land here
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    items = guard.review.items()
    assert len(items) == 400
    assert {it["request_id"] for it in items} == {f"r{t}-{i}" for t in range(8) for i in range(50)}
    assert {it["text"] for it in items} == {f"thread {t} item {i}: free money" for t in range(8) for i in range(50)}


def test_two_queues_on_one_file_write_concurrently(tmp_path):
    """Two processes' worth of connections (two ReviewQueue objects) on one database: WAL and the busy timeout."""
    a, b = ReviewQueue(tmp_path / "r.db"), ReviewQueue(tmp_path / "r.db")
    errors = []

    def work(q, tag):
        try:
            for i in range(100):
                q.add(f"{tag}{i}", "input", [{"type": "spam", "start": 0, "end": 1}])
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(q, f"{k}-")) for k, q in enumerate((a, b, a, b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(a.items()) == 400


def test_decisions_are_checked(guard):
    guard.check("free money")
    [it] = guard.review.items()
    with pytest.raises(ValueError, match="allowed, blocked"):
        guard.review.decide(it["id"], "maybe")
    with pytest.raises(KeyError):
        guard.review.decide(999, "allowed")
    got = guard.review.decide(it["id"], "blocked", "scam")
    assert got["decision"] == "blocked" and got["note"] == "scam" and guard.review.items("pending") == []
    assert guard.review.counts() == {"pending": 0, "allowed": 0, "blocked": 1}


def test_review_db_defaults_under_llmkit_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path))
    assert default_review_db() == tmp_path / "review.db"


def llmkit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_reviews_export_as_guard_eval_data_round_trip(guard, policy_file, tmp_path):
    texts = ["free money for all", "get free money now", "a crypto giveaway", "tell me about free money laws"]
    for t in texts:
        guard.check(t)
    items = guard.review.items()
    assert [it["text"] for it in items] == texts
    for it, d in zip(items, ["blocked", "blocked", "blocked", "allowed"]):
        guard.review.decide(it["id"], d, f"note {it['id']}")
    out = tmp_path / "labeled.jsonl"
    r = llmkit("guard", "review", "--review-db", str(guard.review.path), "--export", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote 4 reviewed items" in r.stderr
    recs = read_labeled(out)  # the reader `guard eval` uses
    assert [r["text"] for r in recs] == texts
    assert recs[0]["entities"] == [{"type": "spam", "start": 0, "end": 10}] and recs[3]["entities"] == []
    raw = [json.loads(x) for x in out.read_text().splitlines()]
    assert raw[3]["decision"] == "allowed" and raw[3]["note"].startswith("note ")
    res = evaluate_guard(Guard(load_policy(policy_file)), recs)
    assert res["per_type"]["spam"] == {"tp": 3, "fp": 1, "fn": 0, "precision": 0.75, "recall": 1.0,
                                       "f1": 0.8571}  # the allowed item is the policy's false alarm
    r = llmkit("guard", "eval", "--data", str(out), "--policy", str(policy_file), "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["per_type"]["spam"]["fp"] == 1


def test_guard_check_review_db_flag_and_missing_db(policy_file, tmp_path):
    db = tmp_path / "home" / "review.db"
    r = llmkit("guard", "check", "free money", "--policy", str(policy_file), "--review-db", str(db))
    assert r.returncode == 0 and "action: flag" in r.stdout, r.stderr
    assert [it["text"] for it in ReviewQueue(db).items()] == ["free money"]
    r = llmkit("guard", "check", "free money", "--policy", str(policy_file), "--review-db",
               env={"LLMKIT_HOME": str(tmp_path / "home")})
    assert r.returncode == 0 and len(ReviewQueue(db).items()) == 2, r.stderr
    r = llmkit("guard", "review", "--review-db", str(tmp_path / "none.db"), "--export", str(tmp_path / "x.jsonl"))
    assert r.returncode == 2 and "no review database" in r.stderr and "Traceback" not in r.stderr, r.stderr
