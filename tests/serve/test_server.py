"""The OpenAI-compatible server: the official openai client against a live server on a loopback port.

Most tests use a tiny random Llama with a byte-level BPE tokenizer trained here (fast); one asks the real default
model (SmolLM2-135M-Instruct) for the capital of France.
"""
import json
import threading
import time

import httpx
import openai
import pytest

from llmkit.model.checkpoint import load_model
from llmkit.serve.app import BackgroundServer, ServeConfig

from helpers import CHATML, MSG, make_tiny_model  # noqa: F401


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")), dtype="float32")


@pytest.fixture(scope="module")
def server(tiny):
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_batch=16, max_queue=16))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI client: chat and completions


def test_chat_streaming_and_not(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content  # greedy: streamed pieces add up to the same reply
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason


def test_n_choices_stop_and_completions(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, n=3, seed=5, extra_body={
        "ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # different draws
    assert r.usage.completion_tokens == 48
    full = r.choices[0].message.content
    stop = full[3:5]
    cut = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, seed=5, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)]  # the stop string itself is not returned
    comp = client.completions.create(model="tiny", prompt=["The capital", "Hello"], max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert len(comp.choices) == 2 and comp.usage.completion_tokens == 10
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt="The capital", max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == comp.choices[0].text


def test_seed_same_alone_and_batched(client):
    def ask(seed):
        return client.chat.completions.create(model="tiny", messages=MSG, max_tokens=24, temperature=1.0, seed=seed,
                                              extra_body={"ignore_eos": True}).choices[0].message.content

    alone = ask(42)
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, ask(s))) for s in (42, 1, 2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[42] == alone
    assert len(set(results.values())) > 1


def test_logprobs_and_echo_scoring(server, client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy picks the top token
    # lm-evaluation-harness's local-completions scoring request: echo + logprobs, max_tokens 0, token-id prompts
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "The capital of France is Paris"}).json()
    comp = client.completions.create(model="tiny", prompt=[ids["tokens"]], max_tokens=0, echo=True, logprobs=1)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == ids["count"] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert comp.choices[0].text == "The capital of France is Paris"
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert back["prompt"] == "The capital of France is Paris"


def test_json_object_output_parses(client):
    for seed in (0, 1):
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=40, seed=seed,
                                           response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)  # even a random model writes valid JSON


# ---------------------------------------------------------------------------------------------------------------
# Concurrency, limits, cancellation


def test_16_concurrent_streams(server, client):
    out = {}

    def stream(i):
        s = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"number {i}"}],
                                           max_tokens=20, seed=i, stream=True, extra_body={"ignore_eos": True})
        chunks = list(s)
        out[i] = ("".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(out) == 16 and all(reason == "length" for _, reason in out.values())
    metrics = httpx.get(server.url + "/metrics").text
    assert 'llmkit:num_requests_running{model_name="tiny"} 0.0' in metrics
    assert "llmkit:time_to_first_token_seconds_bucket" in metrics and "llmkit:generation_tokens_total" in metrics


def test_queue_full_gets_429_and_cancel_frees_the_slot(tiny):
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_batch=1, max_queue=1))
    body = {"model": "tiny", "messages": MSG, "max_tokens": 900, "stream": True, "ignore_eos": True}
    url = srv.url + "/v1/chat/completions"
    slow = tiny.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))  # the tiny model is too quick to catch
    try:
        with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
            with a.stream("POST", url, json=body) as running:
                lines_a = running.iter_lines()  # keep the iterator: dropping it closes the stream
                next(lines_a)  # it holds the only row
                with b.stream("POST", url, json=dict(body, max_tokens=10)) as waiting:  # queued
                    t0 = time.time()
                    rejected = httpx.post(url, json=body, timeout=5)
                    assert rejected.status_code == 429 and time.time() - t0 < 2
                    assert rejected.json()["error"]["type"] == "rate_limit_error"
                    running.close()  # the client goes away mid-stream: its row is freed for the waiting one
                    lines = [ln for ln in waiting.iter_lines() if ln.startswith("data: {")]
                    assert json.loads(lines[-1][6:])["choices"][0]["finish_reason"] == "length"
        sched = srv.app.state.llmkit["models"]["tiny"].scheduler
        deadline = time.time() + 10  # a finished row leaves right after its last event is sent
        while (sched.batch_size or sched.queue_length) and time.time() < deadline:
            time.sleep(0.01)
        assert sched.batch_size == 0 and sched.queue_length == 0
    finally:
        slow.remove()
        srv.stop()


