"""Inference: batched generation with a preallocated KV cache, sampling, stop strings and streaming.

generate() prefills every prompt at once (left-padded; the model derives positions and masks from attention_mask and
the cache remembers the padding), then decodes one token per step for the rows still running: a finished row leaves
the batch. Sampling and penalties are pure functions (sample_next) that a continuous-batching scheduler can reuse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from llmkit.model import KVCache, Transformer
from llmkit.tokenizer import StreamDecoder


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop (names and meanings follow vLLM / OpenAI / HF)."""
    max_new_tokens: int = 256  # clipped so that prompt + output fits the model's context
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top probability
    repetition_penalty: float = 1.0  # HF: logits of tokens seen in prompt + output: divided if > 0, multiplied if < 0
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per earlier occurrence in the generated tokens
    seed: int | None = None  # own torch.Generator per request: same seed, same output, whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings, never part of the returned text
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end generation, like EOS
    ignore_eos: bool = False
    logprobs: bool = False  # per-token log-probabilities (of the raw model distribution)
    top_logprobs: int = 0  # how many alternatives to report per token

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop or []), list(self.stop_token_ids or [])
        rules = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 turns it off)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be a list of non-empty strings"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class Completion:
    """One finished generation."""
    text: str
    token_ids: list[int]  # generated ids; an EOS / stop token that ended generation is not included
    finish_reason: str  # "stop" (EOS, stop token or stop string) | "length"
    prompt_tokens: int
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top_logprobs": [(token, logprob)]}


