"""Continuous batching: many requests share one decode step; new ones join and finished ones leave between steps.

One background thread owns the model. Running requests sit packed in rows 0..n-1 of one KV cache of --max-batch rows;
each step runs the model on a view of those n rows only, so idle rows cost nothing. A new request is prefilled alone
into the next free row (a plain causal forward on a 1-row view of the big cache, so nothing is copied); a request
that finishes, is cancelled or whose client went away leaves at once, and the last running row moves into its place.
Rows hold different lengths: the model masks every slot that is not one of that row's own tokens.

Sampling, penalties, stop strings and incremental detokenization are engine.py's; each request has its own
torch.Generator, so a seeded request gives the same tokens alone or batched.
"""
from __future__ import annotations

import bisect
import collections
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmkit.engine import Engine, SamplingParams, RequestState, apply_penalties, filter_logits, sample_next
from llmkit.model import KVCache


class QueueFull(Exception):
    """Raised by submit() when --max-batch are running and --max-queue are waiting."""


# ---------------------------------------------------------------------------------------------------------------
# Metrics (rendered as Prometheus text by the server)


class Histogram:
    """Cumulative-bucket histogram in seconds, Prometheus style."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = list(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, x: float):
        i = bisect.bisect_left(self.buckets, x)
        for j in range(i, len(self.buckets)):
            self.counts[j] += 1
        self.sum += x
        self.count += 1


@dataclass
class Stats:
    requests: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram([.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30]))
    tpot: Histogram = field(default_factory=lambda: Histogram([.005, .01, .02, .05, .1, .2, .5, 1, 2.5]))


# ---------------------------------------------------------------------------------------------------------------
# JSON mode: a character-level check that the output stays a prefix of one JSON object


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
# Requests


@dataclass
class Request:
    """One generation in the scheduler; `emit` receives ("piece", text), then ("done", None) or ("error", message).

    emit is called from the scheduler thread: the server wraps it with loop.call_soon_threadsafe.
    """
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int  # 0: prefill only (prompt logprobs with echo)
    emit: Callable
    prompt_logprobs: bool = False  # also score the prompt's own tokens (completions with echo + logprobs)
    json_mode: bool = False
    cancelled: bool = False
    state: RequestState | None = None  # engine's per-row state: tokens, text, stop strings, logprobs, finish_reason
    prompt_scores: list | None = None  # per prompt token: (logprob or None, [(token, logprob)...])
    json: JsonPrefix | None = None
    t_submit: float = 0.0
    t_last: float = 0.0
    started: bool = False  # has its first token

    @property
    def finish_reason(self) -> str | None:
        return self.state.finish_reason if self.state is not None else None


class Scheduler:
    """Runs requests for one model with continuous batching in a background thread."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.engine, self.model, self.tok = engine, engine.model, engine.tok
        self._texts: dict[int, str] = {}  # JSON mode: token id -> its text
        self._special_ids = set(getattr(self.tok, "all_special_ids", []) or [])
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = engine.config.max_position_embeddings
        # the cache grows in length on demand (doubling): a full-context cache for every row would waste memory
        self.cache = KVCache(engine.config, max_batch, min(256, self.context), engine.dtype, engine.device)
        self.running: list[Request] = []  # request in row i of the cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.last_tokens: list[int] = []  # each running row's latest token, the next decode step's input
        self.stats = Stats()
        self.lock = threading.Condition()
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name="llmkit-scheduler", daemon=True)
        self.thread.start()

    # -----------------------------------------------------------------------------------------------------------
    # called from the server's threads

    def submit(self, requests: list[Request]):
        """Queue requests (all or none); raises QueueFull when they do not fit in running + waiting."""
        for r in requests:
            if len(r.prompt_ids) + r.max_new > self.context or not r.prompt_ids:
                raise ValueError(f"prompt of {len(r.prompt_ids)} tokens + {r.max_new} new tokens does not fit the "
                                 f"context of {self.context}")
        with self.lock:
            busy = len(self.running) + len(self.waiting)
            if busy + len(requests) > self.max_batch + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"server busy: {len(self.running)} running, {len(self.waiting)} waiting; retry later")
            now = time.perf_counter()
            for r in requests:
                r.t_submit = r.t_last = now
                self.waiting.append(r)
            self.stats.requests += len(requests)
            self.lock.notify()

    def cancel(self, requests: list[Request]):
        """Mark requests cancelled; they leave the batch before the next step (their slot is freed)."""
        for r in requests:
            r.cancelled = True
        with self.lock:
            self.lock.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def close(self):
        with self.lock:
            self._closed = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # -----------------------------------------------------------------------------------------------------------
    # the model thread

    def _loop(self):
        while True:
            with self.lock:
                while not self._closed and not self.waiting and not self.running:
                    self.lock.wait()
                if self._closed:
                    return
                # drop cancelled waiters, then admit into free rows
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
                admit = []
                while self.waiting and len(self.running) + len(admit) < self.max_batch:
                    admit.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    for r in admit:
                        self._prefill(r)
                    self._leave()
                    if self.running:
                        self._decode()
                        self._leave()
            except Exception as e:  # a failed step fails the requests in it, never the server
                for r in {id(x): x for x in self.running + admit}.values():
                    if r.finish_reason is None:
                        r.emit(("error", f"generation failed: {e}"))
                self.cache.reset_rows(range(self.cache.batch_size))
                self.running, self.last_tokens = [], []

    def _view(self, lo: int, hi: int) -> KVCache:
        # rows lo..hi-1 of the big cache as a KVCache of their own: slices are views, so the model writes in place
        c, v = self.cache, KVCache.__new__(KVCache)
        v.k, v.v = [k[lo:hi] for k in c.k], [x[lo:hi] for x in c.v]
        v.valid, v.n_tokens, v.length = c.valid[lo:hi], c.n_tokens[lo:hi], c.length[lo:hi]
        v.max_len, v.has_padding = c.max_len, False
        return v

    def _forward(self, ids: torch.Tensor, lo: int, hi: int, last_only: bool = True) -> torch.Tensor:
        need = max(self.cache.length[lo:hi]) + ids.shape[1]
        if need > self.cache.max_len:
            self._grow(need)
        view = self._view(lo, hi)
        logits = self.model(ids, cache=view, last_only=last_only)
        self.cache.length[lo:hi] = view.length  # the model advanced the view's copy of the length list
        return logits

    def _grow(self, need: int):
        c = self.cache
        new = min(self.context, max(need, 2 * c.max_len))
        old = c.max_len

        def bigger(t):  # (B, n_kv_head, L, head_dim) -> (B, n_kv_head, new, head_dim)
            out = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
            out[:, :, :old] = t
            return out

        c.k = [bigger(k) for k in c.k]
        c.v = [bigger(v) for v in c.v]
        valid = c.valid.new_zeros(c.valid.shape[0], new)
        valid[:, :old] = c.valid
        c.valid, c.max_len = valid, new

    def _prefill(self, r: Request):
        r.state = self.engine.new_state(r.prompt_ids, r.params, max(r.max_new, 1))
        r.json = JsonPrefix() if r.json_mode else None
        if r.cancelled:
            return
        row = len(self.running)
        self.cache.reset_rows([row])
        ids = torch.tensor([r.prompt_ids], device=self.engine.device)
        logits = self._forward(ids, row, row + 1, last_only=not r.prompt_logprobs)  # (1, T or 1, V)
        self.stats.prompt_tokens += len(r.prompt_ids)
        if r.prompt_logprobs:
            r.prompt_scores = self._score_prompt(r, logits[0])
        self.running.append(r)
        self.last_tokens.append(0)
        if r.max_new == 0:
            r.state.finish_reason = "length"
            r.emit(("done", None))
            return
        self._advance([row], logits[:, -1])

    def _score_prompt(self, r: Request, logits: torch.Tensor) -> list:
        lp = logits[:-1].float().log_softmax(-1)  # position i predicts token i + 1
        ids = torch.tensor(r.prompt_ids[1:], device=lp.device)
        chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
        k = r.params.top_logprobs
        tops = [[]] * len(chosen)
        if k:
            values, top_ids = lp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        return [(None, [])] + list(zip(chosen, tops))

    def _decode(self):
        n = len(self.running)
        ids = torch.tensor(self.last_tokens, device=self.engine.device)[:, None]  # (n, 1)
        logits = self._forward(ids, 0, n)[:, -1]  # (n, V)
        self._advance(list(range(n)), logits)

    def _advance(self, rows: list[int], logits: torch.Tensor):
        """Sample one token for each of rows (logits (len(rows), V)) and hand the text to its client."""
        reqs = [self.running[i] for i in rows]
        plain = [j for j, r in enumerate(reqs) if r.json is None]
        tokens = [0] * len(rows)
        if plain:
            sub = [reqs[j] for j in plain]
            history = [(r.prompt_ids, r.state.token_ids) for r in sub] if any(r.params.penalized for r in sub) else None
            plain_logits = logits if len(plain) == len(rows) else logits[plain]  # usually every row: no copy
            out = sample_next(plain_logits, [r.params for r in sub], [r.state.generator for r in sub], history)
            for j, t in zip(plain, out.tolist()):
                tokens[j] = t
        for j, r in enumerate(reqs):
            if r.json is not None:
                tokens[j] = self._sample_json(r, logits[j])
        logprobs = logits.float().log_softmax(-1) if any(r.params.logprobs for r in reqs) else None
        now = time.perf_counter()
        for j, (i, r, t) in enumerate(zip(rows, reqs, tokens)):
            self.last_tokens[i] = t
            piece = r.state.add(t, logprobs[j] if logprobs is not None else None)
            if r.json is not None and t not in r.state.stop_ids:
                r.json.feed(self._token_text(t))
            (self.stats.tpot if r.started else self.stats.ttft).observe(now - r.t_last)
            r.t_last, r.started = now, True
            if t not in r.state.stop_ids:
                self.stats.generated_tokens += 1
            if piece:
                r.emit(("piece", piece))
            if r.finish_reason is not None:
                r.emit(("done", None))

    def _leave(self):
        """Free the rows of finished and cancelled requests; the last running row moves into each hole."""
        for i in range(len(self.running) - 1, -1, -1):
            r = self.running[i]
            if r.finish_reason is None and not r.cancelled:
                continue
            last = len(self.running) - 1
            if i != last:
                self._move_row(last, i)
                self.running[i], self.last_tokens[i] = self.running[last], self.last_tokens[last]
            self.cache.reset_rows([last])
            self.running.pop()
            self.last_tokens.pop()

    def _move_row(self, src: int, dst: int):
        c = self.cache
        n = c.length[src]
        for t in c.k + c.v:
            t[dst, :, :n] = t[src, :, :n]
        c.valid[dst] = c.valid[src]
        c.n_tokens[dst] = c.n_tokens[src]
        c.length[dst] = n

    # -----------------------------------------------------------------------------------------------------------
    # JSON mode sampling

    def _token_text(self, t: int) -> str:
        if t not in self._texts:
            self._texts[t] = self.tok.decode([t])
        return self._texts[t]

    def _sample_json(self, r: Request, logits: torch.Tensor) -> int:
        """Next token that keeps the text a prefix of a JSON object; EOS once it is complete.

        Candidates come in the order the sampler would draw them (argsort for greedy, sampling without replacement
        otherwise), so the first valid one is a draw from the distribution restricted to valid tokens.
        """
        p, st = r.params, r.state
        eos = min(st.stop_ids) if st.stop_ids else None
        if r.json.done and eos is not None:
            return eos
        closing = r.json.closing()
        left = st.max_new - len(st.token_ids)
        forced = self.tok.encode(closing, add_special_tokens=False) if closing else []
        if forced and left <= len(forced) + 1:  # out of budget: close the object so it still parses
            return forced[0]
        row = logits.float()
        if p.penalized:
            row = apply_penalties(row, p, r.prompt_ids, st.token_ids)
        special = self._special_ids
        if p.greedy:
            order = row.argsort(descending=True)
        else:
            probs = filter_logits(row, p).softmax(-1)
            k = int((probs > 0).sum())
            order = torch.multinomial(probs, min(k, 64), replacement=False, generator=st.generator)
            order = torch.cat([order, row.argsort(descending=True)])  # then everything else, best first
        for t in order.tolist():
            if t in special:
                continue
            text = self._token_text(t)
            if text and r.json.copy().feed(text):
                return t
        return forced[0] if forced else eos
