"""Sentence embeddings from a model's hidden states: pooled, normalised, batched.

Pooling: "mean" over real (non-padding) tokens (the default, for decoders and encoders alike, as sentence-embedding
servers such as sentence-transformers and text-embeddings-inference pool), "last" (the last real token: what
embedding-tuned decoders such as e5-mistral use), "cls" (the first token: BERT's [CLS]). Vectors are L2-normalised
unless normalize=False; `dimensions` keeps the first d components (normalised again: OpenAI's shortening of
text-embedding-3 vectors).
"""
from __future__ import annotations

import torch

POOLINGS = ("auto", "mean", "last", "cls")


def default_pooling(config) -> str:
    """What "auto" means: mean over real tokens, for decoders and encoders (BERT-style) alike."""
    return "mean"


@torch.inference_mode()
def embed(model, ids: list[list[int]], pooling: str = "auto", dimensions: int | None = None,
          batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
    """Token id lists -> (N, C or dimensions) float32 vectors (unit length unless normalize=False); batches of
    similar length, right-padded, so a batch gives each input the vector it gets alone."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    cfg = model.config
    pooling = default_pooling(cfg) if pooling == "auto" else pooling
    hidden = cfg.n_embd if hasattr(cfg, "n_embd") else None
    if dimensions is not None and hidden is not None and not 1 <= dimensions <= hidden:
        raise ValueError(f"dimensions must be in [1, {hidden}] for this model, got {dimensions}")
    if any(not x for x in ids):
        raise ValueError("every input needs at least one token")
    dev = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [None] * len(ids)
    for s in range(0, len(order), batch_size):
        chunk = [ids[i] for i in order[s:s + batch_size]]
        L = max(len(x) for x in chunk)
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        mask = torch.zeros(len(chunk), L, dtype=torch.long)
        for j, row in enumerate(chunk):
            x[j, :len(row)] = torch.tensor(row)
            mask[j, :len(row)] = 1
        h = model(x.to(dev), attention_mask=mask.to(dev), head="hidden").float()  # (B, L, C)
        m = mask.to(dev)[..., None].float()
        if pooling == "mean":
            v = (h * m).sum(1) / m.sum(1)
        elif pooling == "last":
            v = h[torch.arange(len(chunk), device=dev), mask.sum(1).to(dev) - 1]
        else:
            v = h[:, 0]
        for j, i in enumerate(order[s:s + batch_size]):
            out[i] = v[j]
    vecs = torch.stack(out)
    if dimensions is not None:
        vecs = vecs[:, :dimensions]
    return (torch.nn.functional.normalize(vecs, dim=-1) if normalize else vecs).cpu()
