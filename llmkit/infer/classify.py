"""Class probabilities of a sequence classifier (a model with a classification head), and the batching they use.

encode_texts, pad_id_for and pad_batch are shared with the training data (llmkit.data.sft builds its batches on them).
"""
from __future__ import annotations

import torch


def encode_texts(tok, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text cut to max_length, and how many were cut."""
    ids = tok.encode_batch(texts, add_special_tokens=True)
    cut = sum(len(x) > max_length for x in ids)
    return [x[:max_length] for x in ids], cut


def pad_id_for(tok, cfg) -> int:
    """The id that pads a batch: the tokenizer's pad token, else the config's, else EOS, else 0."""
    for i in (tok.pad_id if tok is not None else None, cfg.pad_token_id, tok.eos_id if tok is not None else None):
        if i is not None and i >= 0:
            return i
    return 0


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (input_ids, attention_mask), both (B, T) long tensors."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


@torch.no_grad()
@torch.inference_mode()
def predict_proba(model, tok, texts: list[str], max_length: int = 512, batch_size: int = 32,
                  progress: bool = False) -> torch.Tensor:
    """Class probabilities (N, num_labels) of a classifier for each text (on the CPU)."""
    from tqdm import tqdm

    if not model.config.num_labels or model.config.tagger:
        raise ValueError("this model has no sequence-classification head; fine-tune one with `llmkit finetune --task "
                         "classify`")
    pad = pad_id_for(tok, model.config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, _ = encode_texts(tok, texts, max_length)
    out = []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    bar = tqdm(total=len(order), desc="classifying", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        input_ids, mask = pad_batch([ids[i] for i in chunk], pad)
        logits = model(input_ids.to(device), attention_mask=mask.to(device), head="classify")
        out.append(logits.float().softmax(-1).cpu())
        bar.update(len(chunk))
    bar.close()
    probs = torch.cat(out) if out else torch.zeros(0, model.config.num_labels)
    model.train(was_training)
    return probs[torch.argsort(torch.tensor(order))]
