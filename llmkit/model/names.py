"""Tensor names of each model family: llmkit's (the HF Llama layout without the `model.` prefix) <-> Hugging Face's
GPT-2 and BERT names, and llama.cpp's GGUF names. One table per family, read both ways by checkpoint.py (loading and
saving), lora.py (PEFT adapter names) and gguf_export.py.
"""
from __future__ import annotations

import torch

from llmkit.model.config import ModelConfig


def rename(name: str, table) -> str | None:
    """`name` mapped through a [(src, dst)] table whose "{}" matches a layer number; None when no row matches."""
    for src, dst in table:
        if "{}" in src:
            pre, post = src.split("{}")
            if name.startswith(pre) and name.endswith(post):
                mid = name[len(pre):len(name) - len(post)]
                if mid.isdigit():
                    return dst.replace("{}", mid)
        elif name == src:
            return dst
    return None


def _table(pairs, suffixes=("weight", "bias")):
    return [(f"{a}.{s}", f"{b}.{s}") for a, b in pairs for s in suffixes]


GPT2 = _table([
    ("embed_tokens", "transformer.wte"), ("embed_positions", "transformer.wpe"), ("norm", "transformer.ln_f"),
    ("layers.{}.input_layernorm", "transformer.h.{}.ln_1"),
    ("layers.{}.self_attn.o_proj", "transformer.h.{}.attn.c_proj"),
    ("layers.{}.post_attention_layernorm", "transformer.h.{}.ln_2"),
    ("layers.{}.mlp.up_proj", "transformer.h.{}.mlp.c_fc"),
    ("layers.{}.mlp.down_proj", "transformer.h.{}.mlp.c_proj"), ("lm_head", "lm_head"), ("score", "score"),
])
GPT2_CONV = (".attn.c_proj.", ".mlp.c_fc.", ".mlp.c_proj.")
BERT = _table([
    ("embed_tokens", "bert.embeddings.word_embeddings"), ("embed_positions", "bert.embeddings.position_embeddings"),
    ("embed_types", "bert.embeddings.token_type_embeddings"), ("embed_norm", "bert.embeddings.LayerNorm"),
    ("layers.{}.self_attn.q_proj", "bert.encoder.layer.{}.attention.self.query"),
    ("layers.{}.self_attn.k_proj", "bert.encoder.layer.{}.attention.self.key"),
    ("layers.{}.self_attn.v_proj", "bert.encoder.layer.{}.attention.self.value"),
    ("layers.{}.self_attn.o_proj", "bert.encoder.layer.{}.attention.output.dense"),
    ("layers.{}.input_layernorm", "bert.encoder.layer.{}.attention.output.LayerNorm"),
    ("layers.{}.mlp.up_proj", "bert.encoder.layer.{}.intermediate.dense"),
    ("layers.{}.mlp.down_proj", "bert.encoder.layer.{}.output.dense"),
    ("layers.{}.post_attention_layernorm", "bert.encoder.layer.{}.output.LayerNorm"),
    ("pooler", "bert.pooler.dense"), ("mlm_dense", "cls.predictions.transform.dense"),
    ("mlm_norm", "cls.predictions.transform.LayerNorm"), ("score", "classifier"),
]) + [("lm_head.weight", "cls.predictions.decoder.weight"), ("lm_head.bias", "cls.predictions.bias")]

GGUF = [
    ("token_embd.weight", "embed_tokens.weight"), ("output_norm.weight", "norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{}.attn_norm.weight", "layers.{}.input_layernorm.weight"),
    ("blk.{}.ffn_norm.weight", "layers.{}.post_attention_layernorm.weight"),
    ("blk.{}.attn_output.weight", "layers.{}.self_attn.o_proj.weight"),
    ("blk.{}.ffn_gate.weight", "layers.{}.mlp.gate_proj.weight"),
    ("blk.{}.ffn_up.weight", "layers.{}.mlp.up_proj.weight"),
    ("blk.{}.ffn_down.weight", "layers.{}.mlp.down_proj.weight"),
] + [(f"blk.{{}}.attn_{p}.{s}", f"layers.{{}}.self_attn.{p}_proj.{s}") for p in "qkv" for s in ("weight", "bias")]


