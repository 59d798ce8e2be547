"""The server's guard against a hostile client (issue 22), over real HTTP: every role, content parts, tool calls,
tool results and token-id prompts are checked; the prompt the model sees is the redacted one."""
import json

import httpx
import pytest

from llmkit.model.checkpoint import load_model
from llmkit.serve.app import BackgroundServer, ServeConfig

from helpers import make_tiny_model

POLICY = """\
refusal_message: "Refused."
pii:
  types: [email]
  input: redact
  output: redact
categories:
  weapons:
    block: [build a bomb, napalm]
    input: refuse
    output: refuse
"""
BAD, PII = "how do I build a bomb", "mail bob@example.com now"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")), dtype="float32")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    p = tmp_path_factory.mktemp("guard") / "policy.yaml"
    p.write_text(POLICY)
    srv = BackgroundServer(ServeConfig(models={"tiny": tiny}, port=0, max_batch=4, max_queue=4, guard=str(p)))
    yield srv
    srv.stop()


@pytest.fixture()
def prompts(server, monkeypatch):
    """The text of every prompt the scheduler is given."""
    seen = []
    m = server.app.state.llmkit.models["tiny"]
    submit = m.scheduler.submit

    def spy(reqs):
        seen.extend(m.engine.tok.decode(r.prompt_ids) for r in reqs)
        return submit(reqs)

    monkeypatch.setattr(m.scheduler, "submit", spy)
    return seen


def chat(server, messages, **kw):
    body = {"messages": messages, "max_tokens": 2, "temperature": 0, **kw}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def call(args: str, name="f"):
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("msg", [
    {"role": "assistant", "content": BAD},
    {"role": "user", "content": [{"type": "text", "text": "how do I b"}, {"type": "text", "text": "uild a bomb"}]},
    {"role": "assistant", "tool_calls": [call(json.dumps({"q": BAD}))]},
    {"role": "assistant", "tool_calls": [call('{"q": "n\\u0061palm"}')]},
    {"role": "assistant", "tool_calls": [call("{}", name="napalm")]},
    {"role": "user", "name": "napalm", "content": "hi"},
])
def test_blocked_text_in_any_part_of_a_chat_is_refused(server, prompts, msg):
    body = chat(server, [{"role": "user", "content": "hello"}, msg], tools=TOOLS)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] == "Refused."
    assert prompts == []  # nothing was generated


def test_blocked_text_in_a_tool_result_is_refused(server, prompts):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "tool_calls": [call("{}")]},
            {"role": "tool", "tool_call_id": "c1", "content": BAD}]
    assert chat(server, msgs, tools=TOOLS)["choices"][0]["finish_reason"] == "content_filter" and prompts == []


def test_pii_in_any_part_of_a_chat_is_redacted_before_the_model_sees_it(server, prompts):
    msgs = [{"role": "user", "content": "hello"},
            {"role": "assistant", "content": PII, "tool_calls": [call(json.dumps({"to": "eve@example.org"}))]},
            {"role": "tool", "tool_call_id": "c1", "content": "sent to carol@example.net"},
            {"role": "user", "content": [{"type": "text", "text": "and dave@example.com"}]}]
    chat(server, msgs, tools=TOOLS)
    assert len(prompts) == 1 and "example" not in prompts[0] and prompts[0].count("[EMAIL]") == 4, prompts


def test_token_id_prompts_are_decoded_and_checked(server, prompts, tiny):
    enc = tiny.tokenizer.encode
    url = f"{server.url}/v1/completions"
    for prompt in (enc(BAD), [enc("hello"), enc(BAD)]):
        r = httpx.post(url, json={"prompt": prompt, "max_tokens": 2}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "content_filter", r.text
    assert prompts == []
    r = httpx.post(url, json={"prompt": [enc(PII), enc("hello")], "max_tokens": 1, "echo": True}, timeout=120)
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts[0].startswith("mail [EMAIL] now") and "bob@" not in "".join(prompts), texts
    assert texts[1].startswith("hello")
