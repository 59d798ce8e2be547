"""Structured output: logits processors that keep a row's output inside a grammar (JSON, a JSON schema, tool calls).

The grammar engine is llguidance (benchmarks/grammar_mask.py measured it, xgrammar and outlines-core on the default
model's 49,152-token vocabulary: llguidance and xgrammar both cost ~0.02-0.03 ms per token, outlines-core ~0.9 ms
and ~180 ms to compile a schema; llguidance compiles lazily in under 1 ms and can copy a matcher and test tokens
without committing them, which the budget check below needs).

A processor follows the decode core's protocol: `processor(logits (V,), remaining) -> logits (V,)` masks the next
token of one row (remaining = tokens left in the row's budget, this one included) and `processor.accept(token_id)`
advances it after the token is chosen. Budget: when the tokens left are barely enough to close the structure, the
processor forces the shortest closing it can find, so output cut by max_tokens still parses (finish_reason "length").
After the grammar is complete only the end-of-sequence tokens are allowed, also with ignore_eos (they add no text).
"""
from __future__ import annotations

import json
import threading

import torch

# single-character tokens tried, in this order, to close a structure quickly: closers first, openers last
_CLOSE_ORDER = '}]"0:' + "nulltruefalse" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ123456789.-_ " + ",[{"
_CLOSE_LIMIT = 256  # characters; beyond this the closing search gives up (pathological schemas)
_ZONE = 32  # within this many tokens of the shortest closing, each candidate's own closing is checked
_CHECK = 8  # in the closing zone, the top-k candidates whose closing is checked one by one
MAX_SCHEMA_BYTES = 64 << 10

_lock = threading.Lock()
_lltoks: dict[int, tuple] = {}


def _lltokenizer(tok, eos_ids: tuple[int, ...]):
    """llguidance's view of a tokenizer (built once per tokenizer and EOS set: ~0.5 s for 49k tokens)."""
    import llguidance

    key = (id(tok), eos_ids)
    with _lock:
        if key not in _lltoks:
            hf = tok.hf if hasattr(tok, "hf") else tok
            _lltoks[key] = (tok, llguidance.LLTokenizer(hf.to_str(), n_vocab=tok.vocab_size, eos_token=list(eos_ids)))
        return _lltoks[key][1]


class Grammar:
    """A compiled grammar for one tokenizer; `.processor()` makes a fresh per-row processor."""

    def __init__(self, tok, grammar: str, eos_ids, what: str = "grammar"):
        import llguidance

        self.tok, self.eos_ids = tok, tuple(sorted(set(eos_ids)))
        if not self.eos_ids:
            raise ValueError("constrained decoding needs at least one end-of-sequence token id")
        self.lltok = _lltokenizer(tok, self.eos_ids)
        err = llguidance.LLMatcher.validate_grammar(grammar, self.lltok)
        if err and not err.startswith("WARNING"):
            raise ValueError(f"invalid {what}: {err}")
        self.grammar = grammar
        self.closers = _closers(tok)
        self.quote, self.letter = _one_token(tok, '"'), _one_token(tok, "a")

    def processor(self) -> "GrammarProcessor":
        """A new processor at the start of the grammar."""
        return GrammarProcessor(self)


def _one_token(tok, text: str) -> int | None:
    ids = tok.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _closers(tok) -> list[int]:
    """Ids of the single-character tokens in _CLOSE_ORDER, in that order."""
    out = []
    for c in dict.fromkeys(_CLOSE_ORDER):
        ids = tok.encode(c, add_special_tokens=False)
        if len(ids) == 1:
            out.append(ids[0])
    return out


def json_schema_grammar(tok, schema: dict | bool, eos_ids) -> Grammar:
    """A grammar for JSON that validates against schema (compact separators, like OpenAI's strict mode)."""
    import llguidance

    if not isinstance(schema, (dict, bool)):
        raise ValueError("a JSON schema must be an object (or true/false)")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ValueError(f"the JSON schema is {len(text)} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
    try:
        g = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    except ValueError as e:
        raise ValueError(f"invalid JSON schema: {e}") from None
    return Grammar(tok, g, eos_ids, "JSON schema")


def json_object_grammar(tok, eos_ids) -> Grammar:
    """A grammar for any JSON object (OpenAI's response_format json_object)."""
    return json_schema_grammar(tok, {"type": "object"}, eos_ids)


def lark_grammar(tok, lark: str, eos_ids) -> Grammar:
    """A grammar from Lark text (llguidance's dialect: `%json {...}` embeds a JSON schema)."""
    import llguidance

    return Grammar(tok, llguidance.LLMatcher.grammar_from_lark(lark), eos_ids, "grammar")


class GrammarProcessor:
    """Masks one row's logits to the grammar; forces a closing when the budget runs out; EOS only once complete."""

    def __init__(self, grammar: Grammar):
        import llguidance

        self.g = grammar
        self.m = llguidance.LLMatcher(grammar.lltok, grammar.grammar)
        if self.m.is_error():
            raise ValueError(f"grammar: {self.m.get_error()}")
        n = grammar.tok.vocab_size
        self.words = (n + 31) // 32
        self.bits = torch.zeros(self.words, dtype=torch.int32)
        self.shifts = torch.arange(32, dtype=torch.int32)
        self.finished = False  # an EOS was accepted after the grammar completed

    # ---------------------------------------------------------------------------------------------------------
    def allowed(self) -> torch.Tensor:
        """Bool (vocab,) of the tokens the grammar allows next."""
        if self.finished or self.m.is_stopped() or self.m.is_error():
            mask = torch.zeros(self.g.tok.vocab_size, dtype=torch.bool)
            mask[list(self.g.eos_ids)] = True
            return mask
        self.m.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.words * 4)
        return ((self.bits[:, None] >> self.shifts) & 1).bool().flatten()[: self.g.tok.vocab_size]

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """logits (V,) -> logits with disallowed tokens at -inf (V may exceed the tokenizer's vocab: padding)."""
        allowed = self.allowed()
        V = logits.shape[-1]
        keep = torch.zeros(V, dtype=torch.bool, device=logits.device)
        keep[: allowed.shape[0]] = allowed[:V].to(logits.device)
        if not self.finished and not self.m.is_accepting():
            keep = self._budget(logits, keep, remaining)
        return logits.masked_fill(~keep, float("-inf"))

    def accept(self, token_id: int) -> None:
        """Advance past the chosen token (an EOS after completion finishes the row)."""
        if self.finished:
            return
        if token_id in self.g.eos_ids and (self.m.is_accepting() or self.m.is_stopped()):
            self.finished = True
            return
        self.m.consume_token(int(token_id))  # an invalid token puts the matcher in its error state: EOS only

    @property
    def done(self) -> bool:
        """The grammar is complete: the text so far is a full match."""
        return self.finished or self.m.is_accepting()

    # ---------------------------------------------------------------------------------------------------------
    def closing(self, m=None) -> list[int] | None:
        """The shortest closing found greedily (forced tokens, then single characters, closers first), or None."""
        m = (m or self.m).deep_copy()
        path = []
        while not m.is_accepting():
            if len(path) > _CLOSE_LIMIT or m.is_error() or m.is_stopped():
                return None
            ff = m.compute_ff_tokens()
            if ff:
                m.consume_tokens(ff)
                path += ff
                continue
            if self._quote_closes(m):
                path.append(self.g.quote)
                continue
            for t in self.g.closers:
                if m.try_consume_tokens([t]) == 1:
                    path.append(t)
                    break
            else:
                return None
        return path

    def _quote_closes(self, m) -> bool:
        """Inside a string a quote closes it (else '}' would just be more string): take it if it leaves the string."""
        q, letter = self.g.quote, self.g.letter
        if q is None or letter is None:
            return False
        c = m.deep_copy()
        if c.try_consume_tokens([q]) != 1 or (not c.is_accepting() and c.validate_tokens([letter]) == 1):
            return False
        m.consume_token(q)
        return True

    def _budget(self, logits: torch.Tensor, keep: torch.Tensor, remaining: int) -> torch.Tensor:
        """In the last tokens of the budget keep only tokens after which the structure can still close in time."""
        path = self.closing()
        if path is None or remaining > len(path) + _ZONE:
            return keep
        if remaining <= len(path):  # no room left for anything else: follow the closing
            out = torch.zeros_like(keep)
            out[path[0]] = True
            return out
        # a few tokens of slack: keep the model's best candidates whose own closing still fits
        out = torch.zeros_like(keep)
        out[path[0]] = True
        cand = logits.masked_fill(~keep, float("-inf")).topk(min(_CHECK, int(keep.sum()))).indices.tolist()
        for t in cand:
            m = self.m.deep_copy()
            if not m.consume_token(t):
                continue
            after = [] if m.is_accepting() else self.closing(m)
            if after is not None and len(after) <= remaining - 1:
                out[t] = True
        return out


class LogitBias:
    """OpenAI's logit_bias: {token id: bias in [-100, 100]} added to the logits (-100 bans, 100 all but forces)."""

    def __init__(self, bias: dict[int, float], vocab_size: int):
        for t, b in bias.items():
            if not 0 <= t < vocab_size:
                raise ValueError(f"logit_bias token id {t} is outside the vocabulary [0, {vocab_size})")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias value {b} for token {t} must be in [-100, 100]")
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        out = logits.clone()
        out[self.ids.to(out.device)] += self.values.to(out.device, out.dtype)
        return out

    def accept(self, token_id: int) -> None:
        pass


def apply_processors(processors, logits: torch.Tensor, remaining: int) -> torch.Tensor:
    """Run logits (V,) through each processor in order."""
    for p in processors:
        logits = p(logits, remaining)
    return logits
