"""Speculative decoding: a row drafts k tokens, the model verifies them in one forward, the greedy output is unchanged.

A decoding row that speculates feeds its next input and k draft tokens as one chunk of k + 1 tokens in the packed
forward (engine.DecodeBatch); the logits at the k + 1 positions give the model's own greedy token after each prefix.
The row keeps the longest run of drafts equal to those tokens plus the model's token after it (1 to k + 1 tokens a
step), emitted one by one through RequestState.add, so EOS, stop strings and max_tokens end the row exactly where
one-token steps would; its KV cache is rolled back to the tokens kept (the slots beyond are overwritten later).

The verified numbers are those of one-token steps, bit for bit: each verified token attends alone, as a decode step
does (PackedKV.stepwise), and linear.one_row_products makes dense products and the LM head's exact recomputation
treat each row as if alone; the int4/int8 kernels give a row the same result whatever rows run beside it (tested), so
a quantized model verifies k + 1 tokens at the cost of reading its weights once. A dense (float32, bf16) model
verifies its rows one product at a time (exact, little faster than plain decoding).

Drafts come from prompt lookup (n-gram, as transformers' prompt_lookup_num_tokens and vLLM's ngram proposer): the most
recent earlier occurrence of the row's last n tokens (n from NGRAM_MAX down to NGRAM_MIN), and the k tokens that
followed it. It costs nothing where it finds no match, and pays on copy-heavy work: summaries, edits, code, RAG.
Or from a draft model (a smaller model with the same tokenizer, e.g. a student from `llmkit distill`): k greedy
one-token steps on its own KV cache per row (outside the KV pool's bound), caught up with the tokens kept.

Only rows whose next token is the argmax of the raw logits speculate: greedy (temperature 0 or top_k 1), without
penalties or logits processors (grammars, JSON mode, logit_bias). Sampled rows, penalised or constrained rows decode
one token a step; logprobs are reported per kept token from the same logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.model.kvcache import PackedKV, RowKV

NGRAM_MAX, NGRAM_MIN = 4, 2  # n-gram sizes tried, longest first (a 1-gram matches too often to pay)
MAX_DRAFT_TOKENS = 16


@dataclass
class Speculation:
    """How an Engine speculates: method "ngram" (prompt lookup) or a draft model (a Transformer with the target's
    vocabulary), and k draft tokens per step; counts what it did."""
    method: object = "ngram"
    k: int = 4
    stats: dict = field(default_factory=lambda: {"steps": 0, "drafted": 0, "accepted": 0, "emitted": 0})

    def __post_init__(self):
        if isinstance(self.method, torch.nn.Module):
            self.method = self.method.eval().fuse_for_decode()
        elif self.method != "ngram":
            raise ValueError(f"speculative must be 'ngram' or a draft model (a Transformer), got {self.method!r}")
        if not 1 <= self.k <= MAX_DRAFT_TOKENS:
            raise ValueError(f"draft tokens must be in 1..{MAX_DRAFT_TOKENS}, got {self.k}")

    def drafter(self, state) -> "NgramDrafter | None":
        """A drafter for this request, or None where speculation could change its tokens (see the module note)."""
        p = state.p
        if not p.greedy or p.penalized or state.processors:
            return None
        if self.method == "ngram":
            return NgramDrafter(state.prompt_ids)
        return ModelDrafter(self.method, state.prompt_ids, len(state.prompt_ids) + state.max_new + self.k)

    def next_k(self, k: int, drafted: int, accepted: int) -> int:
        """A row's draft length for its next step (HF assisted generation's heuristic): two more after a step that
        kept every draft, one fewer after one that did not, within 1..k: wrong drafts cost verification rows."""
        return min(self.k, k + 2) if accepted == drafted else max(1, k - 1)

    def record(self, drafted: int, accepted: int, emitted: int):
        s = self.stats
        s["steps"], s["drafted"], s["accepted"], s["emitted"] = (s["steps"] + 1, s["drafted"] + drafted,
                                                                 s["accepted"] + accepted, s["emitted"] + emitted)

    def reset(self):
        self.stats = {key: 0 for key in self.stats}


class NgramDrafter:
    """Prompt-lookup drafts for one row; an index of every n-gram's latest end keeps each step O(new tokens)."""

    def __init__(self, prompt_ids: list[int], n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN):
        self.tokens = list(prompt_ids)
        self.n_max, self.n_min = n_max, n_min
        self.index: dict[tuple, int] = {}  # n-gram -> the position just after its latest indexed occurrence
        self.indexed = 0  # n-grams ending before this position are indexed

    def propose(self, generated: list[int], k: int, n_prompt: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens."""
        self.tokens += generated[len(self.tokens) - n_prompt:]
        t, end = self.tokens, len(self.tokens)
        for e in range(max(self.indexed, 1), end):  # every n-gram ending at e - 1, but not the current suffix's
            for n in range(self.n_min, min(self.n_max, e) + 1):
                self.index[tuple(t[e - n:e])] = e
        self.indexed = max(self.indexed, end)
        if k < 1:
            return []
        for n in range(min(self.n_max, end - 1), self.n_min - 1, -1):
            at = self.index.get(tuple(t[end - n:]))
            if at is not None:
                return t[at:at + k]
        return []


class ModelDrafter:
    """Drafts from a draft model for one row: k greedy one-token steps on the row's own draft KV cache."""

    def __init__(self, model, prompt_ids: list[int], capacity: int):
        self.model, self.prompt = model, list(prompt_ids)
        param = next(model.parameters())
        self.cap = min(capacity, model.config.max_position_embeddings)  # grown to it as needed (doubling)
        self.kv = RowKV(model.config, min(self.cap, len(prompt_ids) + 64), model.activation_dtype, param.device)
        self.stored: list[int] = []  # the tokens whose keys/values self.kv holds

    @torch.inference_mode()
    def propose(self, generated: list[int], k: int, n_prompt: int) -> list[int]:
        tokens = self.prompt + generated
        if k < 1 or len(tokens) + k > self.cap:
            return []
        if len(tokens) + k > self.kv.capacity:
            self.kv.grow(min(self.cap, max(len(tokens) + k, 2 * self.kv.capacity)))
        n = 0  # keep what the draft cache holds of the tokens kept; drafts the target rejected are dropped
        while n < min(len(self.stored), len(tokens) - 1) and self.stored[n] == tokens[n]:
            n += 1
        self.kv.length, self.stored = n, self.stored[:n]
        feed, out = tokens[n:], []
        while len(out) < k:
            h = self.model(torch.tensor([feed], device=self.kv.k.device), cache=PackedKV([self.kv], [len(feed)]),
                           head="hidden")[0]
            self.stored += feed
            feed = [int(self.model.logits(h[-1:])[0].argmax())]
            out += feed
        return out


def find_draft(tokens: list[int], k: int, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN) -> list[int]:
    """The reference prompt lookup, by plain search (NgramDrafter must agree with it; tests)."""
    end = len(tokens)
    for n in range(min(n_max, end - 1), n_min - 1, -1):
        suffix = tokens[end - n:]
        for s in range(end - n - 1, -1, -1):  # latest earlier occurrence first
            if tokens[s:s + n] == suffix:
                return tokens[s + n:s + n + k]
    return []


def accepted_run(drafts: list[int], picks: list[int]) -> list[int]:
    """The tokens a verified step keeps: the model's picks while each equals the draft it verified, plus one more.

    picks[j] is the model's greedy token after the row's input and drafts[:j]; len(picks) == len(drafts) + 1.
    """
    out = [picks[0]]
    for d, nxt in zip(drafts, picks[1:]):
        if out[-1] != d:
            break
        out.append(nxt)
    return out
