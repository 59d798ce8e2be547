"""Human review over real HTTP (issue 22): `llmkit serve --guard --review-db` queues flagged inputs with the request
id; `llmkit guard review` serves the reviewer's API and page (the page in headless Chromium)."""
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llmkit.model.checkpoint import load_model
from llmkit.serve.app import BackgroundServer, ServeConfig
from llmkit.trust.review import ReviewQueue

from helpers import make_tiny_model

POLICY = """\
categories:
  spam:
    block: [free money]
    input: flag
    output: flag
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    p = tmp_path_factory.mktemp("review") / "policy.yaml"
    p.write_text(POLICY)
    return p


def test_the_server_queues_flagged_inputs_with_the_request_id(policy, tmp_path):
    tiny = load_model(make_tiny_model(tmp_path / "tiny"), dtype="float32")
    db = tmp_path / "review.db"
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_batch=4, guard=str(policy),
                                       review_db=str(db)))
    try:
        ids = []
        for k in range(3):
            body = {"messages": [{"role": "user", "content": f"free money {k}?"}], "max_tokens": 2}
            r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        srv.stop()
    items = ReviewQueue(db).items()
    assert [(it["text"], it["request_id"]) for it in items] == [(f"free money {k}?", i) for k, i in enumerate(ids)]
    assert all(it["policy"] == str(policy) and it["categories"] == ["spam"] for it in items)


@pytest.fixture()
def queue(tmp_path):
    q = ReviewQueue(tmp_path / "review.db", policy="p.yaml")
    q.add("free money for you", "input", [{"type": "spam", "category": "spam", "start": 0, "end": 10}],
          request_id="chatcmpl-1")
    q.add("<b>free money</b> again", "output", [{"type": "spam", "category": "spam", "start": 3, "end": 13}])
    return q


def review_server(db, *extra):
    """`llmkit guard review` on a free port: (process, url)."""
    p = subprocess.Popen([sys.executable, "-m", "llmkit", "guard", "review", "--review-db", str(db), "--port", "0",
                          *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = p.stdout.readline()
    assert " on http://" in line, (line, p.stderr.read() if p.poll() is not None else "")
    url = line.strip().rsplit(" ", 1)[1]
    for _ in range(200):  # the line comes just before uvicorn starts serving on the bound socket
        try:
            httpx.get(url + "/", timeout=5)
            break
        except httpx.TransportError:
            import time

            time.sleep(0.05)
    return p, url


@pytest.fixture()
def server(queue):
    p, url = review_server(queue.path)
    yield url
    p.terminate()
    p.wait(timeout=30)


def test_review_endpoints_list_and_decide(server, queue):
    r = httpx.get(f"{server}/api/review/items")
    assert r.status_code == 200
    body = r.json()
    assert [it["text"] for it in body["items"]] == ["free money for you", "<b>free money</b> again"]
    assert body["counts"] == {"pending": 2, "allowed": 0, "blocked": 0}
    first = body["items"][0]["id"]
    r = httpx.post(f"{server}/api/review/items/{first}", json={"decision": "allowed", "note": "a joke"})
    assert r.status_code == 200 and r.json()["decision"] == "allowed"
    assert queue.get(first)["note"] == "a joke"
    assert [it["id"] for it in httpx.get(f"{server}/api/review/items?status=decided").json()["items"]] == [first]
    assert len(httpx.get(f"{server}/api/review/items?status=pending").json()["items"]) == 1
    for path, body, status in [(f"/api/review/items/{first}", {"decision": "maybe"}, 400),
                               ("/api/review/items/999", {"decision": "blocked"}, 404),
                               (f"/api/review/items/{first}", {"decision": "blocked", "extra": 1}, 422)]:
        r = httpx.post(server + path, json=body)
        assert r.status_code == status, r.text
    assert httpx.get(f"{server}/api/review/items?status=bogus").status_code == 400
    assert queue.get(first)["decision"] == "allowed"


def test_review_api_key(queue):
    p, url = review_server(queue.path, "--api-key", "sekret")
    try:
        assert httpx.get(f"{url}/api/review/items").status_code == 401
        assert httpx.post(f"{url}/api/review/items/1", json={"decision": "blocked"}).status_code == 401
        assert httpx.get(f"{url}/").status_code == 200  # the page itself asks for the key
        auth = {"Authorization": "Bearer sekret"}
        assert len(httpx.get(f"{url}/api/review/items", headers=auth).json()["items"]) == 2
    finally:
        p.terminate()
        p.wait(timeout=30)
    assert queue.get(1)["decision"] is None


CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions",
        "--no-first-run", "--mute-audio"]


def test_review_page_in_chromium(server, queue):
    if not CHROMIUM.exists() or not __import__("importlib").util.find_spec("playwright"):
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI is set but /usr/bin/chromium or playwright is missing")
        pytest.skip("no /usr/bin/chromium here")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            pg = browser.new_page()
            pg.set_default_timeout(60_000)
            pg.goto(server + "/")
            items = pg.locator(".item")
            expect(items).to_have_count(2)
            expect(pg.locator("#counts")).to_have_text("2 pending, 0 allowed, 0 blocked")
            expect(items.nth(1).locator("mark")).to_have_text("free money")  # escaped: <b> shows as text
            expect(items.nth(1).locator(".text")).to_have_text("<b>free money</b> again")
            expect(items.nth(0).locator(".meta")).to_contain_text("chatcmpl-1")
            items.nth(0).locator(".note").fill("real spam")
            items.nth(0).locator(".decide-blocked").click()
            expect(pg.locator("#counts")).to_have_text("1 pending, 0 allowed, 1 blocked")
            expect(pg.locator(".item")).to_have_count(1)  # decided items leave the pending list
            pg.locator(".item .decide-allowed").click()
            expect(pg.locator("#items")).to_have_text("Nothing to review.")
            pg.select_option("#status", "decided")
            expect(pg.locator(".item")).to_have_count(2)
        finally:
            browser.close()
    got = {it["text"]: (it["decision"], it["note"]) for it in queue.items()}
    assert got == {"free money for you": ("blocked", "real spam"), "<b>free money</b> again": ("allowed", "")}