# ---------------------------------------------------------------------------------------------------------------
# Sampling: pure functions on logits, one row at a time (rows may have different params)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids) -> torch.Tensor:
    """Repetition (HF), presence and frequency (OpenAI) penalties on one row of logits (V,); returns a new tensor."""
    logits = logits.clone()
    dev = logits.device
    out = torch.as_tensor(output_ids, dtype=torch.long, device=dev)
    if params.repetition_penalty != 1:
        seen = torch.cat([torch.as_tensor(prompt_ids, dtype=torch.long, device=dev), out]).unique()
        x = logits[seen]
        logits[seen] = torch.where(x > 0, x / params.repetition_penalty, x * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and out.numel():
        ids, counts = out.unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (HF's order) on one row (V,); removed tokens get -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params, generators=None, history=None) -> torch.Tensor:
    """Next token id per row of logits (B, V): penalties, then argmax or sampling; returns (B,) long.

    params: one SamplingParams or one per row; generators: None, one torch.Generator or one (or None) per row;
    history: per row (prompt_ids, output_ids), needed only for penalties.
    """
    B = logits.shape[0]
    params = list(params) if isinstance(params, (list, tuple)) else [params] * B
    generators = list(generators) if isinstance(generators, (list, tuple)) else [generators] * B
    if all(p.greedy and not p.penalized for p in params):
        return logits.argmax(-1)  # the common fast path: no float32 copy, no per-row work
    out = []
    for i, p in enumerate(params):
        row = logits[i].float()
        if p.penalized and history is not None:
            row = apply_penalties(row, p, *history[i])
        if p.greedy:
            out.append(row.argmax())
        else:
            probs = filter_logits(row, p).softmax(-1)
            out.append(torch.multinomial(probs, 1, generator=generators[i])[0])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# Stop strings and per-request state (text comes from tokenizer.StreamDecoder: it never splits a UTF-8 character)


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that could be the start of a stop string (so it must be held back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class RequestState:
    """One row's state: its tokens, the text shown so far, the text held back, and why it finished."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_new: int, stop_ids: set, tok, device):
        self.prompt_ids, self.p, self.max_new, self.stop_ids, self.tok = prompt_ids, params, max_new, stop_ids, tok
        self.token_ids: list[int] = []
        self.logprobs: list[dict] | None = [] if params.logprobs else None
        self.text, self.pending = "", ""  # pending: decoded but held back, it may start a stop string
        self.decoder = StreamDecoder(tok, skip_special_tokens=True) if tok is not None else None
        self.finish_reason: str | None = None
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def add(self, token_id: int, logprobs: torch.Tensor | None) -> str:
        """Take one sampled token; return the text that can be shown now."""
        if token_id in self.stop_ids:
            return self._finish("stop", self.pending + self._flush())
        self.token_ids.append(token_id)
        if self.logprobs is not None:
            self._record_logprobs(token_id, logprobs)
        text = self.pending + (self.decoder.push(token_id) if self.decoder else "")
        hits = [i for i in (text.find(s) for s in self.p.stop) if i >= 0]
        if hits:
            return self._finish("stop", text[:min(hits)])
        if len(self.token_ids) >= self.max_new:
            return self._finish("length", text + self._flush())
        cut = len(text) - stop_prefix_len(text, self.p.stop)
        self.pending = text[cut:]
        self.text += text[:cut]
        return text[:cut]

    def _flush(self) -> str:
        return self.decoder.flush() if self.decoder else ""

    def _finish(self, reason: str, piece: str) -> str:
        self.finish_reason, self.pending = reason, ""
        self.text += piece
        return piece

    def _record_logprobs(self, token_id: int, lp: torch.Tensor):
        name = (lambda i: self.tok.decode([i])) if self.tok is not None else str
        top = []
        if self.p.top_logprobs:
            values, ids = lp.topk(self.p.top_logprobs)
            top = [(name(i), v) for i, v in zip(ids.tolist(), values.tolist())]
        self.logprobs.append({"token": name(token_id), "logprob": lp[token_id].item(), "top_logprobs": top})

    def completion(self) -> Completion:
        return Completion(self.text, self.token_ids, self.finish_reason, len(self.prompt_ids), self.logprobs)


# ---------------------------------------------------------------------------------------------------------------
# Engine


class Engine:
    """Generates text from a Transformer and its tokenizer: generate (batched), stream and chat."""

    def __init__(self, model: Transformer, tokenizer, generation_config: dict | None = None, compile: bool = False):
        """compile=True runs decode steps through torch.compile (Transformer.compile_decode)."""
        self.model, self.tok = model.eval().fuse_for_decode(), tokenizer  # fused q/k/v, gate/up: faster decode
        if compile:
            model.compile_decode()
        self.config = model.config
        self.generation_config = dict(generation_config or {})
        param = next(model.parameters())
        self.device, self.dtype = param.device, model.activation_dtype  # hidden states and KV cache
        self.eos_ids = self._eos_ids()

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

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Complete each prompt (a str or a list of token ids); params: one for all, or one per prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        run = self._run(prompts, params)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Text pieces as they are generated; `completion = yield from engine.stream(...)` also gets the Completion."""
        run = self._run([prompt], params)
        while True:
            try:
                _, piece = next(run)
            except StopIteration as done:
                return done.value[0]
            yield piece

    def chat(self, messages: list[dict], params: SamplingParams | None = None, stream: bool = False):
        """Reply to a conversation rendered with the tokenizer's own chat template: a Completion, or pieces."""
        ids = self.chat_prompt_ids(messages)
        return self.stream(ids, params) if stream else self.generate([ids], params)[0]

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
        return ids

    def _requests(self, prompts, params) -> list[RequestState]:
        params = params if params is not None else SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        reqs = []
        for prompt, p in zip(prompts, params):
            if p.stop and self.tok is None:
                raise ValueError("stop strings need a tokenizer; use stop_token_ids instead")
            ids = self._prompt_ids(prompt)
            reqs.append(self.new_state(ids, p, min(p.max_new_tokens, self.config.max_position_embeddings - len(ids))))
        return reqs

    def new_state(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> RequestState:
        """A request's decoding state: EOS ids (unless ignore_eos) and the params' stop token ids end it."""
        stop_ids = (set() if params.ignore_eos else self.eos_ids) | set(params.stop_token_ids)
        return RequestState(prompt_ids, params, max_new, stop_ids, self.tok, self.device)

    @torch.inference_mode()  # on a generator function torch enters/leaves the mode around each resume
    def _run(self, prompts, params):
        """Yields (row, text piece) as rows advance; returns the list of Completions."""
        reqs = self._requests(prompts, params)
        B, L = len(reqs), max(len(r.prompt_ids) for r in reqs)
        # prefill: left-pad to the longest prompt so every row's next token is at the last column
        ids = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, L - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = KVCache(self.config, B, L + max(r.max_new for r in reqs), dtype=self.dtype, device=self.device)
        logits = self.model(ids, attention_mask=mask if not bool(mask.all()) else None, cache=cache, last_only=True)
        active = list(range(B))  # which request each batch row holds
        while True:
            rows = [reqs[i] for i in active]
            logits = logits[:, -1]  # (B, V)
            history = [(r.prompt_ids, r.token_ids) for r in rows] if any(r.p.penalized for r in rows) else None
            tokens = sample_next(logits, [r.p for r in rows], [r.generator for r in rows], history)
            logprobs = logits.float().log_softmax(-1) if any(r.p.logprobs for r in rows) else None
            keep = []
            for j, (i, r, t) in enumerate(zip(active, rows, tokens.tolist())):
                piece = r.add(t, logprobs[j] if logprobs is not None else None)
                if piece:
                    yield i, piece
                if r.finish_reason is None:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):
                cache.keep_rows(keep)
                tokens, active = tokens[keep], [active[j] for j in keep]
            logits = self.model(tokens[:, None], cache=cache)
        return [r.completion() for r in reqs]
