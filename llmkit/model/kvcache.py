"""KV-cache layouts the Transformer reads and writes: KVCache (a padded batch), RowKV (one contiguous row) and
PackedKV (many rows' new tokens packed into one sequence, attended per row)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from llmkit.model.config import ModelConfig


# ---------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values for every layer, (B, n_kv_head, max_len, head_dim), with a write slot per row.

    Rows may hold different numbers of tokens (left-padded prompts, or requests that joined a batch at different
    times); `valid` marks which slots hold real tokens, so padding never receives attention.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None, device=None):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = [0] * batch_size  # next write slot of each row
        self.n_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row (positions)
        self.max_len = max_len
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return len(self.length)

    def select(self, rows) -> "KVCache":
        """A new cache whose row j copies row rows[j] (e.g. one prompt shared by several continuations)."""
        idx = torch.as_tensor(rows, device=self.valid.device)
        out = copy.copy(self)
        out.k = [k.index_select(0, idx) for k in self.k]
        out.v = [v.index_select(0, idx) for v in self.v]
        out.valid, out.n_tokens = self.valid.index_select(0, idx), self.n_tokens.index_select(0, idx)
        out.length = [self.length[r] for r in idx.tolist()]
        return out

    def keep_rows(self, rows: list[int]):
        """Keep only these rows (finished ones leave the batch, so later steps compute only running rows)."""
        self.__dict__.update(self.select(rows).__dict__)

    def reset_rows(self, rows: list[int]):
        """Empty the given rows so new sequences can take them (continuous batching)."""
        for r in rows:
            self.length[r] = 0
            self.valid[r] = False
            self.n_tokens[r] = 0

    def layer(self, i: int):
        return self.k[i], self.v[i]


# Decoding and scoring keep each sequence's keys/values contiguous (RowKV) and pack the new tokens of many
# sequences into one row (PackedKV). Why not vLLM's paged layout (a pool of fixed-size blocks addressed through a
# block table)? PyTorch's CPU attention (SDPA) needs each sequence's K/V as one strided tensor, so a paged cache must
# gather its blocks into a contiguous copy in every layer of every step; benchmarks/kv_layout.py measured that gather
# against contiguous rows on the default model (results in benchmarks/results/kv_layout.json) and contiguous rows
# won. Blocks remain the unit of accounting (decode.BlockPool bounds memory; a row's capacity grows in whole blocks)
# and of the prefix cache, which copies cached blocks into a row instead of recomputing them.


class RowKV:
    """One sequence's keys and values, contiguous: k and v are (n_layer, n_kv_head, capacity, head_dim)."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype=None, device=None):
        shape = (cfg.n_layer, cfg.n_kv_head, capacity, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # tokens whose keys/values are stored (they are at slots 0..length-1)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def grow(self, capacity: int):
        """Reallocate to a larger capacity, keeping the stored tokens."""
        if capacity <= self.capacity:
            return
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, new)

    def fork(self, capacity: int) -> "RowKV":
        """A copy of the stored tokens in a new row of the given capacity (n choices sharing one prompt)."""
        out = RowKV.__new__(RowKV)
        n = self.length
        out.k = self.k.new_empty(self.k.shape[0], self.k.shape[1], max(capacity, n), self.k.shape[3])
        out.v = torch.empty_like(out.k)
        out.k[:, :, :n], out.v[:, :, :n] = self.k[:, :, :n], self.v[:, :, :n]
        out.length = n
        return out


