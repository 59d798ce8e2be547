"""Fill-mask: the most likely tokens at each mask of a text, from a masked (BERT-style) language model.

What transformers' `pipeline("fill-mask")` computes, with its field names: each text is encoded with its special
tokens, one forward gives the logits at every mask, and each mask's top-k comes from its own softmax (several masks
in one text are predicted independently, from the same forward). `[MASK]` and `<mask>` stand for the model's own mask
token.
"""
from __future__ import annotations

import torch

from llmkit.infer.classify import pad_batch, pad_id_for

ALIASES = ("[MASK]", "<mask>")


def check_masked_lm(model, tok) -> None:
    """A masked language model with a tokenizer that has a mask token, or one clear ValueError."""
    cfg = model.config
    if cfg.causal:
        raise ValueError("fill-mask needs a masked (encoder, BERT-style) language model such as one from "
                         "`llmkit pretrain --objective mlm`; this is a causal (decoder) model")
    if cfg.num_labels:
        raise ValueError(f"this model is a classifier ({cfg.num_labels} labels), not a masked language model")
    if tok is None:
        raise ValueError("fill-mask needs a tokenizer (tokenizer.json beside the weights)")
    if tok.mask_id is None:
        raise ValueError("the tokenizer has no mask token (mask_token in special_tokens_map.json)")


def with_mask_token(text: str, mask: str) -> str:
    """text with the aliases [MASK] and <mask> written as the model's own mask token."""
    for alias in ALIASES:
        if alias != mask:
            text = text.replace(alias, mask)
    return text


@torch.inference_mode()
def fill_mask(model, tok, texts: list[str], top_k: int = 5, batch_size: int = 32) -> list[dict]:
    """{"text", "predictions": [[{"token", "token_str", "score", "sequence"}, ... top_k] per mask]} per text."""
    check_masked_lm(model, tok)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    mask_token, mask_id = tok.special_tokens["mask_token"], tok.mask_id
    ids = tok.encode_batch([with_mask_token(t, mask_token) for t in texts], add_special_tokens=True)
    limit = model.config.max_position_embeddings
    for text, x in zip(texts, ids):
        if mask_id not in x:
            raise ValueError(f"no mask token ({mask_token}, or [MASK] / <mask>) in {text!r}")
        if limit and len(x) > limit:
            raise ValueError(f"{len(x)} tokens in {text[:40]!r}...: the model reads at most {limit}")
    pad = pad_id_for(tok, model.config)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    top_k = min(top_k, model.config.vocab_size)
    results = [None] * len(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            input_ids, attn = pad_batch([ids[i] for i in chunk], pad)
            logits = model(input_ids.to(dev), attention_mask=attn.to(dev))  # (B, T, V) float32
            for j, i in enumerate(chunk):
                where = [p for p, t in enumerate(ids[i]) if t == mask_id]
                probs = logits[j, where].float().softmax(-1)
                values, tokens = probs.topk(top_k)
                results[i] = {"text": texts[i], "predictions": [
                    _candidates(tok, ids[i], pos, v.tolist(), t.tolist(), single=len(where) == 1)
                    for pos, v, t in zip(where, values.cpu(), tokens.cpu())]}
    finally:
        model.train(was_training)
    return results


def _candidates(tok, ids, pos, values, tokens, single):
    out = []
    for v, t in zip(values, tokens):
        filled = list(ids)
        filled[pos] = t
        filled = [x for x in filled if x != tok.pad_id]  # as transformers, which drops padding from the sequence
        # special tokens leave the sequence unless other masks would vanish with them (as transformers)
        out.append({"token": t, "token_str": tok.decode([t]), "score": v,
                    "sequence": tok.decode(filled, skip_special_tokens=single)})
    return out
