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

JsonObject (OpenAI's response_format {"type": "json_object"}, `llmkit generate --json`): the output is one JSON object.
"""
from __future__ import annotations

import re
import weakref

import torch

_NUMBER_PREFIX = re.compile(r"-?(0|[1-9]\d*)?(\.\d*)?([eE][+-]?\d*)?")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_LITERALS = ("true", "false", "null")


class JsonPrefix:
    """Accepts text while it can still grow into a valid JSON object; `done` once the object is closed."""

    def __init__(self):
        self.stack: list[str] = []  # open containers: "{" or "["
        self.mode = "start"  # start|value|key|key_or_end|colon|after|string|escape|unicode|number|literal|done
        self.is_key, self.word, self.hex, self.spaces = False, "", 0, 0

    def copy(self) -> "JsonPrefix":
        c = JsonPrefix.__new__(JsonPrefix)
        c.__dict__.update(self.__dict__, stack=list(self.stack))
        return c

    @property
    def done(self) -> bool:
        return self.mode == "done"

    def feed(self, text: str) -> bool:
        """Advance over text; False (state then undefined) if it cannot start a valid JSON object."""
        return all(self._char(c) for c in text)

    def closing(self) -> str:
        """The shortest text that completes the object from here."""
        m, tail = self.mode, ""
        if m in ("string", "escape", "unicode"):
            tail = {"string": "", "escape": "n", "unicode": "0" * (4 - self.hex)}[m] + '"' + (":null" if self.is_key else "")
        elif m == "number":
            tail = "0" if not _NUMBER.fullmatch(self.word) else ""
        elif m == "literal":
            tail = next(w for w in _LITERALS if w.startswith(self.word))[len(self.word):]
        elif m == "start":
            return "{}"
        else:
            tail = {"value": "null", "key": '"":null', "colon": ":null"}.get(m, "")
        return tail + "".join("}" if s == "{" else "]" for s in reversed(self.stack))

    def _close_value(self):
        self.mode = "after" if self.stack else "done"

    def _char(self, c: str) -> bool:
        m = self.mode
        if m == "string":
            if c == '"':
                self.mode = "colon" if self.is_key else "after"
                if not self.is_key:
                    self._close_value()
            elif c == "\\":
                self.mode = "escape"
            return c >= " " or c == "\ufffd"  # raw control characters are not allowed in JSON strings
        if m == "escape":
            if c == "u":
                self.mode, self.hex = "unicode", 0
                return True
            self.mode = "string"
            return c in '"\\/bfnrt'
        if m == "unicode":
            self.hex += 1
            if self.hex == 4:
                self.mode = "string"
            return c in "0123456789abcdefABCDEF"
        if m == "number":
            if _NUMBER_PREFIX.fullmatch(self.word + c):
                self.word += c
                return True
            if not _NUMBER.fullmatch(self.word):
                return False
            self._close_value()
            return self._char(c)
        if m == "literal":
            self.word += c
            if self.word in _LITERALS:
                self._close_value()
            return any(w.startswith(self.word) for w in _LITERALS)
        if c in " \t\n\r":  # whitespace between tokens: allowed, but not forever
            self.spaces += 1
            return m != "done" and self.spaces <= 16
        self.spaces = 0
        if m == "start":
            if c == "{":
                self.stack.append("{")
                self.mode = "key_or_end"
            return c == "{"  # json_object: the top level must be an object
        if m in ("key", "key_or_end"):
            if c == '"':
                self.mode, self.is_key = "string", True
                return True
            if c == "}" and m == "key_or_end":
                self.stack.pop()
                self._close_value()
                return True
            return False
        if m == "colon":
            self.mode = "value"
            return c == ":"
        if m == "value" or m == "array_first":
            if c == "]" and m == "array_first":
                self.stack.pop()
                self._close_value()
                return True
            if c in "{[":
                self.stack.append(c)
                self.mode = "key_or_end" if c == "{" else "array_first"
            elif c == '"':
                self.mode, self.is_key = "string", False
            elif c in "-0123456789":
                self.mode, self.word = "number", c
            elif c in "tfn":
                self.mode, self.word = "literal", c
            else:
                return False
            return True
        if m == "after":
            top = self.stack[-1]
            if c == ",":
                self.mode = "key" if top == "{" else "value"
                return True
            if c == ("}" if top == "{" else "]"):
                self.stack.pop()
                self._close_value()
                return True
        return False


# ---------------------------------------------------------------------------------------------------------------
# JSON mode as a processor


class JsonObject:
    """Keeps a row's text a prefix of one JSON object; allows only the end-of-sequence token once it is closed.

    Candidates are checked in order of their logits: the valid ones among the first `top` are kept (more are
    scanned until at least one is valid), so greedy decoding picks the best valid token and sampling draws among the
    likely valid ones. When the budget is about to run out, the tokens that close the object are forced.
    """

    def __init__(self, tok, eos_ids, top: int = 64):
        if tok is None:
            raise ValueError("JSON mode needs a tokenizer")
        self.tok, self.top = tok, top
        self.eos = min(eos_ids) if eos_ids else None
        self.json = JsonPrefix()
        self.special = set(getattr(tok, "all_special_ids", []) or [])
        self._texts = _token_texts(tok)

    def text(self, t: int) -> str:
        return self._texts[t] if t < len(self._texts) else ""

    def __call__(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        allowed = self._allowed(logits, remaining)
        out = torch.full_like(logits, float("-inf"))
        out[allowed] = logits[allowed]
        return out

    def _allowed(self, logits, remaining) -> list[int]:
        if self.json.done:
            return [self.eos] if self.eos is not None else []
        closing = self.json.closing()
        forced = self.tok.encode(closing, add_special_tokens=False) if closing else []
        if forced and remaining <= len(forced) + 1:  # out of budget: close the object so it still parses
            return forced[:1]
        ok = []
        for i, t in enumerate(logits.argsort(descending=True).tolist()):
            if i >= self.top and ok:
                break
            if t not in self.special and self.text(t) and self.json.copy().feed(self.text(t)):
                ok.append(t)
        return ok or forced[:1] or ([self.eos] if self.eos is not None else [])

    def accept(self, token_id: int):
        if token_id not in self.special and token_id != self.eos and not self.json.done:
            self.json.feed(self.text(token_id))


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> the text of every token id


def _token_texts(tok) -> list[str]:
    key = tok
    if key not in _TEXTS:
        n = tok.hf.get_vocab_size(with_added_tokens=True) if hasattr(tok, "hf") else len(tok)
        if hasattr(tok, "hf"):  # one batched call: ~100x faster than one decode per token
            texts = tok.hf.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        else:
            texts = [tok.decode([i]) for i in range(n)]
        _TEXTS[key] = texts
    return _TEXTS[key]


def json_object(engine) -> JsonObject:
    """A JSON-object processor for one request on this engine (its tokenizer and end-of-sequence ids)."""
    return JsonObject(engine.tok, engine.eos_ids)
