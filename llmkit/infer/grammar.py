"""Structured output: logits processors that keep a row's output inside a grammar (JSON, a JSON schema, tool calls).

The grammar engine is llguidance (benchmarks/grammar_mask.py measured it, xgrammar and outlines-core on the default
model's 49,152-token vocabulary: llguidance and xgrammar both cost ~0.02-0.03 ms per token, outlines-core ~1-2 ms
and ~0.2-0.5 s to compile a schema; llguidance compiles lazily in under 1 ms and can copy a matcher and test tokens
without committing them, which the budget check below needs).

A processor follows the decode core's protocol: `processor(logits (V,), remaining) -> logits (V,)` masks the next
token of one row (remaining = tokens left in the row's budget, this one included) and `processor.accept(token_id)`
advances it after the token is chosen. Budget: when the tokens left are barely enough to close the structure, the
processor forces the shortest closing it can find, so output cut by max_tokens still parses (finish_reason "length").
The closing is found greedily (forced text, then single characters, closers first); within _ZONE tokens of it the
model's top candidates are kept only if their own closing still fits. A single token that lengthens the closing by
more than _ZONE tokens before that zone (a huge required object opened by one token) could still overrun the budget.
After the grammar is complete only the end-of-sequence tokens are allowed, also with ignore_eos (they add no text).
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

# single-character tokens tried, in this order, to close a structure quickly: closers first, openers last
_CLOSE_ORDER = '}]"0:' + "nulltruefalse" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ123456789.-_ " + ",[{"
_CLOSE_LIMIT = 256  # characters; beyond this the closing search gives up (pathological schemas)
_ZONE = 16  # within this many tokens of the shortest closing, each candidate's own closing is checked
_CHECK = 4  # in the closing zone, the top-k candidates whose closing is checked one by one
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
        self.finished = False  # an EOS was accepted after the grammar completed

    # ---------------------------------------------------------------------------------------------------------
    # Masks are numpy arrays: on a busy CPU each small torch op on a 49k vector can cost milliseconds (thread pool
    # wake-ups), numpy's single-threaded ones cost microseconds.

    def allowed(self) -> np.ndarray:
        """Bool (vocab,) of the tokens the grammar allows next."""
        n = self.g.tok.vocab_size
        if self.finished or self.m.is_stopped() or self.m.is_error():
            mask = np.zeros(n, dtype=bool)
            mask[list(self.g.eos_ids)] = True
            return mask
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return bits[:n].astype(bool)

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """logits (V,) -> logits with disallowed tokens at -inf (V may exceed the tokenizer's vocab: padding)."""
        x = logits.detach().float().cpu().numpy()
        keep = np.zeros(x.shape[0], dtype=bool)
        allowed = self.allowed()[: x.shape[0]]
        keep[: allowed.shape[0]] = allowed
        if not self.finished and not self.m.is_accepting():
            keep = self._budget(x, keep, remaining)
        out = np.where(keep, x, np.float32(-np.inf)).astype(np.float32, copy=False)
        return torch.from_numpy(out).to(logits.device)

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
    def closing(self, m=None, limit: int = _CLOSE_LIMIT) -> list[int] | None:
        """The shortest closing found greedily (forced tokens, then single characters, closers first), or None
        (also when it would be longer than limit tokens)."""
        m = (m or self.m).deep_copy()
        path, q, letter = [], self.g.quote, self.g.letter
        while not m.is_accepting():
            if len(path) > limit or m.is_error() or m.is_stopped():
                return None
            ff = m.compute_ff_tokens()
            if ff:
                m.consume_tokens(ff)
                path += ff
                continue
            mask = m.compute_bitmask()  # one bit per token: testing a candidate is a byte lookup
            t = None
            if q is not None and _bit(mask, q):  # inside a string a quote closes it (else '}' is more string)
                c = m.deep_copy()
                c.consume_token(q)
                if c.is_accepting() or letter is None or not _bit(c.compute_bitmask(), letter):
                    t = q
            if t is None:
                t = next((c for c in self.g.closers if _bit(mask, c)), None)
            if t is None:
                return None
            m.consume_token(t)
            path.append(t)
        return path

    def _budget(self, x: np.ndarray, keep: np.ndarray, remaining: int) -> np.ndarray:
        """In the last tokens of the budget keep only tokens after which the structure can still close in time."""
        path = self.closing()
        if path is None or remaining > len(path) + _ZONE:
            return keep
        out = np.zeros_like(keep)
        out[path[0]] = True
        if remaining <= len(path):  # no room left for anything else: follow the closing
            return out
        # a few tokens of slack: keep the model's best candidates whose own closing still fits
        scores = np.where(keep, x, -np.inf)
        k = min(_CHECK, int(keep.sum()))
        for t in np.argpartition(-scores, k - 1)[:k].tolist() if k else []:
            m = self.m.deep_copy()
            if not keep[t] or not m.consume_token(t):
                continue
            after = [] if m.is_accepting() else self.closing(m, limit=remaining - 1)
            if after is not None and len(after) <= remaining - 1:  # (the limit may be overshot by forced tokens)
                out[t] = True
        return out


def _bit(mask: bytes, t: int) -> bool:
    return bool(mask[t >> 3] >> (t & 7) & 1)


class LogitBias:
    """OpenAI's logit_bias: {token id: bias in [-100, 100]} added to the logits (-100 bans, 100 all but forces)."""

    def __init__(self, bias: dict[int, float], vocab_size: int):
        for t, b in bias.items():
            if not 0 <= t < vocab_size:
                raise ValueError(f"logit_bias token id {t} is outside the vocabulary [0, {vocab_size})")
            if not -100 <= b <= 100:
                raise ValueError(f"logit_bias value {b} for token {t} must be in [-100, 100]")
        self.ids = np.array(list(bias), dtype=np.int64)
        self.values = np.array(list(bias.values()), dtype=np.float32)

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        out = logits.detach().float().cpu().numpy().copy()
        ok = self.ids < out.shape[0]
        out[self.ids[ok]] += self.values[ok]
        return torch.from_numpy(out).to(logits.device)

    def accept(self, token_id: int) -> None:
        pass


def apply_processors(processors, logits: torch.Tensor, remaining: int) -> torch.Tensor:
    """Run logits (V,) through each processor in order."""
    for p in processors:
        logits = p(logits, remaining)
    return logits
