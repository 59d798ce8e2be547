"""KV-cache memory in blocks: a bounded pool, and a prefix cache of full blocks hashed by their token prefix.

The pool counts memory in blocks of `block_size` tokens. A running row reserves the blocks its prompt plus its
max_new tokens can fill (so a running row never runs out mid-generation) and returns them the moment it finishes or
is cancelled. Blocks nobody reserves may hold the prefix cache: each full block of a finished or prefilled sequence,
keyed by a hash of (its parent block's key, its tokens), as vLLM's automatic prefix caching does. A new row copies
the longest cached chain of its prompt's blocks instead of computing them; cached blocks are evicted least recently
used first (a chain's later blocks before its earlier ones) whenever a reservation needs room.

Why copies, not shared blocks: kvcache.RowKV keeps each row's keys/values contiguous for torch's CPU attention (see the
note above RowKV), so a cached block is copied into the row once, which costs far less than computing it.
"""
from __future__ import annotations

import collections

import torch

from llmkit.model.transformer import RowKV
from llmkit.utils import heap


TRIM_BYTES = 16 << 20  # a row that held at least this much KV memory gives the freed heap back to the OS


def trim_heap():
    """Return freed heap memory to the OS, so RSS falls back after a long request (utils/heap.py)."""
    heap.trim()


ROW_TOKENS = 1024  # tokens of keys/values per row the default pool is sized for


def default_kv_cache_mb(cfg, rows: int, dtype=torch.float32) -> float:
    """The default bound: `rows` rows of min(context, ROW_TOKENS) tokens each, and at least one whole context (a single
    long request always fits), at most a fifth of the memory available now.

    A pool is a bound, filled lazily: rows take what they use, and the prefix cache keeps finished blocks in what is
    left until the bound. A bound of a fifth of the free memory (the earlier default, up to 4 GB) let a 135M model's
    server grow from 708 to 1,233 MB in a 3-minute soak at the same throughput as with 64 MB (issue 23)."""
    import psutil

    token_mb = kv_token_bytes(cfg, dtype) / 2**20
    want = token_mb * max(rows * min(cfg.max_position_embeddings, ROW_TOKENS), cfg.max_position_embeddings)
    return round(min(want, psutil.virtual_memory().available / 2**20 / 5), 1)


