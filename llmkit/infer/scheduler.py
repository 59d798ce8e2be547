"""Continuous batching for the server: a queue in front of the engine's decode core, in one background thread.

The scheduler only queues, admits, cancels and hands events to HTTP: all decoding (prefill, sampling, stops, logprobs,
JSON mode, the KV cache) is engine.DecodeBatch's. Each loop admits waiting requests while the core has a row and KV
blocks for them (a request that does not fit waits), runs one core step, and passes every event to its request's
`emit`. A request that finishes, is cancelled or whose client went away leaves the core at once and its blocks return
to the pool.
"""
from __future__ import annotations

import bisect
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from llmkit.infer.engine import Engine, RequestState, SamplingParams


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
    processors: list = field(default_factory=list)  # logits processors for this request (constraints.py protocol)
    cancelled: bool = False
    state: RequestState | None = None  # engine's per-row state: tokens, text, stop strings, logprobs, finish_reason
    t_submit: float = 0.0
    t_last: float = 0.0
    started: bool = False  # has its first token
    counted: int = 0  # generated tokens already in the stats

    @property
    def finish_reason(self) -> str | None:
        return self.state.finish_reason if self.state is not None else None

    @property
    def prompt_scores(self) -> list | None:
        """Per prompt token: (logprob or None, [(token id, logprob)...]), with prompt_logprobs."""
        return self.state.prompt_scores if self.state is not None else None


class Scheduler:
    """Runs requests for one model with continuous batching in a background thread."""

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.engine, self.model, self.tok = engine, engine.model, engine.tok
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = engine.config.max_position_embeddings
        self.core = engine.decode_batch(max_batch)
        self.running: dict[int, Request] = {}  # core row id -> request
        self.waiting: collections.deque[Request] = collections.deque()
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
            r.state = self.engine.new_state(r.prompt_ids, r.params, r.max_new, list(r.processors), r.prompt_logprobs)
            need, pool = self.core.blocks_needed(r.state), self.engine.pool
            if need > pool.n_blocks:
                raise ValueError(f"prompt + max_tokens need {need * pool.block_bytes / 2**20:.0f} MB of KV cache, "
                                 f"more than the server's {pool.kv_cache_mb:.0f} MB (--kv-cache-mb)")
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
        """Mark requests cancelled; they leave the batch before the next step (their blocks are freed)."""
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
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
                for rid, r in list(self.running.items()):
                    if r.cancelled:
                        self.core.cancel(rid)
                        del self.running[rid]
                # admit in arrival order while the core has a row and KV blocks; the rest wait
                while self.waiting and self.core.can_add(self.waiting[0].state):
                    r = self.waiting.popleft()
                    self.running[self.core.add(r.state)] = r
                    self.stats.prompt_tokens += len(r.prompt_ids)
            try:
                events = self.core.step()
            except Exception as e:  # noqa: BLE001 (the core isolates rows; this is a bug guard, never the server)
                events = []
                for rid, r in list(self.running.items()):
                    r.state.fail(f"generation failed: {e}")
                    self.core.cancel(rid)
                    events.append(_Failed(rid, r.state.error))
            self._deliver(events)

    def _deliver(self, events):
        now = time.perf_counter()
        for ev in events:
            r = self.running.get(ev.id)
            if r is None:
                continue
            if ev.kind == "token":
                (self.stats.tpot if r.started else self.stats.ttft).observe(now - r.t_last)
                r.t_last, r.started = now, True
                self.stats.generated_tokens += len(r.state.token_ids) - r.counted  # a stop token is not counted
                r.counted = len(r.state.token_ids)
                if ev.text:
                    r.emit(("piece", ev.text))
            elif ev.kind == "done":
                del self.running[ev.id]
                r.emit(("done", None))
            else:
                del self.running[ev.id]
                r.emit(("error", f"generation failed: {ev.text}"))


@dataclass
class _Failed:
    id: int
    text: str
    kind: str = "error"
