"""Export a Llama-family model folder to a llama.cpp GGUF file (F16, Q8_0, Q4_0, Q4_1) with the `gguf` package.

Follows llama.cpp's convert_hf_to_gguf.py: the same metadata keys, tensor names, q/k row permutation (llama.cpp
rotates interleaved pairs, transformers rotates split halves), tokenizer vocabulary, merges and chat template.
Norms stay F32, as llama.cpp keeps 1-D tensors; with Q4_0/Q4_1 the token embedding is Q8_0, as in llama.cpp's own Q4
files (the default model's too). A quantized llmkit folder is dequantized first (cli convert loads it as float32).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from llmkit.model.checkpoint import LoadedModel
from llmkit.model.config import ModelConfig
from llmkit.model.names import GGUF, rename
from llmkit.utils.io import shared_mode

QUANTS = ("f16", "q8_0", "q4_0", "q4_1")

_TO_GGUF = [(ours, theirs) for theirs, ours in GGUF]  # the import table, read the other way


def gguf_name(name: str) -> str:
    """llmkit tensor name -> llama.cpp tensor name."""
    out = rename(name, _TO_GGUF)
    if out is None:
        raise ValueError(f"tensor {name} has no llama.cpp name")
    return out


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from transformers' split-halves RoPE layout to llama.cpp's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_exportable(cfg: ModelConfig):
    """Raise a clear error for models llama.cpp's 'llama' architecture cannot hold."""
    if cfg.family != "llama":
        raise ValueError(f"GGUF export supports Llama-family models; this one is {cfg.family} (use --to hf)")
    if cfg.num_labels:
        raise ValueError("GGUF export holds language models; this folder is a classifier (use --to hf)")
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise ValueError("GGUF export writes the 'llama' architecture, which has no attention/MLP biases (Qwen2 style "
                         "models are not supported yet; use --to hf)")


# ---------------------------------------------------------------------------------------------------------------
# tokenizer metadata


def _pre_name(spec: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE pre-tokenizer (see tokenizer.GGUF_PRE_SPLITS)."""
    from llmkit.model import tokenizer as T

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == T.LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == T.QWEN2_SPLIT:
            return "qwen2"
    raise ValueError(f"GGUF export: unknown pre-tokenizer {kinds}; llama.cpp would split text differently "
                     "(supported: GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE)")


def _add_tokenizer(w, tok, cfg: ModelConfig):
    import gguf

    spec = json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError("GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2 style)")
    vocab = tok.hf.get_vocab(with_added_tokens=True)
    added = tok.hf.get_added_tokens_decoder()
    n = max(cfg.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]  # embedding rows beyond the vocabulary, named as llama.cpp does
    types = [gguf.TokenType.UNUSED] * n
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = gguf.TokenType.NORMAL
    for i, t in added.items():
        types[i] = gguf.TokenType.CONTROL if t.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(spec))
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    for key, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("unk", tok.unk_id), ("pad", tok.pad_id)):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    w.add_add_bos_token(bool(tok.add_bos_token))
    w.add_add_space_prefix(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


# ---------------------------------------------------------------------------------------------------------------


def export_gguf(lm: LoadedModel, out_path, quant: str = "f16", name: str | None = None, pure: bool = False) -> Path:
    """Write `lm` as a GGUF file (F16/Q8_0/Q4_0/Q4_1 weights, F32 norms) with its tokenizer and template; atomic.

    pure=True quantizes the token embedding as the other weights (llama-quantize --pure) instead of Q8_0."""
    import gguf
    from gguf.quants import quantize

    quant = quant.lower()
    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    cfg = lm.config
    check_exportable(cfg)
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer; a GGUF file must carry one")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[quant]

    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name or Path(lm.path).name or "llmkit-model")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.head_dim != cfg.n_embd // cfg.n_head:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        w.add_file_type(ftype)
        _add_tokenizer(w, lm.tokenizer, cfg)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        sd = lm.model.state_dict()
        for k, v in sd.items():
            if k == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            v = v.detach().float().cpu()
            if k.endswith("self_attn.q_proj.weight") or k.endswith("self_attn.q_proj.bias"):
                v = permute(v, cfg.n_head)
            elif k.endswith("self_attn.k_proj.weight") or k.endswith("self_attn.k_proj.bias"):
                v = permute(v, cfg.n_kv_head)
            data = v.numpy()
            if data.ndim == 1:  # norms (and biases) stay F32, as llama.cpp keeps them
                w.add_tensor(gguf_name(k), data.astype(np.float32))
            elif qtype != gguf.GGMLQuantizationType.F16 and data.shape[-1] % 32 == 0:
                t = gguf.GGMLQuantizationType.Q8_0 if k == "embed_tokens.weight" and not pure else qtype
                w.add_tensor(gguf_name(k), quantize(data, t), raw_dtype=t)
            else:  # F16 (also for rows that Q8_0's 32-wide blocks do not divide)
                w.add_tensor(gguf_name(k), data.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        shared_mode(tmp)  # mkstemp creates 0600; a model file is meant to be shared
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
