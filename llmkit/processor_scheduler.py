"""Adapter: the current scheduler with per-request logits processors (grammars, logit_bias), until the decode core
takes them itself.

The scheduler samples JSON-mode rows one by one through `_sample_json`; a request that carries `processors` is
marked JSON mode and sampled here instead: penalties, then each processor (llmkit.grammar's protocol:
`processor(logits (V,), remaining) -> logits`, then `processor.accept(token)`), then greedy or filtered sampling
with the request's own generator. A processor that raises fails its own request only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.engine import apply_penalties, filter_logits
from llmkit.grammar import apply_processors
from llmkit.scheduler import Request, Scheduler


@dataclass
class ProcessorRequest(Request):
    """A scheduler request with logits processors (an empty list decodes like a plain request)."""
    processors: list = field(default_factory=list)

    def __post_init__(self):
        if self.processors:
            self.json_mode = True  # routes its rows through _sample_json


class ProcessorScheduler(Scheduler):
    """Scheduler whose requests may carry logits processors."""

    def _sample_json(self, r, logits: torch.Tensor) -> int:
        procs = getattr(r, "processors", None)
        if not procs:
            return super()._sample_json(r, logits)
        p, st = r.params, r.state
        eos = min(st.stop_ids) if st.stop_ids else 0
        try:
            row = logits.float()
            if p.penalized:
                row = apply_penalties(row, p, r.prompt_ids, st.token_ids)
            row = apply_processors(procs, row, st.max_new - len(st.token_ids))
            if not bool(torch.isfinite(row).any()):
                t = eos
            elif p.greedy:
                t = int(row.argmax())
            else:
                t = int(torch.multinomial(filter_logits(row, p).softmax(-1), 1, generator=st.generator))
            for proc in procs:
                proc.accept(t)
            return t
        except Exception as e:  # this request fails alone; its row leaves before the next step
            r.cancelled = True
            r.emit(("error", f"constrained decoding failed: {type(e).__name__}: {e}"))
            return eos


def stream_constrained(engine, prompt_ids: list[int], params, processors: list):
    """Text pieces of one constrained generation (the CLI's --json-schema), on a one-row ProcessorScheduler."""
    import queue

    q: queue.Queue = queue.Queue()
    max_new = min(params.max_new_tokens, engine.config.max_position_embeddings - len(prompt_ids))
    if max_new < 1:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens: no room left in the model's context")
    sched = ProcessorScheduler(engine, max_batch=1, max_queue=0)
    try:
        sched.submit([ProcessorRequest(prompt_ids, params, max_new, q.put, processors=processors)])
        while True:
            kind, value = q.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise RuntimeError(value)
            else:
                return
    finally:
        sched.close()
