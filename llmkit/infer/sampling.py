"""Sampling parameters, the sampler (pure functions on logits) and one request's decoding state (text, stops, logprobs).

engine.DecodeBatch drives these for every row it runs; nothing here touches the model or the KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.model.tokenizer import StreamDecoder


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
    finish_reason: str  # "stop" (EOS, stop token or stop string) | "length" | "error"
    prompt_tokens: int
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top_logprobs": [(token, logprob)]}
    error: str | None = None  # why this row failed (finish_reason "error"); the other rows are unaffected
    prompt_logprobs: list | None = None  # with prompt_logprobs: per prompt token (logprob or None, [(id, logprob)])


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
    """One row's state: its tokens, the text shown so far, the text held back, and why it finished.

    processors: logits processors (constraints.py's protocol) applied to this row only; prompt_logprobs: also score
    the prompt's own tokens (prompt_scores); max_new 0 means prefill only.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_new: int, stop_ids: set, tok, device,
                 processors=(), prompt_logprobs: bool = False):
        self.prompt_ids, self.p, self.max_new, self.stop_ids, self.tok = prompt_ids, params, max_new, stop_ids, tok
        self.processors, self.prompt_logprobs = list(processors or []), prompt_logprobs
        self.prompt_scores: list | None = None  # per prompt token: (logprob or None, [(token id, logprob)...])
        self.error: str | None = None
        self.id: int = -1  # set by DecodeBatch.add
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

    def fail(self, message: str):
        """End this row with an error (its text so far stays)."""
        self.finish_reason, self.error, self.pending = "error", message, ""

    def completion(self) -> Completion:
        return Completion(self.text, self.token_ids, self.finish_reason, len(self.prompt_ids), self.logprobs,
                          self.error, self.prompt_scores)