class PackedKV:
    """The new tokens of several rows packed into one sequence (1, N) without padding.

    Each row's tokens attend to that row's stored tokens and causally to each other, never to another row's
    (a block-diagonal causal mask, computed as one attention call per row: varlen attention). Row j's tokens are
    at offsets[j]:offsets[j + 1] of the packed sequence; it may be a whole prompt, a chunk of one, or one decode token.

    A row may be None (scoring): its tokens attend only to each other and nothing is stored; `masks` may then give
    its (n, n) boolean attention mask (True = may attend; default causal) and `positions` its tokens' positions, e.g.
    a context followed by several continuations that each see the context and themselves (evaluate.py).
    """

    # rows whose tokens attend one query at a time, each exactly as a one-token step would (speculative verification)
    stepwise: frozenset = frozenset()

    def __init__(self, rows: list[RowKV | None], counts: list[int], masks: list | None = None,
                 positions: list[list[int]] | None = None):
        if len(rows) != len(counts) or any(n < 1 for n in counts):
            raise ValueError("PackedKV needs one token count >= 1 per row")
        for r, n in zip(rows, counts):
            if r is not None and r.length + n > r.capacity:
                raise ValueError(f"row holds {r.length} tokens + {n} new > its capacity {r.capacity}")
        self.rows, self.counts = rows, counts
        self.masks, self._positions = masks or [None] * len(rows), positions
        self.offsets = [0]
        for n in counts:
            self.offsets.append(self.offsets[-1] + n)

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]

    def positions(self, device=None) -> torch.Tensor:
        """(1, N) position of every packed token in its own sequence."""
        if self._positions is not None:
            return torch.tensor([p for ps in self._positions for p in ps], device=device)[None]
        return torch.cat([torch.arange(r.length if r is not None else 0, (r.length if r is not None else 0) + n)
                          for r, n in zip(self.rows, self.counts)]).to(device)[None]

    def last_index(self) -> list[int]:
        """Index in the packed sequence of each row's last new token (where its next-token logits come from)."""
        return [o - 1 for o in self.offsets[1:]]

    def layer(self, i: int) -> "PackedLayer":
        return PackedLayer(self, i)

    def padded_attention(self, q, k, v, enable_gqa: bool) -> torch.Tensor:
        """Attention of storage-less segments as one batched call, padded inside attention only.

        Many short segments (scoring) would otherwise make one small attention call each per layer; the linear
        layers around stay packed, so padding costs only the (cheap) attention of the padded slots.
        """
        if not hasattr(self, "_pad"):
            S, T, dev = len(self.counts), max(self.counts), q.device
            idx = torch.zeros(S, T, dtype=torch.long)
            mask = torch.eye(T, dtype=torch.bool).repeat(S, 1, 1)  # padded queries see themselves: no NaN
            for j, (n, s) in enumerate(zip(self.counts, self.offsets)):
                idx[j, :n] = torch.arange(s, s + n)
                m = self.masks[j]
                mask[j, :n, :n] = m.cpu() if m is not None else torch.ones(n, n, dtype=torch.bool).tril()
            valid = torch.arange(T)[None, :] < torch.tensor(self.counts)[:, None]
            self._pad = idx.to(dev), mask[:, None].to(dev), valid.to(dev)
        idx, mask, valid = self._pad
        def gather(x):  # (1, h, N, D) -> (S, h, T, D)
            return x[0][:, idx].transpose(0, 1)
        y = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), attn_mask=mask, enable_gqa=enable_gqa)
        out = torch.empty_like(q)
        out[0][:, idx[valid]] = y.transpose(0, 1)[:, valid]  # (H, N, D) back in packed order
        return out

    def advance(self):
        """Count the new tokens as stored (after a forward pass succeeded)."""
        for r, n in zip(self.rows, self.counts):
            if r is not None:
                r.length += n


class PackedLayer:
    """PackedKV seen by one layer: writes the new keys/values into each row and runs its attention."""

    def __init__(self, packed: PackedKV, i: int):
        self.packed, self.i = packed, i

    def attend(self, q, k, v, enable_gqa: bool) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, Hkv, N, D) of the packed tokens -> attention output (1, H, N, D)."""
        p = self.packed
        if all(r is None for r in p.rows) and len(p.rows) > 1:
            return p.padded_attention(q, k, v, enable_gqa)
        if len(p.rows) == 1 and p.counts[0] > 1:  # one prompt (chunk): its output is the whole output
            return self._row(0, q, k, v, enable_gqa)
        out = torch.empty_like(q)
        decode = [j for j, n in enumerate(p.counts) if n == 1]
        if decode:
            # one query token per row is microseconds of work: split over threads it costs more in fork/join
            # barriers than it computes (16 rows x 30 layers of barriers were 100x slower on a busy 2-core machine)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for j in decode:
                    out[:, :, p.offsets[j]:p.offsets[j] + 1] = self._row(j, q, k, v, enable_gqa)
            finally:
                torch.set_num_threads(threads)
        for j, (n, s) in enumerate(zip(p.counts, p.offsets)):
            if n > 1:
                out[:, :, s:s + n] = self._row(j, q, k, v, enable_gqa)
        return out

    def _row(self, j, q, k, v, enable_gqa) -> torch.Tensor:
        p, i = self.packed, self.i
        r, n, s = p.rows[j], p.counts[j], p.offsets[j]
        if r is None:  # nothing stored: the segment's own keys, its own mask
            mask = p.masks[j]
            return F.scaled_dot_product_attention(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n], attn_mask=mask,
                                                  is_causal=mask is None and n > 1, enable_gqa=enable_gqa)
        L0 = r.length
        r.k[i, :, L0:L0 + n] = k[0, :, s:s + n]
        r.v[i, :, L0:L0 + n] = v[0, :, s:s + n]
        keys, values = r.k[i, :, :L0 + n][None], r.v[i, :, :L0 + n][None]
        if n > 1 and j in p.stepwise:  # the very call a decode step makes per token (one thread, as attend's)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return torch.cat([F.scaled_dot_product_attention(q[:, :, s + t:s + t + 1], keys[:, :, :L0 + t + 1],
                                                                 values[:, :, :L0 + t + 1], enable_gqa=enable_gqa)
                                  for t in range(n)], 2)
            finally:
                torch.set_num_threads(threads)
        mask = None
        if n > 1 and L0 > 0:  # a chunk after stored tokens: query j sees slots 0..L0 + j (built once, all layers)
            mask = p.masks[j]
            if mask is None:
                mask = p.masks[j] = (torch.arange(L0 + n, device=q.device)[None, :]
                                     <= torch.arange(L0, L0 + n, device=q.device)[:, None])
        return F.scaled_dot_product_attention(q[:, :, s:s + n], keys, values, attn_mask=mask,
                                              is_causal=n > 1 and L0 == 0, enable_gqa=enable_gqa)