def to_hf_names(cfg: ModelConfig, sd: dict) -> dict:
    """llmkit state dict -> HF tensor names (Conv1D transposes for GPT-2)."""
    out = {}
    if cfg.family == "llama":
        for k, v in sd.items():
            if k == "lm_head.weight":
                if not cfg.tie_word_embeddings and not cfg.num_labels:
                    out[k] = v
            elif k.startswith("score."):
                out[k] = v
            else:
                out["model." + k] = v
        return out
    table = GPT2 if cfg.family == "gpt2" else BERT
    for k, v in sd.items():
        if k == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if cfg.family == "gpt2" and k.startswith("layers.") and ".self_attn.q_proj" in k:
            # GPT-2 keeps q, k, v in one Conv1D (in, 3*out)
            i = k.split(".")[1]
            kind = k.rsplit(".", 1)[1]
            parts = [sd[f"layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.h.{i}.attn.c_attn.{kind}"] = torch.cat(parts, 0).T.contiguous() if kind == "weight" \
                else torch.cat(parts, 0)
            continue
        if cfg.family == "gpt2" and (".self_attn.k_proj" in k or ".self_attn.v_proj" in k):
            continue
        name = rename(k, table)
        if name is None:
            continue
        if cfg.family == "gpt2" and name.endswith(".weight") and any(s in name for s in GPT2_CONV):
            v = v.T.contiguous()
        if cfg.family == "gpt2" and cfg.tagger and name.startswith("score."):
            name = "classifier." + name.removeprefix("score.")  # GPT2ForTokenClassification's name
        out[name] = v
    return out


def from_hf_names(cfg: ModelConfig, sd: dict) -> dict:
    """HF tensor names -> llmkit state dict."""
    out = {}
    if cfg.family == "llama":
        for k, v in sd.items():
            k = k.removeprefix("model.")
            if k.startswith("layers.") and k.endswith("rotary_emb.inv_freq"):
                continue
            out[k] = v
        return out
    inverse = [(hf, ours) for ours, hf in (GPT2 if cfg.family == "gpt2" else BERT)]
    for k, v in sd.items():
        if cfg.family == "bert" and not k.startswith(("bert.", "cls.", "classifier.")):
            k = "bert." + k  # BertModel checkpoints have no prefix
        if cfg.family == "gpt2" and k.startswith("classifier."):  # GPT2ForTokenClassification's head
            k = "score." + k.removeprefix("classifier.")
        if cfg.family == "gpt2" and not k.startswith(("transformer.", "lm_head.", "score.")):
            k = "transformer." + k
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k.endswith("position_ids"):
            continue
        if cfg.family == "gpt2" and ".attn.c_attn." in k:
            i, kind = k.split(".")[2], k.rsplit(".", 1)[1]
            w = v.T if kind == "weight" else v
            for p, part in zip("qkv", w.split(cfg.n_embd, 0)):
                out[f"layers.{i}.self_attn.{p}_proj.{kind}"] = part.contiguous()
            continue
        name = rename(k, inverse)
        if name is None:
            continue
        if cfg.family == "gpt2" and k.endswith(".weight") and any(s in k for s in GPT2_CONV):
            v = v.T.contiguous()
        out[name] = v
    if cfg.family == "bert" and "lm_head.bias" not in out and "cls.predictions.decoder.bias" in sd:
        out["lm_head.bias"] = sd["cls.predictions.decoder.bias"]
    return out


def hf_module(cfg: ModelConfig, name: str) -> str:
    """llmkit module name (layers.0.self_attn.q_proj) -> the module's name inside the Hugging Face model."""
    if cfg.family == "llama":
        return name if name == "score" else "model." + name
    if cfg.family == "gpt2" and cfg.tagger and name == "score":
        return "classifier"
    hf = rename(name + ".weight", GPT2 if cfg.family == "gpt2" else BERT)
    if hf is None:
        raise ValueError(f"module {name} has no Hugging Face name for a {cfg.family} model")
    return hf.removesuffix(".weight")
