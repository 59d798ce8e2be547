"""The rest of the OpenAI API against a live server, through the official openai client: structured output
(json_object, strict json_schema), tool calls, embeddings, logit_bias, max_completion_tokens, stream usage; and the
server's guards: key file with rate limits, chunked body limit, scheduler restart, errors as OpenAI bodies.

A tiny random Llama checks the mechanics (its outputs are random, so a constraint is the only reason they parse);
the real default model checks a tool round trip and that embeddings of paraphrases are closer than unrelated ones.
"""
import base64
import json
import threading
import time

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from llmkit.model.checkpoint import load_model
from llmkit.serve.app import BackgroundServer, ServeConfig
from helpers import MSG, make_tiny_model

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0},
                   "tags": {"type": "array", "items": {"enum": ["big", "old", "coastal"]}, "maxItems": 3},
                   "capital": {"type": "boolean"}},
    "required": ["city", "population", "capital"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")), dtype="float32")


@pytest.fixture(scope="module")
def server(tiny):
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_batch=16, max_queue=32))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _schema_format(schema=SCHEMA):
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}


# ---------------------------------------------------------------------------------------------------------------
# Structured output


def test_json_schema_outputs_validate_on_many_seeds(client, tiny):
    from llmkit.infer.grammar import json_schema_grammar

    need = len(json_schema_grammar(tiny.tokenizer, SCHEMA, {tiny.tokenizer.eos_id}).processor().closing())
    reasons = set()
    for seed, max_tokens, ignore_eos in [(0, 200, False), (1, need, False), (2, need + 3, True), (3, need + 20, True)]:
        r = client.chat.completions.create(model="tiny", messages=MSG, n=6, seed=seed, temperature=1.5,
                                           max_tokens=max_tokens, response_format=_schema_format(),
                                           extra_body={"ignore_eos": ignore_eos})
        for c in r.choices:
            jsonschema.validate(json.loads(c.message.content), SCHEMA)
            reasons.add(c.finish_reason)
        if ignore_eos:
            assert r.usage.completion_tokens == 6 * max_tokens  # EOS tokens after the JSON add no text
    assert reasons == {"stop", "length"}
    stream = client.chat.completions.create(model="tiny", messages=MSG, seed=7, max_tokens=need + 5, stream=True,
                                            response_format=_schema_format())
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), SCHEMA)
    obj = client.chat.completions.create(model="tiny", messages=MSG, seed=3, max_tokens=8,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    comp = client.completions.create(model="tiny", prompt="Data:", max_tokens=need + 10, seed=1,
                                     extra_body={"response_format": _schema_format()})
    jsonschema.validate(json.loads(comp.choices[0].text), SCHEMA)


def test_bad_schema_and_too_small_budget_are_400(client):
    with pytest.raises(openai.BadRequestError, match="too small"):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, response_format=_schema_format())
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, response_format=_schema_format(
            {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, response_format={"type": "json_schema"})


# ---------------------------------------------------------------------------------------------------------------
# Tool calls


def test_tool_calls_required_named_parallel_and_streamed(client):
    args = dict(model="tiny", messages=MSG, tools=[WEATHER, TIME], max_tokens=120, temperature=1.0)
    for seed in range(4):
        r = client.chat.completions.create(**args, tool_choice="required", seed=seed)
        c = r.choices[0]
        assert c.finish_reason in ("tool_calls", "length") and c.message.tool_calls
        for call in c.message.tool_calls:
            schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), schema)
            assert call.id.startswith("call_") and call.type == "function"
    named = client.chat.completions.create(**args, seed=1, parallel_tool_calls=False,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    assert named.choices[0].finish_reason == "tool_calls"
    none = client.chat.completions.create(**dict(args, max_tokens=10), seed=1, tool_choice="none")
    assert not none.choices[0].message.tool_calls
    # streamed: the deltas add up to the same calls as the non-streamed answer with the same seed
    streamed = client.chat.completions.create(**args, seed=1, parallel_tool_calls=False, stream=True,
                                              tool_choice={"type": "function", "function": {"name": "get_time"}})
    parts, reasons = {}, []
    for ch in streamed:
        if not ch.choices:
            continue
        reasons.append(ch.choices[0].finish_reason)
        for d in ch.choices[0].delta.tool_calls or []:
            p = parts.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            p["id"] = p["id"] or d.id
            p["name"] += d.function.name or ""
            p["arguments"] += d.function.arguments or ""
    assert [p["name"] for p in parts.values()] == ["get_time"] and parts[0]["id"].startswith("call_")
    assert json.loads(parts[0]["arguments"]) == json.loads(calls[0].function.arguments)
    assert reasons[-1] == "tool_calls"


def test_tool_call_round_trip_on_the_default_model():
    srv = BackgroundServer(ServeConfig(models={"default": "default"}, port=0, max_batch=4))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
        r = client.chat.completions.create(model="default", messages=msgs, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=60)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
        assert "paris" in json.loads(call.function.arguments)["city"].lower()
        msgs += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
        final = client.chat.completions.create(model="default", messages=msgs, tools=[WEATHER], temperature=0,
                                               max_tokens=40, tool_choice="none")
        answer = final.choices[0].message
        assert answer.content and not answer.tool_calls
        with pytest.raises(openai.BadRequestError, match="tool_call_id"):
            client.chat.completions.create(model="default", max_tokens=5,
                                           messages=msgs[:-1] + [{"role": "tool", "content": "x"}])
        s = ["The cat sat on the mat.", "A cat was sitting on the rug.", "Stock markets fell sharply today.",
             "It is sunny in Paris today.", "The weather in Paris is sunny."]
        e = np.array([d.embedding for d in client.embeddings.create(model="default", input=s).data])
        sim = e @ e.T
        assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[1, 2]) and sim[3, 4] > max(sim[3, 0], sim[3, 2])
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------------
# Embeddings, logit_bias, token limits, usage


