"""GGUF import (llama.cpp files): config and tokenizer from the metadata, weights dequantized with the gguf package
or kept as llmkit's int4/int8 blocks (native), llama.cpp's q/k row permutation undone."""
from __future__ import annotations

import torch

from llmkit.model import names
from llmkit.model import quant as quantize
from llmkit.model import quant_io
from llmkit.model.build import LoadedModel, build_model
from llmkit.model.config import ModelConfig
from llmkit.model.hf_config import _id

def read_gguf(path):
    """A gguf.GGUFReader, with a clear error for truncated or foreign files."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path}: {e} (truncated or corrupt?)") from None


def gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def config_from_gguf(reader) -> ModelConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}: llmkit imports llama, mistral and qwen2 GGUF files")
    g = lambda k, d=None: gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens", []))
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family="llama", vocab_size=int(vocab), n_layer=int(g("block_count")), n_head=n_head,
        n_kv_head=int(g("attention.head_count_kv", n_head)), n_embd=n_embd,
        intermediate_size=int(g("feed_forward_length")), head_dim=int(g("attention.key_length", n_embd // n_head)),
        max_position_embeddings=int(g("context_length", 2048)), norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_theta=float(g("rope.freq_base", 10000.0)), qkv_bias="blk.0.attn_q.bias" in names, o_bias=False,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_id(gguf_field(reader, "tokenizer.ggml.bos_token_id")), eos_token_id=_id(eos),
        pad_token_id=_id(gguf_field(reader, "tokenizer.ggml.padding_token_id")), extra={"model_type": arch},
    )


def load_gguf(path, dtype=torch.float32, device="cpu", native: bool = False) -> LoadedModel:
    """Load a llama.cpp GGUF file: config and tokenizer from its metadata, dequantized weights.

    native=True keeps Q4_0/Q4_1 tensors as int4 (groups of 32) and Q8_0 as int8 (llmkit.model.quant), with no float
    copy; other block types are an error then.
    """
    from gguf.quants import dequantize

    if native:
        quantize.check_device(device)  # before reading the file
    reader = read_gguf(path)
    cfg = config_from_gguf(reader)
    sd, quant = {}, {}
    for t in reader.tensors:
        name = names.rename(t.name, names.GGUF)
        if name is None:
            continue
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        kind = t.tensor_type.name
        if native and len(shape) == 2 and kind not in ("F32", "F16", "BF16"):
            if kind not in quant_io.GGUF_NATIVE:
                raise ValueError(f"GGUF tensor {t.name} uses block type {kind}; llmkit loads "
                                 f"{', '.join(quant_io.GGUF_NATIVE)} natively (load it with --dtype float32)")
            method, q = quant_io.from_gguf_blocks(kind, t.data, shape)
            if ".attn_q." in t.name or ".attn_k." in t.name:
                perm = _unpermute(torch.arange(shape[0])[:, None].numpy(), cfg.n_head if ".attn_q." in t.name
                                  else cfg.n_kv_head)[:, 0]
                q = quant_io.permute_rows(q, torch.from_numpy(perm.copy()))
            quant[name.removesuffix(".weight")] = q
            continue
        try:
            w = dequantize(t.data, t.tensor_type).reshape(shape)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {t.name} uses quantization {t.tensor_type.name}, which the gguf package "
                             "cannot dequantize") from None
        if ".attn_q." in t.name:
            w = _unpermute(w, cfg.n_head)
        elif ".attn_k." in t.name:
            w = _unpermute(w, cfg.n_kv_head)
        sd[name] = torch.from_numpy(w.astype("float32", copy=not w.flags.writeable))  # F32 tensors are read-only mmaps
    from llmkit.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(reader)
    if quant:
        model = quant_io.build_quantized(cfg, sd, quant, device=device)
        model.quantization_config = {"quant_method": "gguf", "method": "native", "source": str(path)}
    else:
        model = build_model(cfg, sd, dtype=dtype, device=device)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": _chat_eos(tok, cfg)}
    return LoadedModel(model, tok, gen, str(path))


def _unpermute(w, n_head):
    # llama.cpp's convert script interleaves the two RoPE halves of each head; transformers keeps them split
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _chat_eos(tok, cfg: ModelConfig):
    ids = list(cfg.eos_ids)
    stops = getattr(tok, "chat_stop_ids", None)
    for i in (stops() if stops else []):
        if i not in ids:
            ids.append(i)
    return ids[0] if len(ids) == 1 else ids


def is_gguf(p) -> bool:
    """Whether the file at p starts with GGUF's magic bytes."""
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"
