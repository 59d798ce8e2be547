"""Token classification (named entities): words to sub-tokens, a tagger's word tags, entities with character offsets.

One alignment serves training, evaluation and tagging: the words are joined with single spaces, the text is
tokenized once, and each word's first sub-token (found through the tokenizer's character offsets) carries the word's
tag; the other sub-tokens are ignored (the usual recipe, and what transformers' examples do). Raw text is split into
words first (`split_words`: runs of letters and digits, and each other non-space character), so tagging sees text as
CoNLL files write it. Entities are read from IOB2/IOBES tags with the rules of seqeval's default mode (conlleval's).
"""
from __future__ import annotations

import re

import torch

from llmkit.infer.classify import pad_batch, pad_id_for

WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def encode_words(tok, words: list[str], max_length: int) -> tuple[list[int], list[int]]:
    """(token ids cut to max_length, the index of each word's first sub-token, -1 for a word left without one)."""
    text, owner = "", []
    for i, w in enumerate(words):
        if i:
            text += " "
            owner.append(-1)
        text += w
        owner += [i] * len(w)
    enc = tok.hf.encode(text, add_special_tokens=True)
    ids = list(enc.ids)[:max_length]
    first = [-1] * len(words)
    for t, ((s, e), special) in enumerate(zip(enc.offsets[:max_length], enc.special_tokens_mask[:max_length])):
        if special:
            continue
        w = next((owner[c] for c in range(s, min(e, len(owner))) if owner[c] >= 0), -1)
        if w >= 0 and first[w] < 0:
            first[w] = t
    return ids, first


def check_tagger(lm):
    """The loaded model is a token classifier with a tokenizer; else one clear error."""
    cfg = lm.config
    if not (cfg.num_labels and cfg.tagger):
        what = "a sequence classifier" if cfg.num_labels else "a language model"
        raise ValueError(f"{lm.path} is {what}, not a token tagger; fine-tune one with `llmkit finetune --task tag "
                         "--data train.conll`")
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer.json; tagging needs one beside the weights")


@torch.inference_mode()
def predict_tags(model, tok, sentences: list[list[str]], max_length: int = 512, batch_size: int = 32,
                 progress: bool = False) -> list[list[tuple[str, float]]]:
    """(tag, probability) of each word of each sentence, from its first sub-token; "O" (probability 0) for a word
    cut off by max_length or without a token."""
    from tqdm import tqdm

    cfg = model.config
    if not (cfg.num_labels and cfg.tagger):
        raise ValueError("this model has no token-classification head; fine-tune one with `llmkit finetune --task tag`")
    names = [cfg.id2label.get(str(i), str(i)) for i in range(cfg.num_labels)] if cfg.id2label else \
        [f"LABEL_{i}" for i in range(cfg.num_labels)]
    pad, device = pad_id_for(tok, cfg), next(model.parameters()).device
    was_training = model.training
    model.eval()
    enc = [encode_words(tok, ws, max_length) for ws in sentences]
    out: list = [None] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))  # similar lengths together: less padding
    bar = tqdm(total=len(order), desc="tagging", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        ids, mask = pad_batch([enc[i][0] or [pad] for i in chunk], pad)
        probs = model(ids.to(device), attention_mask=mask.to(device), head="tag").float().softmax(-1).cpu()
        best, arg = probs.max(-1)
        for row, i in enumerate(chunk):
            out[i] = [(names[int(arg[row, t])], float(best[row, t])) if t >= 0 else ("O", 0.0) for t in enc[i][1]]
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------
# entities: seqeval's default mode (conlleval): lenient chunks, an I- or E- after O or another type opens one


def _split(tag: str) -> tuple[str, str]:
    """(prefix, type) as seqeval reads a tag: "B-PER" -> ("B", "PER"), "O" -> ("O", "_")."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag, tag, prev_type, type_) -> bool:
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _starts(prev_tag, tag, prev_type, type_) -> bool:
    return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) word indices of each entity in one sentence's tags (IOB2 or IOBES), seqeval's chunks."""
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, t in enumerate([*tags, "O"]):
        tag, type_ = _split(t)
        if _ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def split_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) of each word of raw text: letters and digits (with inner apostrophes), or one other
    non-space character."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def tag_texts(model, tok, texts: list[str], max_length: int = 512, batch_size: int = 32,
              progress: bool = False) -> list[dict]:
    """{"text", "entities": [{"start", "end", "type", "text", "score"}]} for each text: character offsets into the
    text, score = the mean probability of the entity's word tags."""
    words = [split_words(t) for t in texts]
    tagged = predict_tags(model, tok, [[w for w, _, _ in ws] for ws in words], max_length, batch_size, progress)
    out = []
    for text, ws, tags in zip(texts, words, tagged):
        ents = []
        for type_, a, b in entity_spans([t for t, _ in tags]):
            start, end = ws[a][1], ws[b][2]
            score = sum(p for _, p in tags[a:b + 1]) / (b - a + 1)
            ents.append({"start": start, "end": end, "type": type_, "text": text[start:end], "score": round(score, 6)})
        out.append({"text": text, "entities": ents})
    return out
