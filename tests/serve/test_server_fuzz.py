"""Property-based fuzzing of every endpoint's body (hypothesis): random and boundary values for each field, random
field combinations, random JSON and random bytes. A client error is never a 5xx, every error is OpenAI's body, a
request that is accepted streams to the end without an error event, a concurrent innocent client never notices,
and the server is healthy afterwards. Bounded example counts keep it well under a minute on the tiny model.
"""
import collections
import json
import math
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit.model.checkpoint import load_model
from llmkit.serve.app import BackgroundServer, ServeConfig
from helpers import MSG, make_tiny_model

EXAMPLES = 20

# ---------------------------------------------------------------------------------------------------------------
# Values: boundaries of every machine type, plus arbitrary JSON

FLOATS = [0, -0.0, 1e-300, 5e-324, 1e-45, 1e-6, -1, 0.5, 1, 2, 2.0000001, 100, 1e308, -1e308, math.nan, math.inf,
          -math.inf]
INTS = [0, -1, 1, 2, 4, 20, 21, 128, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
STRINGS = ["", "x", "tiny", "\ud800", "\udfff", "\x00", "é" * 50, "<tool_call>", "x" * 5000, "{", "\n\n"]
scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(FLOATS), st.sampled_from(INTS),
                    st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.sampled_from(STRINGS),
                    st.text(max_size=20))
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                       max_size=4), max_leaves=12)


def deep(n: int):
    """JSON nested n levels deep."""
    x = 1
    for _ in range(n):
        x = {"a": x}
    return x


message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), anything)},
    optional={"content": st.one_of(st.sampled_from(STRINGS), anything,
                                   st.just([{"type": "text", "text": "hi"}]), st.just([{"type": "image_url"}])),
              "tool_call_id": st.sampled_from(["call_1", "", 5]),
              "tool_calls": st.one_of(anything, st.just([{"id": "c", "type": "function",
                                                          "function": {"name": "f", "arguments": "{"}}]))})
messages = st.one_of(st.just(MSG), st.lists(message, max_size=3), anything)
schema = st.one_of(st.just({"type": "object"}), st.just({"type": "string", "maxLength": 3}),
                   st.just({"type": "integer", "minimum": 10**20}), st.just({"$ref": "#/nope"}),
                   st.just({"enum": []}), st.just({"type": "string", "minLength": 10**6}), st.just(deep(40)),
                   st.just({"type": "array", "minItems": 5, "items": {"type": "string", "pattern": "a{3}"}}), anything)
response_format = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])}),
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": st.fixed_dictionaries({"name": st.sampled_from(["a", "bad name", ""]),
                                                                 "schema": schema})}),
    anything)