def test_embeddings_float_base64_dimensions(client, tiny):
    texts = ["The capital of France is Paris.", "Hello world!", "x"]
    r = client.embeddings.create(model="tiny", input=texts)
    e = np.array([d.embedding for d in r.data])
    assert e.shape == (3, tiny.model.config.n_embd) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(tiny.tokenizer.encode(t)) for t in texts)
    one = client.embeddings.create(model="tiny", input=texts[1]).data[0].embedding
    assert np.allclose(one, e[1], atol=1e-5)  # batched like alone
    b64 = httpx.post(str(client.base_url) + "embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), e[0], atol=1e-6)
    short = client.embeddings.create(model="tiny", input=texts, dimensions=8)
    s = np.array([d.embedding for d in short.data])
    assert s.shape == (3, 8) and np.allclose(s[0], e[0, :8] / np.linalg.norm(e[0, :8]), atol=1e-5)
    ids = client.embeddings.create(model="tiny", input=[tiny.tokenizer.encode(texts[0])]).data[0].embedding
    assert np.allclose(ids, e[0], atol=1e-5)
    for bad in ({"input": []}, {"input": ""}, {"input": texts, "dimensions": 10**6}, {"input": [[10**6]]}):
        r = httpx.post(str(client.base_url) + "embeddings", json=bad)
        assert r.status_code == 400, (bad, r.text)


def test_logit_bias_max_completion_tokens_user_and_stream_usage(client, tiny):
    tok = tiny.tokenizer
    greedy = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True}, logprobs=True)
    first = tok.token_to_id(greedy.choices[0].logprobs.content[0].token) or \
        tok.encode(greedy.choices[0].logprobs.content[0].token, add_special_tokens=False)[0]
    banned = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0,
                                            logit_bias={str(first): -100}, extra_body={"ignore_eos": True},
                                            logprobs=True)
    assert banned.choices[0].logprobs.content[0].token != greedy.choices[0].logprobs.content[0].token
    x = tok.encode("x", add_special_tokens=False)[0]
    forced = client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=5, temperature=0.8,
                                            seed=1, logit_bias={str(x): 100}, user="alice",
                                            extra_body={"ignore_eos": True})
    assert forced.choices[0].message.content == "xxxxx" and forced.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=4, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, logit_bias={"99999999": 1})


# ---------------------------------------------------------------------------------------------------------------
# Guards: key file and rate limits, chunked bodies, template and unexpected errors, scheduler death


