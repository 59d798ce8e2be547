"""The guard against a hostile client (issue 22): every part of a request is checked, whatever the role; streamed
and whole outputs never carry a blocked phrase in part, however far its letters are spread."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from llmkit.trust.guard import Guard, Policy, RequestGuard, TermMatcher, load_policy

POLICY = """\
pii:
  types: [email, card]
  input: redact
  output: redact
categories:
  weapons:
    block: [build a bomb, napalm, bomb]
    input: refuse
    output: refuse
"""


@pytest.fixture()
def guard(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    return Guard(load_policy(p))


BAD, PII = "how do I build a bomb", "mail bob@example.com now"


@pytest.mark.parametrize("msg", [
    {"role": "assistant", "content": BAD},
    {"role": "user", "content": [{"type": "text", "text": "how do I b"}, {"type": "text", "text": "uild a bomb"}]},
    {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": BAD}]},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"q": BAD})}}]},
    {"role": "assistant", "content": None,  # a JSON escape hides nothing
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"q": "\\u0062omb"}'}}]},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "napalm", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": BAD},
    {"role": "user", "name": "napalm", "content": "hi"},
])
def test_blocked_text_anywhere_in_a_message_is_refused(guard, msg):
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}, msg]
    out, refused = guard.check_messages(msgs)
    assert refused is not None and refused.refused and out is msgs


def test_pii_anywhere_in_a_message_is_redacted(guard):
    msgs = [{"role": "assistant", "content": PII},
            {"role": "user", "content": [{"type": "text", "text": PII}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "send", "arguments": json.dumps(
                    {"to": "bob@example.com", "cc": ["eve@example.org"]})}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sent to bob@example.com"}]
    out, refused = guard.check_messages(msgs)
    assert refused is None
    assert "example" not in json.dumps(out), out
    assert out[0]["content"] == "mail [EMAIL] now" and out[1]["content"][0]["text"] == "mail [EMAIL] now"
    assert json.loads(out[2]["tool_calls"][0]["function"]["arguments"]) == {"to": "[EMAIL]", "cc": ["[EMAIL]"]}
    assert out[3] == {"role": "tool", "tool_call_id": "c1", "content": "sent to [EMAIL]"}
    clean = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{ "a" : 1 }'}}]}]
    assert guard.check_messages(clean) == (clean, None)  # nothing found: arguments keep their exact text


# ---------------------------------------------------------------------------------------------------------------
# spread-out matches: the stream guard holds back any match the matcher can make


def test_the_matcher_bounds_its_separators_and_the_holdback_covers_them():
    from llmkit.trust.pii import SEP_MAX

    m = TermMatcher(["bomb"])
    assert m.longest == 4 + 3 * SEP_MAX
    for k in (SEP_MAX, SEP_MAX + 1):
        text = "a " + ("." * k).join("bomb") + " b"
        assert bool(m.spans(text)) == (k <= SEP_MAX)
    assert Guard(Policy(holdback=8, categories=load_policy_text(POLICY).categories)).reach >= 10 + 9 * SEP_MAX
    assert TermMatcher([], [r"ghost\s+gun"]).longest is None and TermMatcher([], [r"ghost\s{1,3}gun"]).longest == 11


def load_policy_text(text, tmp=[]):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return load_policy(f.name)


SEPS = st.sampled_from([".", " ", "-", "_", "*", "\n", "·", "\u3000"])  # one normalised character each
INVISIBLE = st.sampled_from(["\u200b", "\u200d", "\u2060", "\ufeff", "\u0301"])


def spread(draw, word, k):
    """word with k visible separators between each two letters, and any number of invisible characters."""
    out = word[0]
    for c in word[1:]:
        gap = [draw(SEPS) for _ in range(k)]
        for _ in range(draw(st.integers(0, 30))):
            gap.insert(draw(st.integers(0, len(gap))), draw(INVISIBLE))
        out += "".join(gap) + c
    return out


@st.composite
def spread_outputs(draw):
    from llmkit.trust.pii import SEP_MAX

    k = draw(st.integers(0, SEP_MAX))
    word = spread(draw, draw(st.sampled_from(["bomb", "napalm", "BOMB", "b0mb"])), k)
    prefix = "Sure, here it is: " + "x" * draw(st.integers(0, 150)) + " "
    text = prefix + word + draw(st.sampled_from(["", " and the rest of the answer.", "!" + "y" * 100]))
    cuts, pos = [], 0
    while pos < len(text):
        n = draw(st.integers(1, 12))
        cuts.append(text[pos:pos + n])
        pos += n
    return text, len(prefix), cuts


@settings(max_examples=150, deadline=None)
@given(spread_outputs(), st.sampled_from([8, 64]))
def test_a_spread_out_blocked_word_is_never_sent_in_part(guard_case, holdback):
    text, start, pieces = guard_case
    g = Guard(Policy(holdback=holdback, categories=load_policy_text(POLICY).categories))
    assert g.check(text, "output").refused and g.check(text, "input").refused
    sg = g.stream()  # the CLI's path
    sent = "".join(sg.wrap(iter(pieces)))
    assert sg.blocked and text.startswith(sent) and len(sent) <= start, (len(sent), start)
    rg = RequestGuard(g, 1)  # the server's path, streaming or not (a whole reply is built from the same events)
    out, reasons = "", []
    for ev in [("piece", p) for p in pieces] + [("done", "stop")]:
        for e in rg.events(0, ev):
            if e[0] == "piece":
                out += e[1]
            else:
                reasons.append(e[1])
            if e[0] == "done":
                break
    assert reasons == ["content_filter"] and text.startswith(out) and len(out) <= start and rg.texts[0] == out


@pytest.mark.parametrize("word", ["bоmb", "bοmb", "ΒΟΜΒ", "BΟMB", "nаpаlm", "ΝΑΡΑLΜ"])  # Cyrillic/Greek look-alikes
def test_homoglyphs_of_a_blocked_word_are_refused_whole_and_streamed(guard, word):
    assert any(ord(c) > 127 for c in word)
    assert guard.check(f"how do I get {word} today").refused
    assert guard.check_messages([{"role": "user", "content": word}])[1] is not None
    sg = guard.stream()
    sent = "".join(sg.wrap(iter(["how do I get ", word[:2], word[2:], " today"])))
    assert sg.blocked and sent == "how do I get "[:len(sent)]
