"""Inference: one decode core (DecodeBatch) that the library, the CLI, the server's scheduler and evaluation drive.

DecodeBatch is synchronous: add(request), step() -> events, cancel(id). Each step runs one forward over a packed
batch (kvcache.PackedKV, no padding): one token for every row that is decoding, plus chunks of the prompts still being
prefilled, up to `prefill_chunk` tokens, so a long prompt never stalls the running streams (vLLM V1's token budget,
llama.cpp's n_batch). Keys and values live in one contiguous kvcache.RowKV per row, reserved in blocks from a bounded
kvpool.BlockPool; full blocks go to a prefix cache, so a repeated system prompt or chat history is copied, not
recomputed. After the forward, each row is sampled, stopped and detokenized on its own: an exception there fails that
row alone; if the forward itself raises, the rows are retried one by one so that only the culprit fails.

Sampling parameters, the sampler and the per-request state are sampling.py's (re-exported here).
"""
from __future__ import annotations

import warnings
from contextlib import closing, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from llmkit.infer import compiled
from llmkit.infer.kvpool import TRIM_BYTES, BlockPool, trim_heap
from llmkit.infer.speculative import Speculation, accepted_run
from llmkit.model.linear import one_row_products
from llmkit.model.logits import HEAD_MARGIN
from llmkit.model.transformer import PackedKV, RowKV, Transformer
from llmkit.infer.sampling import (  # noqa: F401  (re-exported: the public API has always been engine's)
    Completion, RequestState, SamplingParams, apply_penalties, filter_logits, sample_next, stop_prefix_len)

INITIAL_DECODE_ROOM = 64  # tokens a new row's storage holds beyond its prompt before it first grows

# Batch invariance. By default rows share one forward: the matrix products of a step see 1 to N rows, and a kernel
# may sum in another order for another row count (torch's float32 path switches kernels at 16 rows, bf16 weights at
# 3), so the last bits of a row's hidden states can depend on its neighbours, and at a near-tie so can a greedy
# token. With batch_invariant=True (serve/generate --batch-invariant, as vLLM's mode) each row runs its own forward
# and LM head, prompts are prefilled whole and the prefix cache is not read: a row computes exactly what it would
# alone, at the cost of batching's speed (benchmarks/batch_invariance.py measures both).


@dataclass
class Event:
    """What one step did to one request: "token" (text: what can be shown now, maybe ""), "done" or "error"."""
    id: int
    kind: str
    text: str = ""


class _Row:
    """The core's bookkeeping for one request."""

    def __init__(self, state: RequestState, blocks: int):
        self.state, self.blocks = state, blocks
        self.kv: RowKV | None = None
        self.computed = 0  # prompt tokens whose keys/values are stored
        self.next_input: int | None = None  # the token the next decode step feeds
        self.leader: _Row | None = None  # an identical prompt that prefills for this row too (n choices)
        self.drafter = None  # a speculative.NgramDrafter or ModelDrafter where this row speculates
        self.drafts: list[int] = []  # the draft tokens this step verifies after next_input
        self.k = 0  # how many tokens it drafts next (Speculation.next_k; 0: not yet set)

    @property
    def decoding(self) -> bool:
        return self.next_input is not None