def test_key_file_rate_limits(tiny, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nk-slow rpm=2 name=slow\nk-tokens tpm=60\nk-free\n")
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, api_key_file=str(keys)))
    try:
        def ask(key, **kw):
            return httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"messages": MSG, "max_tokens": 5, "ignore_eos": True, **kw}, timeout=30)

        assert [ask("k-slow").status_code for _ in range(3)] == [200, 200, 429]
        r = ask("k-slow")
        assert r.json()["error"]["type"] == "rate_limit_error" and 1 <= int(r.headers["retry-after"]) <= 60
        assert ask("k-free").status_code == 200 and ask("nope").status_code == 401
        statuses = [ask("k-tokens", max_tokens=8).status_code for _ in range(3)]
        assert statuses[0] == 200 and 429 in statuses  # 8 + prompt tokens held each: the second or third is over 60
        big = ask("k-tokens", max_tokens=70)  # could never fit in 60 tokens a minute
        assert big.status_code == 429 and "more than the 60 tokens/minute" in big.json()["error"]["message"]
        metrics = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer k-free"}).text
        assert 'llmkit:request_rejected_total{reason="rate_limit"}' in metrics
    finally:
        srv.stop()


def test_chunked_body_over_the_limit_gets_413(tiny):
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_body_bytes=10_000))
    try:
        def chunks(n, size=1000):
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(n):
                yield b"x" * size
            yield b'"}], "max_tokens": 2}'

        for n in (50, 400):  # past the limit, and far past it: a 413 answer either way, no reset
            r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(n),
                           headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 413 and "10000" in r.json()["error"]["message"]
        ok = httpx.post(srv.url + "/v1/chat/completions", content=chunks(5, 20),
                        headers={"content-type": "application/json"}, timeout=30)
        assert ok.status_code == 200
        huge = httpx.post(srv.url + "/v1/completions", json={"prompt": ["a"] * 64, "n": 2, "max_tokens": 1})
        assert huge.status_code == 400 and "rows" in huge.json()["error"]["message"]  # never fits: not a 429
    finally:
        srv.stop()


def test_template_and_unexpected_errors_are_openai_bodies(tmp_path, monkeypatch):
    strict = load_model(make_tiny_model(tmp_path / "m"), dtype="float32")
    strict.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'user' %}"
                                      "{{ raise_exception('only user messages, please') }}{% endif %}"
                                      "{{ m['content'] }}{% endfor %}")
    srv = BackgroundServer(ServeConfig(models={"strict": strict}, port=0))
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
        assert r.status_code == 400 and "only user messages" in r.json()["error"]["message"]
        monkeypatch.setattr(strict.tokenizer, "decode", lambda *a, **k: 1 / 0)
        r = httpx.post(srv.url + "/detokenize", json={"tokens": [1, 2]})
        assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies on purpose
def test_dead_scheduler_thread_is_reported_and_restarted(tiny):
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0))
    try:
        st = srv.app.state.llmkit
        old = st.models["tiny"].scheduler

        class Boom(BaseException):  # not an Exception: gets past the per-step handler, like a real thread death
            pass

        def die():
            raise Boom()

        old.core.step = die
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 5}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        health = [httpx.get(srv.url + "/health").status_code for _ in range(2)]
        assert health[0] == 503 or st.models["tiny"].scheduler is not old  # the supervisor may have been first
        while httpx.get(srv.url + "/health").status_code != 200:
            time.sleep(0.1)
        assert st.models["tiny"].scheduler is not old
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSG, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
        assert "llmkit:scheduler_restarts_total 1.0" in httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()


def test_a_failing_processor_fails_its_request_only(tiny):
    from llmkit.infer.engine import Engine, SamplingParams
    from llmkit.infer.scheduler import Request, Scheduler

    class Broken:
        def __call__(self, logits, remaining):
            raise RuntimeError("bad grammar state")

        def accept(self, t):
            pass

    sched = Scheduler(Engine(tiny.model, tiny.tokenizer), max_batch=4)
    events = {0: [], 1: []}
    done = threading.Event()

    def emit(i):
        def f(ev):
            events[i].append(ev)
            if i == 1 and ev[0] == "done":
                done.set()
        return f

    ids = tiny.tokenizer.encode("Hello there")
    p = SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=0)
    sched.submit([Request(ids, p, 20, emit(0), processors=[Broken()]),
                  Request(ids, p, 20, emit(1))])
    assert done.wait(30)
    sched.close()
    assert events[0][0][0] == "error" and "bad grammar state" in events[0][0][1]
    assert sum(1 for e in events[1] if e[0] == "piece") > 0 and events[1][-1] == ("done", None)


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(server, tiny):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    assert check_remote_tokenizer_support(server.url + "/v1/completions")
    rt = RemoteTokenizer(server.url + "/v1/completions")
    assert rt.eos_token == "<|im_end|>" and rt.eos_token_id == tiny.tokenizer.eos_id
    assert rt.encode("Hello world") == tiny.tokenizer.encode("Hello world", add_special_tokens=False)
    assert rt.decode(rt.encode("Hello world")) == "Hello world"
    assert rt.apply_chat_template(MSG) == tiny.tokenizer.apply_chat_template(MSG, add_generation_prompt=True)