def kv_token_bytes(cfg, dtype=torch.float32) -> int:
    """Bytes of keys and values one token holds, all layers."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class PrefixCache:
    """Full blocks of keys/values keyed by their token prefix, least recently used first."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        # key -> (parent key, tokens, k, v); k/v: (n_layer, n_kv_head, block_size, head_dim)
        self.blocks: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.queries = 0  # tokens found / tokens looked up

    def __len__(self) -> int:
        return len(self.blocks)

    def _keys(self, ids: list[int], n_blocks: int):
        bs, parent = self.block_size, None
        for b in range(n_blocks):
            tokens = tuple(ids[b * bs:(b + 1) * bs])
            key = hash((parent, tokens))
            yield key, parent, tokens
            parent = key

    def lookup(self, ids: list[int], limit: int) -> list[tuple]:
        """The cached blocks of the longest prefix of ids (at most `limit` tokens), as (k, v) pairs; marks them used."""
        found = []
        for key, parent, tokens in self._keys(ids, limit // self.block_size):
            entry = self.blocks.get(key)
            if entry is None or entry[0] != parent or entry[1] != tokens:  # a hash collision is a miss
                break
            found.append(key)
        self.queries += limit
        self.hits += len(found) * self.block_size
        for key in reversed(found):  # the chain's first block is the most recent: it is evicted last
            self.blocks.move_to_end(key)
        return [self.blocks[k][2:] for k in found]

    def insert(self, ids: list[int], row: RowKV, n_tokens: int, capacity: int) -> int:
        """Cache the full blocks of ids[:n_tokens] whose keys/values row holds, keeping at most `capacity` blocks
        (least recently used ones make room). Returns how many blocks were added."""
        added, chain = 0, []
        for b, (key, parent, tokens) in enumerate(self._keys(ids, min(n_tokens, row.length) // self.block_size)):
            if key not in self.blocks:
                if len(chain) >= capacity:
                    break
                if len(self.blocks) >= capacity:
                    self.blocks.popitem(last=False)  # never one of this chain's: those were just moved to the end
                s = slice(b * self.block_size, (b + 1) * self.block_size)
                self.blocks[key] = (parent, tokens, row.k[:, :, s].clone(), row.v[:, :, s].clone())
                added += 1
            self.blocks.move_to_end(key)
            chain.append(key)
        for key in reversed(chain):  # the chain's first block is the most recent: it is evicted last
            self.blocks.move_to_end(key)
        return added

    def evict(self, n: int) -> int:
        """Drop up to n least recently used blocks; returns how many were dropped."""
        n = min(n, len(self.blocks))
        for _ in range(n):
            self.blocks.popitem(last=False)
        return n

    def clear(self):
        self.blocks.clear()


class BlockPool:
    """A bound on KV memory, in blocks: rows reserve, finished rows release, the prefix cache fills what is left."""

    def __init__(self, cfg, kv_cache_mb: float | None = None, block_size: int = 16, dtype=torch.float32,
                 prefix_caching: bool = True, rows: int = 16):
        """kv_cache_mb None: default_kv_cache_mb(cfg, rows, dtype)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.rows = rows
        kv_cache_mb = default_kv_cache_mb(cfg, rows, dtype) if kv_cache_mb is None else kv_cache_mb
        if not kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {kv_cache_mb}")
        self.block_size = block_size
        self.token_bytes = kv_token_bytes(cfg, dtype)
        self.block_bytes = self.token_bytes * block_size
        self.n_blocks = int(kv_cache_mb * 2**20 // self.block_bytes)
        if self.n_blocks < 1:
            raise ValueError(f"kv_cache_mb={kv_cache_mb} holds no block of {block_size} tokens "
                             f"({self.block_bytes / 2**20:.2f} MB); raise it")
        self.kv_cache_mb = kv_cache_mb
        self.reserved = 0
        self.cache = PrefixCache(block_size) if prefix_caching else None

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def cached(self) -> int:
        return len(self.cache) if self.cache is not None else 0

    @property
    def free(self) -> int:
        """Blocks neither reserved nor caching a prefix."""
        return self.n_blocks - self.reserved - self.cached

    def can_reserve(self, n: int) -> bool:
        return self.reserved + n <= self.n_blocks  # cached blocks can always be evicted

    def reserve(self, n: int):
        """Take n blocks for a row, evicting cached prefixes if needed; ValueError if the pool cannot hold them."""
        if not self.can_reserve(n):
            raise ValueError(f"the KV cache has {self.n_blocks - self.reserved} free blocks of {self.n_blocks}, "
                             f"{n} needed")
        if self.free < n:
            self.cache.evict(n - self.free)
        self.reserved += n

    def release(self, n: int):
        self.reserved -= n

    def cache_capacity(self) -> int:
        """How many blocks the prefix cache may hold now: every block no running row reserves."""
        return self.n_blocks - self.reserved

    def describe(self) -> str:
        """One line for start-up: the bound, and how many tokens it holds."""
        tokens, rows = self.n_blocks * self.block_size, f"{self.rows} row{'s' if self.rows != 1 else ''}"
        return (f"KV cache: {self.kv_cache_mb:,.0f} MB, {tokens:,} tokens ({self.token_bytes / 1024:.0f} KB a token; "
                f"{rows} x {tokens // max(self.rows, 1):,} tokens), filled as used; --kv-cache-mb sets it")

    def usage(self) -> dict:
        """Blocks reserved by running rows, held by the prefix cache, and in total (for /metrics and tests)."""
        return {"reserved": self.reserved, "cached": self.cached, "total": self.n_blocks,
                "block_size": self.block_size, "block_mb": self.block_bytes / 2**20}