def test_bad_requests_get_4xx_and_server_keeps_serving(server, client):
    url = server.url + "/v1/chat/completions"
    cases = [
        (b"", 400), (b"{not json", 400), (b"\xff\xfe\x00", 400), (b"[1, 2]", 400), (b"{}", 400),
        (json.dumps({"messages": "hi"}).encode(), 400),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400),
        (json.dumps({"messages": MSG, "temperature": "hot"}).encode(), 400),
        (json.dumps({"messages": MSG, "model": "nope"}).encode(), 404),
        (json.dumps({"messages": MSG, "n": 0}).encode(), 400),
        (json.dumps({"messages": MSG, "max_tokens": -1}).encode(), 400),
        (json.dumps({"messages": MSG, "max_tokens": 1020}).encode(), 400),  # over the 1024-token context
        (json.dumps({"messages": MSG, "response_format": {"type": "xml"}}).encode(), 400),
    ]
    for raw, status in cases:
        r = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (raw, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url, json={"messages": MSG, "max_tokens": 1020})
    assert "1020" in r.json()["error"]["message"] and "1024" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MSG)
    assert httpx.post(server.url + "/v1/completions", json={"prompt": 5}).status_code == 400
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3).choices[0].message is not None


def test_api_key_body_limit_and_health(tiny, monkeypatch):
    import llmkit.model.checkpoint

    def slow_load(spec, **kw):
        time.sleep(1.0)
        return tiny

    monkeypatch.setattr(llmkit.model.checkpoint, "load_model", slow_load)
    cfg = ServeConfig(models={"tiny": "slow"}, port=0, api_key="s3cret", max_body_bytes=2000)
    srv = BackgroundServer(cfg, wait_ready=0)
    try:
        while not srv.server.started:
            time.sleep(0.02)
        assert httpx.get(srv.url + "/health").status_code == 503  # still loading
        while httpx.get(srv.url + "/health").status_code != 200:
            time.sleep(0.1)
        assert httpx.get(srv.url + "/").status_code == 200  # the page stays open
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(srv.url + path).status_code == 401
        assert httpx.post(srv.url + "/tokenize", json={"prompt": "x"}).status_code == 401
        wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="tiny", messages=MSG)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        assert good.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).usage.completion_tokens <= 2
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(srv.url + "/v1/chat/completions", json=big, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 413
    finally:
        srv.stop()


def test_serve_command_parses_models_and_flags():
    from llmkit.cli import build_parser
    from llmkit.cli.serve import serve_config

    args = build_parser().parse_args(["serve", "--model", "a=/x/a", "--model", "/y/b", "--port", "0",
                                      "--max-batch", "4", "--api-key", "k"])
    cfg = serve_config(args)
    assert cfg.models == {"a": "/x/a", "b": "/y/b"} and cfg.host == "127.0.0.1" and cfg.max_batch == 4
    assert cfg.api_key == "k"


# ---------------------------------------------------------------------------------------------------------------
# The real default model


def test_default_model_answers_paris():
    srv = BackgroundServer(ServeConfig(models={"default": "default"}, port=0, max_batch=4))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="default", temperature=0, max_tokens=30, messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
        assert "Paris" in r.choices[0].message.content
    finally:
        srv.stop()


def test_lm_eval_remote_tokenizer_reads_the_server(server, tiny):
    # lm-eval's `tokenizer_backend=remote` (local-completions) reads /tokenizer_info, /tokenize and /detokenize
    from lm_eval.utils import RemoteTokenizer

    rt = RemoteTokenizer(server.url + "/v1/completions")
    tok = tiny.tokenizer
    text = "The capital of France is Paris."
    assert rt.encode(text) == tok.encode(text, add_special_tokens=False)
    assert rt.decode(tok.encode(text)) == text
    assert (rt.eos_token, rt.eos_token_id, rt.bos_token_id) == ("<|im_end|>", tok.eos_id, tok.bos_id)
    assert rt.apply_chat_template(MSG) == tok.apply_chat_template(MSG, add_generation_prompt=True)
    assert httpx.get(server.url + "/tokenizer_info", params={"model": "nope"}).status_code == 404


def test_a_non_streaming_client_that_disconnects_frees_its_rows_at_once(tiny):
    """Issue 22: a non-streaming request whose client closed its socket kept generating while tokens arrived (the
    disconnect was only polled after a second without events); now its rows go within a decode step or so."""
    import socket
    from urllib.parse import urlparse

    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_batch=4, max_queue=4))
    slow = tiny.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))  # ~10 ms a decode step
    try:
        u = urlparse(srv.url)
        body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 900, "n": 2, "ignore_eos": True})
        sock = socket.create_connection((u.hostname, u.port))
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        sched = srv.app.state.llmkit["models"]["tiny"].scheduler
        deadline = time.time() + 10
        while sched.batch_size == 0 and time.time() < deadline:  # both rows decoding
            time.sleep(0.01)
        time.sleep(0.3)
        assert sched.batch_size == 2
        sock.close()  # the client goes away; 900 tokens at ~10 ms would take 9 s more
        t0 = time.time()
        while sched.batch_size and time.time() - t0 < 5:
            time.sleep(0.005)
        assert sched.batch_size == 0 and time.time() - t0 < 0.5, time.time() - t0
        assert httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 3},
                          timeout=30).status_code == 200  # and the server keeps serving
    finally:
        slow.remove()
        srv.stop()
