"""The training losses every recipe hands train.py's loop: loss_fn(model, batch) -> loss or (loss, extra metrics).

Batches: input_ids (B, T), labels (B, T) with IGNORE (-100) where nothing is scored (tagging too), or (B,) class ids for
classification; fine-tuning batches also carry an attention_mask. DP-SGD's per-example versions are in dp.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.data.corpus import IGNORE


def clm_loss(model, batch) -> torch.Tensor:
    """Next-token cross-entropy where labels are not IGNORE (the loaders align them: labels[t] is the token after t;
    fine-tuning batches also carry an attention_mask and IGNORE on padding and non-assistant tokens)."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)


def mlm_loss(model, batch):
    """Cross-entropy on the masked positions, and masked-token accuracy."""
    logits = model(batch["input_ids"])  # (B, T, V)
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    if model.training:  # the training step uses the loss only: no argmax over the vocabulary, no device sync
        return loss, {}
    scored = labels != IGNORE
    acc = ((logits.argmax(-1) == labels) & scored).sum() / scored.sum().clamp(min=1)
    return loss, {"accuracy": acc.detach()}


def classify_loss(model, batch):
    """Cross-entropy of the sequence-classification head, and accuracy."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], head="classify")  # (B, num_labels)
    acc = (logits.argmax(-1) == batch["labels"]).float().mean()
    return F.cross_entropy(logits.float(), batch["labels"]), {"acc": acc.detach()}


def tag_loss(model, batch):
    """Cross-entropy of the token-classification head on the tagged sub-tokens (labels IGNORE elsewhere), and
    accuracy over them."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], head="tag")  # (B, T, num_labels)
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    scored = labels != IGNORE
    acc = ((logits.argmax(-1) == labels) & scored).sum() / scored.sum().clamp(min=1)
    return loss, {"acc": acc.detach()}