class DecodeBatch:
    """The running rows of one model: their KV cache, prefill, sampling, stops, logprobs and logits processors."""

    def __init__(self, model: Transformer, pool: BlockPool, max_rows: int = 64, prefill_chunk: int = 512,
                 batch_invariant: bool = False, speculation: Speculation | None = None, step=None):
        """batch_invariant: every row computes exactly what it would alone (see the note on batch invariance);
        speculation: greedy rows draft and verify several tokens a step (speculative.py), with the same output;
        step: a compiled.CompiledStep, which a row decoding alone (one token, no drafts) runs through."""
        if max_rows < 1 or prefill_chunk < max_rows:
            raise ValueError(f"need max_rows >= 1 and prefill_chunk >= max_rows, got {max_rows}, {prefill_chunk}")
        self.model, self.pool, self.cfg = model, pool, model.config
        self.max_rows, self.prefill_chunk, self.batch_invariant = max_rows, prefill_chunk, batch_invariant
        param = next(model.parameters())
        self.device, self.dtype = param.device, model.activation_dtype
        self.rows: dict[int, _Row] = {}  # in admission order
        self._next_id = 0
        self.spec, self.compiled = speculation, step
        # dense products sum in another order for another row count: verified rows then run alone (speculative.py)
        self.row_invariant = not any(isinstance(m, nn.Linear) for m in model.modules())

    def __len__(self) -> int:
        return len(self.rows)

    def blocks_needed(self, state: RequestState) -> int:
        return self.pool.blocks_for(len(state.prompt_ids) + state.max_new)

    def can_add(self, state: RequestState) -> bool:
        """Whether a row and the blocks for its prompt + max_new tokens are free now."""
        return len(self.rows) < self.max_rows and self.pool.can_reserve(self.blocks_needed(state))

    def add(self, state: RequestState) -> int:
        """Start a request (its prompt is prefilled over the next steps); returns its id. ValueError if no room."""
        if len(self.rows) >= self.max_rows:
            raise ValueError(f"the batch already runs {self.max_rows} rows")
        n = self.blocks_needed(state)
        if n > self.pool.n_blocks:
            raise ValueError(f"prompt + max_new_tokens ({len(state.prompt_ids)} + {state.max_new} tokens) need "
                             f"{n * self.pool.block_bytes / 2**20:.0f} MB of KV cache, more than the "
                             f"{self.pool.kv_cache_mb:.0f} MB pool (kv_cache_mb / --kv-cache-mb)")
        self.pool.reserve(n)
        row = _Row(state, n)
        row.drafter = self.spec.drafter(state) if self.spec is not None else None
        state.id, self._next_id = self._next_id, self._next_id + 1
        if state.prompt_logprobs:
            state.prompt_scores = [(None, [])]
        else:  # the n choices of one request: the first prefills, the others copy its cache
            row.leader = next((r for r in self.rows.values() if r.leader is None and not r.decoding
                               and not r.state.prompt_logprobs and r.state.prompt_ids == state.prompt_ids), None)
        if row.leader is None:
            self._allocate(row)
        self.rows[state.id] = row
        return state.id

    def _allocate(self, row: _Row):
        st, bs = row.state, self.pool.block_size
        cap = min(row.blocks * bs, len(st.prompt_ids) + min(st.max_new, INITIAL_DECODE_ROOM))
        row.kv = RowKV(self.cfg, -(-cap // bs) * bs, self.dtype, self.device)
        cache = self.pool.cache
        if cache is not None and not st.prompt_logprobs and not self.batch_invariant:  # scoring: every position
            for b, (k, v) in enumerate(cache.lookup(st.prompt_ids, len(st.prompt_ids) - 1)):
                row.kv.k[:, :, b * bs:(b + 1) * bs], row.kv.v[:, :, b * bs:(b + 1) * bs] = k, v
                row.kv.length = row.computed = (b + 1) * bs

    def cancel(self, rid: int):
        """Stop a request now and return its blocks (unknown or finished ids are ignored)."""
        row = self.rows.get(rid)
        if row is not None:
            if row.state.finish_reason is None:
                row.state.finish_reason = "cancelled"
            self._remove(row)

    def _remove(self, row: _Row):
        del self.rows[row.state.id]
        self.pool.release(row.blocks)
        cache = self.pool.cache
        if cache is not None and row.kv is not None and row.state.finish_reason in ("stop", "length"):
            # the whole conversation so far: the next turn of a chat starts with it
            cache.insert(row.state.prompt_ids + row.state.token_ids, row.kv, row.kv.length, self.pool.cache_capacity())
        row.kv = None
        if row.blocks * self.pool.block_bytes >= TRIM_BYTES:
            trim_heap()
        for r in self.rows.values():  # its followers prefill on their own now
            if r.leader is row:
                r.leader = None
                self._allocate(r)

    # -----------------------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Run one forward over every row's next tokens; returns what happened to each row."""
        events: list[Event] = []
        plan = self._plan()
        if not plan:
            return events
        hidden = self._forward(plan, events)
        picking = []  # (row, hidden state (C,) of its last token) of rows that pick a token now
        for row, ids in plan:
            h = hidden.get(row.state.id)
            if h is None:
                continue
            try:
                picking += self._after_forward(row, ids, h)
            except Exception as e:  # noqa: BLE001 (a row's own failure must not stop the batch)
                self._fail(row, e, events)
        verifying = [(r, h) for r, h in picking if h.dim() == 2]
        picking = [(r, h) for r, h in picking if h.dim() == 1]
        if picking:
            # plain greedy rows read only the argmax: only the logits that could be it are recomputed exactly
            margin = 0.0 if all(_plain_greedy(r.state) for r, _ in picking) else HEAD_MARGIN
            with torch.inference_mode():  # one LM-head product for every row: the head is the largest weight
                hs = torch.stack([h for _, h in picking])
                # batch-invariant: a fresh tensor per row, so that even the alignment its kernels see is its own
                logits = [self.model.logits(h[None], margin)[0] for h in hs] if self.batch_invariant \
                    else self.model.logits(hs, margin)
            self._sample([(r, lg) for (r, _), lg in zip(picking, logits)], events)
        if verifying:
            with torch.inference_mode(), one_row_products():  # each position's logits exactly as a one-token step's
                logits = self.model.logits(torch.cat([h for _, h in verifying])).split([len(h) for _, h in verifying])
            for (row, _), lg in zip(verifying, logits):
                self._verify(row, lg, events)
        for row in [r for r in self.rows.values() if r.state.finish_reason is not None]:  # prefill-only rows
            events.append(Event(row.state.id, "done"))
            self._remove(row)
        return events

    def _plan(self) -> list[tuple[_Row, list[int]]]:
        """Which tokens each row feeds this step: one per decoding row, then prompt chunks in arrival order."""
        plan = [(r, [r.next_input] + self._draft(r)) for r in self.rows.values() if r.decoding]
        # chunks only matter while streams are running; alone, a prompt is prefilled whole (fewer, larger products),
        # and always in batch-invariant mode (a row's products must not depend on what else runs)
        alone = not plan or self.batch_invariant
        budget = self.cfg.max_position_embeddings if alone else self.prefill_chunk - sum(len(ids) for _, ids in plan)
        for r in self.rows.values():
            if budget <= 0:
                break
            if not r.decoding and r.leader is None:
                prompt = r.state.prompt_ids
                take = len(prompt) - r.computed  # batch-invariant: whole, as alone (each row runs its own forward)
                take = take if self.batch_invariant else min(take, budget)
                plan.append((r, prompt[r.computed:r.computed + take]))
                budget -= take
        for r, ids in plan:
            self._make_room(r, len(ids))
        return plan

    def _draft(self, row: _Row) -> list[int]:
        """Draft tokens for a speculating row: never more than its tokens left after this step's own token."""
        st, row.drafts = row.state, []
        if row.drafter is not None:
            k = min(row.k or self.spec.k, st.max_new - len(st.token_ids) - 1)
            try:
                row.drafts = row.drafter.propose(st.token_ids, k, len(st.prompt_ids))
            except Exception:  # noqa: BLE001 (a draft model that fails: this row decodes one token a step)
                row.drafter, row.drafts = None, []
        return row.drafts

    def _make_room(self, row: _Row, n: int):
        need, kv, bs = row.kv.length + n, row.kv, self.pool.block_size
        if need > kv.capacity:  # doubling keeps the copying linear; never beyond what the row reserved
            kv.grow(min(row.blocks * bs, -(-max(need, 2 * kv.capacity) // bs) * bs))

    def _forward(self, plan, events) -> dict[int, torch.Tensor]:
        """Hidden states (n, C) of each planned row's new tokens; a failing batch is retried row by row."""
        alone = [it for it in plan if it[0].drafts] if not self.row_invariant else []  # dense verification
        if len(plan) > 1 and (self.batch_invariant or alone):  # each row alone: the products it would get alone
            out = {}
            rest = [it for it in plan if not it[0].drafts] if not self.batch_invariant else []
            for items in ([rest] if rest else []) + [[it] for it in plan if it not in rest]:
                out.update(self._forward(items, events))
            return out
        try:
            return self._run(plan)
        except Exception as e:  # noqa: BLE001
            if len(plan) == 1:
                self._fail(plan[0][0], e, events)
                return {}
        out = {}
        for row, ids in plan:
            try:
                out.update(self._run([(row, ids)]))
            except Exception as e:  # noqa: BLE001
                self._fail(row, e, events)
        return out

    @torch.inference_mode()
    def _run(self, plan) -> dict[int, torch.Tensor]:
        if self.compiled is not None and len(plan) == 1 and len(plan[0][1]) == 1 and self.compiled.fits(plan[0][0].kv):
            row, ids = plan[0]  # one row decoding alone: the compiled step (compiled.py)
            try:
                return {row.state.id: self.compiled(ids[0], row.kv)}
            except Exception as e:  # noqa: BLE001 (a library that fails: decode eagerly from now on)
                warnings.warn(f"the compiled decode step failed, decoding eagerly instead: {str(e).splitlines()[0]}")
                self.compiled.failed, self.compiled = True, None  # for this engine's later batches too
        packed = PackedKV([r.kv for r, _ in plan], [len(ids) for _, ids in plan])
        packed.stepwise = frozenset(j for j, (r, _) in enumerate(plan) if r.drafts)  # verified as one-token steps
        flat = torch.tensor([t for _, ids in plan for t in ids], device=self.device)[None]
        with one_row_products() if packed.stepwise and not self.row_invariant else nullcontext():
            hidden = self.model(flat, cache=packed, head="hidden")[0]  # (N, C)
        return {r.state.id: hidden[s:e] for (r, _), s, e in zip(plan, packed.offsets, packed.offsets[1:])}

    @torch.inference_mode()
    def _after_forward(self, row: _Row, ids: list[int], h: torch.Tensor) -> list:
        """Advance a row past its forward: prompt scores, and the logits to sample from if it picks a token now."""
        st = row.state
        if row.decoding:
            return [(row, h if row.drafts else h[-1])]  # speculating: every position's logits
        start, row.computed = row.computed, row.computed + len(ids)
        if st.prompt_logprobs:
            self._score_prompt(st, start, self.model.logits(h))  # (n, V): position i predicts prompt token i + 1
        if row.computed < len(st.prompt_ids):
            return []
        if self.pool.cache is not None:
            self.pool.cache.insert(st.prompt_ids, row.kv, row.computed, self.pool.cache_capacity())
        if st.max_new == 0:  # prefill only (prompt logprobs)
            st.finish_reason = "length"
            return []
        followers = [r for r in self.rows.values() if r.leader is row]
        for r in followers:
            r.kv, r.computed, r.leader = row.kv.fork(min(r.blocks * self.pool.block_size, row.kv.capacity)), \
                row.computed, None
            if r.state.max_new == 0:
                r.state.finish_reason = "length"
        return [(r, h[-1]) for r in [row] + followers if r.state.max_new > 0]

    def _score_prompt(self, st: RequestState, start: int, logits: torch.Tensor):
        prompt = st.prompt_ids
        n = min(len(logits), len(prompt) - 1 - start)  # the last prompt position predicts the first new token
        if n <= 0:
            return
        lp = logits[:n].float().log_softmax(-1)
        chosen = lp.gather(1, torch.tensor(prompt[start + 1:start + 1 + n], device=lp.device)[:, None])[:, 0]
        k = st.p.top_logprobs
        tops = [[]] * n
        if k:
            values, top_ids = lp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
        st.prompt_scores += list(zip(chosen.tolist(), tops))

    def _sample(self, sample: list, events: list[Event]):
        """Pick a token for each (row, raw logits): processors, penalties, sampler; then stops and text."""
        rows, raw, masked = [], [], []
        for row, lg in sample:
            try:
                st, out = row.state, lg
                for proc in st.processors:
                    out = proc(out.float(), st.max_new - len(st.token_ids))
                rows.append(row), raw.append(lg), masked.append(out)
            except Exception as e:  # noqa: BLE001
                self._fail(row, e, events)
        if not rows:
            return
        tokens = self._pick(rows, masked, events)
        for row, lg, t in zip(rows, raw, tokens):
            if t is None:
                continue
            st = row.state
            try:
                piece = st.add(t, lg.float().log_softmax(-1) if st.p.logprobs else None)
                for proc in st.processors:
                    proc.accept(t)
            except Exception as e:  # noqa: BLE001
                self._fail(row, e, events)
                continue
            events.append(Event(st.id, "token", piece))
            row.next_input = t
            if st.finish_reason is not None:
                events.append(Event(st.id, "done"))
                self._remove(row)

    def _verify(self, row: _Row, logits: torch.Tensor, events: list[Event]):
        """Keep a speculating row's drafts up to the first the model disagrees with, plus the model's own token;
        each kept token goes through RequestState.add as a one-token step's would, so stops end the row alike."""
        st, drafts = row.state, row.drafts
        stored = row.kv.length - len(drafts) - 1
        try:
            run = accepted_run(drafts, logits.argmax(-1).tolist())
            kept = 0
            for j, t in enumerate(run):
                piece = st.add(t, logits[j].float().log_softmax(-1) if st.p.logprobs else None)
                kept, row.next_input = j + 1, t
                events.append(Event(st.id, "token", piece))
                if st.finish_reason is not None:
                    break
            row.kv.length = stored + kept  # the inputs of the kept tokens; the slots beyond are overwritten later
            self.spec.record(len(drafts), len(run) - 1, kept)
            row.k = self.spec.next_k(row.k or self.spec.k, len(drafts), len(run) - 1)
        except Exception as e:  # noqa: BLE001
            self._fail(row, e, events)
            return
        if st.finish_reason is not None:
            events.append(Event(st.id, "done"))
            self._remove(row)

    def _pick(self, rows, logits, events) -> list[int | None]:
        """The sampler over all rows at once; if it raises, row by row so only the culprit fails."""
        def history(rs):
            if not any(r.state.p.penalized for r in rs):
                return None
            return [(r.state.prompt_ids, r.state.token_ids) for r in rs]

        if not self.batch_invariant:  # batch-invariant: each row samples alone (below)
            try:
                return sample_next(torch.stack(logits), [r.state.p for r in rows], [r.state.generator for r in rows],
                                   history(rows)).tolist()
            except Exception:  # noqa: BLE001
                pass
        out = []
        for row, lg in zip(rows, logits):
            try:
                out.append(int(sample_next(lg[None], [row.state.p], [row.state.generator], history([row]))[0]))
            except Exception as e:  # noqa: BLE001
                self._fail(row, e, events)
                out.append(None)
        return out

    def _fail(self, row: _Row, e: Exception, events: list[Event]):
        if row.state.id not in self.rows:
            return
        row.state.fail(f"{type(e).__name__}: {e}")
        events.append(Event(row.state.id, "error", row.state.error))
        self._remove(row)


def _plain_greedy(st: RequestState) -> bool:
    """The token is the argmax of the raw logits, and nothing else of them is read (no logprobs, penalties or
    processors)."""
    p = st.p
    return p.temperature == 0 and not (p.logprobs or p.top_logprobs or st.processors or p.penalized)


# ---------------------------------------------------------------------------------------------------------------
# Engine


class Engine:
    """Generates text from a Transformer and its tokenizer: generate (batched), stream and chat, through DecodeBatch."""

    def __init__(self, model: Transformer, tokenizer, generation_config: dict | None = None, compile=False,
                 kv_cache_mb: float | None = None, block_size: int = 16, max_batch: int = 64,
                 prefill_chunk: int = 512, prefix_caching: bool = True, batch_invariant: bool = False,
                 speculative=None, draft_tokens: int = 4):
        """compile: a row decoding alone runs the compiled step (compiled.py): True loads it, building it first if
        this machine has none for this model's structure (about 45 s); "cached" loads it only if built, and picks it
        up as soon as it appears (a background build); False decodes eagerly. Either way the same numbers, to the bit
        (docs/library/numerics.md). kv_cache_mb bounds the
        KV cache (default: max_batch rows of up to 1,024 tokens, see kvpool.default_kv_cache_mb);
        batch_invariant=True gives each request exactly the tokens it would get alone (see the note on batch
        invariance above), slower batched;
        speculative="ngram" (prompt lookup) or a draft Transformer drafts draft_tokens tokens a step for greedy
        requests, verified in one forward, with the same tokens as without it (speculative.py)."""
        if compile not in (False, True, "cached"):
            raise ValueError(f"compile must be False, True or 'cached', got {compile!r}")
        if speculative is not None and compile is True:  # a speculating engine decodes eagerly (not tested together)
            raise ValueError("speculative decoding and compile exclude each other: choose one")
        self.speculation = Speculation(speculative, draft_tokens) if speculative is not None else None
        if self.speculation is not None and self.speculation.method != "ngram":
            draft_vocab = self.speculation.method.config.vocab_size
            if draft_vocab != model.config.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft_vocab}) is not the model's "
                                 f"({model.config.vocab_size}): a draft model needs the same tokenizer")
        self.model, self.tok = model.eval().fuse_for_decode(), tokenizer  # fused q/k/v, gate/up: faster decode
        self.step, self.step_path = None, None  # the compiled step, and where its library is ("cached")
        if compile is True:
            self.step = compiled.load(model, build_now=True)
            if self.step is None:
                raise ValueError(f"compile: {compiled.supported(model)}")
        elif compile == "cached" and speculative is None:
            self.step_path = compiled.package_path(model)
        self.config = model.config
        self.generation_config = dict(generation_config or {})
        param = next(model.parameters())
        self.device, self.dtype = param.device, model.activation_dtype  # hidden states and KV cache
        self.eos_ids = self._eos_ids()
        self.pool = BlockPool(self.config, kv_cache_mb, block_size, self.dtype, prefix_caching, rows=max_batch)
        self.max_batch, self.prefill_chunk = max_batch, max(prefill_chunk, max_batch)
        self.batch_invariant = batch_invariant

    def _eos_ids(self) -> set[int]:
        # generation_config and config.json EOS, plus the tokenizer's turn-ending tokens (e.g. <|im_end|>)
        eos = self.generation_config.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else [eos]) | set(self.config.eos_ids)
        chat_stop_ids = getattr(self.tok, "chat_stop_ids", None)
        if callable(chat_stop_ids):
            ids |= set(chat_stop_ids())
        elif self.tok is not None:
            ids.add(self.tok.eos_id)
        return {i for i in ids if i is not None and i >= 0}

    def decode_batch(self, max_rows: int | None = None) -> DecodeBatch:
        """A new decode core on this engine's model and KV pool (the scheduler runs one; generate makes its own)."""
        if self.step is None and self.step_path is not None and self.step_path.exists():  # built (since)
            self.step = compiled.CompiledStep(self.model, self.step_path)
        return DecodeBatch(self.model, self.pool, max_rows or self.max_batch, self.prefill_chunk, self.batch_invariant,
                           self.speculation, None if self.step is None or self.step.failed else self.step)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 processors: list | None = None) -> list[Completion]:
        """Complete each prompt (a str or a list of token ids); params: one for all, or one per prompt.

        processors: per prompt, a list of logits processors (see constraints.py), e.g. [[json_object(engine)]].
        A row that fails comes back with finish_reason "error" and its message in .error; the others are unaffected.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        states = self._requests(prompts, params, processors)
        with closing(self._drive(states)) as events:  # an exception (Ctrl-C) mid-run gives the rows' blocks back
            for _ in events:
                pass
        return [s.completion() for s in states]

    def stream(self, prompt, params: SamplingParams | None = None, processors: list | None = None) -> Iterator[str]:
        """Text pieces as they are generated; `completion = yield from engine.stream(...)` also gets the Completion."""
        states = self._requests([prompt], params, [processors] if processors else None)
        with closing(self._drive(states)) as events:  # closing this stream ends the rows now, not at garbage collection
            for ev in events:
                if ev.kind == "error":
                    raise RuntimeError(f"generation failed: {ev.text}")
                if ev.text:
                    yield ev.text
        return states[0].completion()

    def chat(self, messages: list[dict], params: SamplingParams | None = None, stream: bool = False,
             processors: list | None = None):
        """Reply to a conversation rendered with the tokenizer's own chat template: a Completion, or pieces."""
        ids = self.chat_prompt_ids(messages)
        if stream:
            return self.stream(ids, params, processors)
        return self.generate([ids], params, [processors] if processors else None)[0]

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation plus the assistant turn's opening (the template writes special tokens)."""
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    # -----------------------------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tok is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or load a model with a tokenizer")
            ids = self.tok.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        ctx = self.config.max_position_embeddings
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= ctx:
            raise ValueError(f"prompt has {len(ids)} tokens but the model's context is {ctx}; shorten the prompt")
        vocab = self.config.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def _requests(self, prompts, params, processors=None) -> list[RequestState]:
        params = params if params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        processors = processors if processors is not None else [[] for _ in prompts]
        if len(processors) != len(prompts):
            raise ValueError(f"got {len(processors)} processor lists for {len(prompts)} prompts; give one each")
        reqs = []
        for prompt, p, procs in zip(prompts, params, processors):
            if p.stop and self.tok is None:
                raise ValueError("stop strings need a tokenizer; use stop_token_ids instead")
            ids = self._prompt_ids(prompt)
            max_new = min(p.max_new_tokens, self.config.max_position_embeddings - len(ids))
            reqs.append(self.new_state(ids, p, max_new, processors=procs))
        return reqs

    def new_state(self, prompt_ids: list[int], params: SamplingParams, max_new: int, processors=(),
                  prompt_logprobs: bool = False) -> RequestState:
        """A request's decoding state: EOS ids (unless ignore_eos) and the params' stop token ids end it."""
        stop_ids = (set() if params.ignore_eos else self.eos_ids) | set(params.stop_token_ids)
        return RequestState(prompt_ids, params, max_new, stop_ids, self.tok, self.device, processors, prompt_logprobs)

    def _drive(self, states: list[RequestState]) -> Iterator[Event]:
        """Run requests to the end through a DecodeBatch, admitting waiting ones as rows and blocks come free."""
        core = self.decode_batch()
        for st in states:
            if core.blocks_needed(st) > self.pool.n_blocks:
                core.add(st)  # raises the pool's clear error before anything runs
        waiting = list(states)
        try:
            while waiting or len(core):
                while waiting and core.can_add(waiting[0]):
                    core.add(waiting.pop(0))
                if not len(core):
                    raise ValueError("the KV cache is held by other requests; retry later")  # a concurrent DecodeBatch
                yield from core.step()
        finally:  # a consumer that stops early (closed stream, Ctrl-C, an exception) gives its rows' blocks back
            for rid in list(core.rows):
                core.cancel(rid)