def test_extreme_legal_values_fail_no_one(server):
    """Values at the edge of the legal ranges used to make the shared decode step produce NaN probabilities."""
    url = server.url + "/v1/chat/completions"
    innocent = {}

    def stream():
        body = {"messages": MSG, "max_tokens": 40, "stream": True, "ignore_eos": True, "seed": 1}
        with httpx.stream("POST", url, json=body, timeout=60) as r:
            innocent["lines"] = [ln for ln in r.iter_lines() if ln.startswith("data: ")]

    t = threading.Thread(target=stream)
    t.start()
    for extra in [{"temperature": 1e-300}, {"temperature": 5e-324, "top_k": 5}, {"top_p": 1e-300},
                  {"frequency_penalty": 2, "presence_penalty": 2, "temperature": 1e-40}, {"min_p": 1.0},
                  {"logit_bias": {str(i): -100 for i in range(300)}}, {"seed": -(2**63)}, {"top_k": 2**31 - 1}]:
        r = httpx.post(url, json={"messages": MSG, "max_tokens": 5, **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)
    t.join(60)
    assert innocent["lines"][-1] == "data: [DONE]" and not any('"error"' in ln for ln in innocent["lines"])


QWEN_LIKE = (  # the tool parts of Qwen2.5's template
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": "
    "{{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tools_rendered_by_a_template_that_knows_them_or_generically(tiny):
    from llmkit.serve import tools as toolcalls

    tok = tiny.tokenizer
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    msgs, extra = toolcalls.render_messages(history, [WEATHER], native=True)
    text = _render(tok, QWEN_LIKE, msgs, extra)
    assert '"name": "get_weather"' in text and '{"city": "Paris", "unit": "celsius"}' in text
    assert "<tools>" in text and "<|im_start|>tool\n21 C" in text
    generic, extra = toolcalls.render_messages(history, [WEATHER], native=False)
    assert extra == {} and generic[0]["role"] == "system" and "get_weather" in generic[0]["content"]
    assert generic[2]["content"].startswith("<tool_call>\n") and generic[3] == {
        "role": "user", "content": "<tool_response>\n21 C\n</tool_response>"}
    content, calls = toolcalls.parse_calls(generic[2]["content"])
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def _render(tok, template, msgs, extra):
    from llmkit.serve.tools import template_supports_tools

    old = tok.chat_template
    tok.chat_template = template
    try:
        assert template_supports_tools(tok)
        return tok.apply_chat_template(msgs, add_generation_prompt=True, **extra)
    finally:
        tok.chat_template = old


def test_tokens_per_minute_are_held_at_admission_not_counted_at_the_end(tiny, tmp_path):
    """Issue 22: a key with tpm=1000 could start several concurrent long requests (nothing counted until one ended).
    Now each holds its prompt + max_tokens x n when admitted, so a second concurrent one is refused at once, and the
    hold settles to what was used."""
    import threading

    keys = tmp_path / "keys.txt"
    keys.write_text("k-tpm tpm=1000\n")
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, api_key_file=str(keys)))
    slow = tiny.model.register_forward_pre_hook(lambda *_: time.sleep(0.005))
    try:
        body = {"messages": MSG, "max_tokens": 600, "ignore_eos": True}
        head = {"Authorization": "Bearer k-tpm"}
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(srv.url + "/v1/chat/completions",
                                                                       headers=head, json=body, timeout=60)))
        t.start()
        sched = srv.app.state.llmkit["models"]["tiny"].scheduler
        deadline = time.time() + 10
        while sched.batch_size == 0 and time.time() < deadline:  # the first is running, far from done
            time.sleep(0.01)
        second = httpx.post(srv.url + "/v1/chat/completions", headers=head, json=body, timeout=60)
        assert second.status_code == 429 and "may use" in second.json()["error"]["message"]
        t.join()
        assert first["r"].status_code == 200
        used = first["r"].json()["usage"]["total_tokens"]
        key = srv.app.state.llmkit.keys.keys[0]
        assert sum(c for _, c in key.tokens) == used  # settled to what it used
    finally:
        slow.remove()
        srv.stop()