tool = st.one_of(
    st.just({"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                          "properties": {"x": {"type": "integer"}}}}}),
    st.fixed_dictionaries({"type": st.just("function"),
                           "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "", "a b"])},
                                                             optional={"parameters": schema})}),
    anything)
tool_choice = st.one_of(st.sampled_from(["none", "auto", "required", "any"]),
                        st.just({"type": "function", "function": {"name": "f"}}),
                        st.just({"type": "function", "function": {"name": "zz"}}), anything)
number = st.one_of(st.sampled_from(FLOATS), st.sampled_from(INTS), anything)
count = st.one_of(st.sampled_from(INTS), st.integers(-5, 40), anything)

SAMPLING = {
    "model": st.one_of(st.just("tiny"), anything), "temperature": number, "top_p": number, "top_k": count,
    "min_p": number, "repetition_penalty": number, "presence_penalty": number, "frequency_penalty": number,
    "seed": count, "stop": st.one_of(st.sampled_from(STRINGS), st.lists(st.sampled_from(STRINGS), max_size=6),
                                     anything),
    "n": count, "max_tokens": count, "stream": st.one_of(st.booleans(), anything),
    "stream_options": st.one_of(st.just({"include_usage": True}), anything), "ignore_eos": st.booleans(),
    "logit_bias": st.one_of(st.just({"5": 100}), st.just({"5": 101}), st.just({"-1": 1}), st.just({"999999": 1}),
                            st.dictionaries(st.text(max_size=4), number, max_size=3), anything),
    "user": st.one_of(st.sampled_from(STRINGS), anything),
}
CHAT = {**SAMPLING, "max_completion_tokens": count, "logprobs": st.one_of(st.booleans(), anything),
        "top_logprobs": count, "response_format": response_format,
        "tools": st.one_of(st.lists(tool, max_size=3), anything), "tool_choice": tool_choice,
        "parallel_tool_calls": st.one_of(st.booleans(), anything)}
COMPLETION = {**SAMPLING, "logprobs": count, "echo": st.one_of(st.booleans(), anything),
              "response_format": response_format}
PROMPT = st.one_of(st.sampled_from(STRINGS), st.lists(st.integers(-2, 400), max_size=5),
                   st.lists(st.sampled_from(STRINGS), max_size=3), st.just([[1, 2], [3]]), st.just([[]]), anything)
EMBED = {"model": SAMPLING["model"], "encoding_format": st.one_of(st.sampled_from(["float", "base64", "hex"]),
                                                                  anything),
         "dimensions": count, "user": SAMPLING["user"]}
# legal values only, in random combinations: these reach the decode loop (JSON mode, tools, bias, stops, n, logprobs)
good_text = st.sampled_from(["x", "tiny", "é" * 5, "<tool_call>", "{", "\n\n", "Hello"])
VALID = {
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([5e-324, 1e-300, 1e-45, 1e-6])),
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([5e-324, 1e-300])),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "seed": st.integers(-(2**63), 2**63 - 257),
    "stop": st.one_of(good_text, st.lists(good_text, max_size=4)), "n": st.integers(1, 3),
    "max_tokens": st.integers(1, 24), "stream": st.booleans(), "stream_options": st.just({"include_usage": True}),
    "ignore_eos": st.booleans(), "logit_bias": st.dictionaries(st.sampled_from(["5", "6", "40"]),
                                                              st.floats(-100, 100), max_size=3),
    "user": good_text,
}
VALID_CHAT = {**VALID, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
              "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {
                  "type": "json_schema", "json_schema": {"name": "n", "schema": {
                      "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]),
              "tools": st.lists(tool.filter(lambda t: isinstance(t, dict)), min_size=1, max_size=2),
              "tool_choice": st.sampled_from(["none", "auto", "required"]), "parallel_tool_calls": st.booleans()}
VALID_COMPLETION = {**VALID, "logprobs": st.integers(0, 5), "echo": st.booleans()}
BODIES = {
    "/v1/chat/completions": st.one_of(st.fixed_dictionaries({"messages": messages}, optional=CHAT),
                                      st.fixed_dictionaries({"messages": st.just(MSG)}, optional=VALID_CHAT)),
    "/v1/completions": st.one_of(st.fixed_dictionaries({"prompt": PROMPT}, optional=COMPLETION),
                                 st.fixed_dictionaries({"prompt": good_text}, optional=VALID_COMPLETION)),
    "/v1/embeddings": st.fixed_dictionaries({"input": PROMPT}, optional=EMBED),
    "/tokenize": st.fixed_dictionaries({}, optional={"prompt": PROMPT, "messages": messages, "model": anything,
                                                     "add_special_tokens": anything}),
    "/detokenize": st.fixed_dictionaries({}, optional={"tokens": PROMPT, "model": anything}),
}


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")), dtype="float32")
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_batch=8, max_queue=64, max_tokens_cap=24,
                                       max_n=3, max_body_bytes=64_000))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def innocent(server):
    """A well-behaved client streaming the whole time; collects anything that went wrong for it."""
    problems, stop = [], threading.Event()

    def run():
        body = {"model": "tiny", "messages": MSG, "max_tokens": 8, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                with c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
                    lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                if r.status_code != 200 or lines[-1] != "data: [DONE]" or any('"error"' in ln for ln in lines):
                    problems.append((r.status_code, lines[-3:]))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield problems
    stop.set()
    t.join(timeout=60)


STATUSES = collections.Counter()


def check(server, path: str, raw: bytes):
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    STATUSES[path, r.status_code] += 1
    assert r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines), (raw[:300], lines[-3:])
    else:
        r.json()


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("path", list(BODIES))
def test_json_bodies_never_get_a_5xx(server, innocent, path):
    @settings(SETTINGS, max_examples=EXAMPLES * (2 if "completions" in path else 1))
    @given(BODIES[path])
    def one(body):
        check(server, path, json.dumps(body).encode())  # NaN and Infinity go out as bare literals

    one()
    assert not innocent, innocent


@SETTINGS
@given(path=st.sampled_from(list(BODIES)), raw=st.one_of(
    st.binary(max_size=200), anything.map(lambda x: json.dumps(x).encode()),
    st.just(b"[" * 100_000), st.just(b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    st.just(b'{"prompt": "\\ud800"}'), st.just(b'{"prompt": "a"'), st.just(b"\xef\xbb\xbf{}")))
def test_random_bytes_never_get_a_5xx(server, innocent, path, raw):
    check(server, path, raw)


def test_healthy_afterwards(server, innocent):
    assert not innocent, innocent
    for path in ("/v1/chat/completions", "/v1/completions"):  # the fuzzing reached the decode loop too
        assert STATUSES[path, 200] > 0, sorted(STATUSES.items())
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    sched = server.app.state.llmkit.models["tiny"].scheduler
    assert sched.thread.is_alive()
