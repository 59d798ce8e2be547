"""Logits processors: per-row constraints on the next token, applied by engine.DecodeBatch before sampling.

Protocol (any object with these two methods; a request carries a list of them, applied in order):

    processor(logits: Tensor (V,) float32, remaining: int) -> Tensor (V,)
        masked logits for this row's next token: disallowed tokens set to -inf (a new tensor or the same one).
        `remaining` is how many tokens the row may still generate, this one included, so a grammar can force its
        closing tokens before the budget runs out.
    processor.accept(token_id: int) -> None
        called with the token chosen (EOS and stop tokens included), after it was picked.

A processor belongs to one row: give each request its own instances. Pass them per prompt:
`engine.generate(prompts, params, processors=[[json_object(engine)], []])`, `engine.chat(msgs, processors=[...])`, or
the scheduler's Request(processors=[...]). An exception in a processor fails its row only.

The processors themselves are llmkit.infer.grammar's (llguidance): JSON objects, JSON schemas, Lark grammars (tool
calls) and logit_bias. json_object(engine) and json_schema(engine, schema) below build one for a row of this engine.
"""
from __future__ import annotations

from llmkit.infer.grammar import json_object_grammar, json_schema_grammar


def json_object(engine):
    """A processor for one row: the output is one JSON object (response_format json_object, `generate --json`)."""
    return json_object_grammar(engine.tok, engine.eos_ids).processor()


def json_schema(engine, schema: dict):
    """A processor for one row: the output is JSON that validates against `schema` (strict json_schema)."""
    return json_schema_grammar(engine.tok, schema, engine.eos_ids).processor()
