"""From a request to its logits processors: response_format (json_object, json_schema), tools, logit_bias.

Compiled grammars are cached per model (the last GRAMMAR_CACHE distinct ones); each row gets fresh processors.
A budget too small for the shortest answer the grammar allows is a 400, not an output that cannot parse.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from llmkit.infer import grammar as G
from llmkit.serve import tools as toolcalls
from llmkit.serve.state import APIError, Served

GRAMMAR_CACHE = 64


@dataclass
class Constraint:
    """What one request's rows are constrained by."""
    grammar: G.Grammar | None
    bias: dict[int, float]
    vocab_size: int

    def processors(self) -> list:
        """Fresh processors for one row: the bias first, then the grammar (so the bias cannot unmask a token)."""
        out = [G.LogitBias(self.bias, self.vocab_size)] if self.bias else []
        if self.grammar is not None:
            out.append(self.grammar.processor())
        return out


def _grammar(m: Served, key: tuple, make) -> G.Grammar:
    cache = m.grammars
    with m.grammar_lock:  # requests build their constraints in worker threads
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    g = make()
    with m.grammar_lock:
        cache[key] = g
        while len(cache) > GRAMMAR_CACHE:
            cache.popitem(last=False)
    return g


def build_constraint(m: Served, req, max_new: int) -> Constraint | None:
    """The request's constraint, or None for free text; APIError 400 for a bad schema or a budget too small."""
    tok, eos = m.engine.tok, m.engine.eos_ids
    fmt = getattr(req, "response_format", None)
    g, param = None, "response_format"
    try:
        if getattr(req, "uses_tools", lambda: False)():
            choice = req.tool_choice or "auto"
            choice = choice if isinstance(choice, str) else choice.model_dump()
            tools = [t.model_dump(exclude_none=True) for t in req.tools]
            lark = toolcalls.tool_lark(tools, choice, req.parallel_tool_calls)
            g, param = _grammar(m, ("lark", lark), lambda: G.lark_grammar(tok, lark, eos)), "tools"
        elif fmt is not None and fmt.type == "json_object":
            g = _grammar(m, ("json_object",), lambda: G.json_object_grammar(tok, eos))
        elif fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema_
            text = json.dumps(schema, sort_keys=True)
            g = _grammar(m, ("schema", text), lambda: G.json_schema_grammar(tok, schema, eos))
    except ValueError as e:
        raise APIError(400, str(e), param) from None
    bias = req.bias()
    try:
        if bias:
            G.LogitBias(bias, m.engine.config.vocab_size)  # validates the ids against this model
    except ValueError as e:
        raise APIError(400, str(e), "logit_bias") from None
    if g is None and not bias:
        return None
    if g is not None:
        need = g.processor().closing()
        if need is not None and len(need) > max_new:
            raise APIError(400, f"max_tokens ({max_new}) is too small for the shortest answer this {param} allows "
                           f"({len(need)} tokens)", "max_tokens")
    return Constraint(g, bias, m.engine.config.vocab_size)
