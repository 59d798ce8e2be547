"""Structured output processors (llmkit.infer.grammar) driven standalone: a tokenizer and a loop over random logits.

Every output must parse and validate against its schema with jsonschema, also when the budget cuts it short and
when EOS is ignored (then only EOS tokens, which add no text, follow the completed JSON).
"""
import json

import jsonschema
import pytest
import torch

from llmkit.infer.grammar import LogitBias, apply_processors, json_object_grammar, json_schema_grammar, lark_grammar
from helpers import make_tiny_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["a", "bc", "def"]}},
        "where": {"type": "object", "properties": {"city": {"type": "string"}, "ok": {"type": "boolean"}},
                  "required": ["city", "ok"], "additionalProperties": False},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "where"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from llmkit.model.checkpoint import load_model

    return load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")), dtype="float32").tokenizer


def run(tok, processors, budget, seed, eos, ignore_eos=False, temperature=2.0, pad=7):
    """Sample from random logits through the processors; returns (text, finish_reason, ids)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(budget):
        logits = torch.randn(tok.vocab_size + pad, generator=gen) * 3  # a padded vocabulary, like real models
        logits = apply_processors(processors, logits, budget - i)
        t = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen))
        assert t < tok.vocab_size
        for p in processors:
            p.accept(t)
        if t in eos and not ignore_eos:
            return tok.decode(out), "stop", out
        out.append(t)
    return tok.decode(out, skip_special_tokens=True), "length", out


def test_json_schema_outputs_validate_on_many_seeds_and_budgets(tok):
    eos = {tok.eos_id}
    g = json_schema_grammar(tok, SCHEMA, eos)
    need = len(g.processor().closing())  # the shortest valid answer, in tokens
    assert need >= 20
    reasons = set()
    for seed in range(40):
        budget = need + [0, 1, 5, 20, 150][seed % 5]
        text, reason, _ = run(tok, [g.processor()], budget, seed, eos, ignore_eos=seed % 3 == 0)
        reasons.add(reason)
        jsonschema.validate(json.loads(text), SCHEMA)  # raises with the text if it does not validate
    assert reasons == {"stop", "length"}


def test_json_object_and_budget_too_small_for_a_required_key(tok):
    eos = {tok.eos_id}
    g = json_object_grammar(tok, eos)
    for seed in range(10):
        text, _, _ = run(tok, [g.processor()], 6 + seed, seed, eos)
        assert isinstance(json.loads(text), dict)


def test_lark_tool_call_grammar_and_logit_bias(tok):
    eos = {tok.eos_id}
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
              "additionalProperties": False}
    g = lark_grammar(tok, 'start: "<call>" %json ' + json.dumps(schema) + ' "</call>"', eos)
    text, reason, _ = run(tok, [g.processor()], 60, 0, eos)
    assert text.startswith("<call>") and text.endswith("</call>")
    assert json.loads(text[6:-7])["x"] is not None
    banned = tok.encode("a", add_special_tokens=False)[0]
    bias = LogitBias({banned: -100}, tok.vocab_size)
    forced = LogitBias({banned: 100}, tok.vocab_size)
    assert banned not in run(tok, [bias], 30, 1, set(), temperature=1.0, pad=0)[2]
    assert run(tok, [forced], 5, 1, set(), temperature=1.0, pad=0)[0] == "aaaaa"


def test_bad_schemas_and_bias_are_value_errors(tok):
    with pytest.raises(ValueError):
        json_schema_grammar(tok, [1, 2], {tok.eos_id})
    with pytest.raises(ValueError):
        json_schema_grammar(tok, {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, {tok.eos_id})
    with pytest.raises(ValueError):
        LogitBias({10**6: 1}, tok.vocab_size)
    with pytest.raises(ValueError):
        LogitBias({1: 101}, tok.vocab_size)


def test_generate_json_schema_cli(tok, tmp_path):
    """`llmkit generate --json-schema FILE`: output validates, also when the budget cuts it; errors are one line."""
    import os
    import subprocess
    import sys

    model = make_tiny_model(tmp_path / "m")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "llmkit", "generate", "Hello", "--model", str(model), *args],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    for seed, n in ((1, 200), (2, 60)):
        r = run("--json-schema", str(schema), "--seed", str(seed), "--temperature", "1.5", "--max-new-tokens", str(n))
        assert r.returncode == 0, r.stderr
        jsonschema.validate(json.loads(r.stdout), SCHEMA)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    for args in (["--json-schema", str(bad)], ["--json-schema", str(tmp_path / "missing.json")],
                 ["--json-schema", str(schema), "--max-new-tokens", "3"]):
        r = run(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") <= 1, r.stderr
