"""Quantized weights in and out: GGUF blocks straight into llmkit's int4/int8 formats, a quantized model's state dict
(saving) and a Transformer built from portable tensors (loading); the layers themselves are quant.py's."""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from llmkit.model.quant import (Int8Embedding, Int8Linear, QuantLinear, RowSlice, _rows_from_blocks, check_device,
                                export_rows, install_group, int4_fits, make_layer, pack_nibbles, unpack_nibbles)
from llmkit.model.transformer import Transformer, rope_cache

# ---------------------------------------------------------------------------------------------------------------
# GGUF blocks straight into these formats (no float copy of the weight)

GGUF_NATIVE = ("Q4_0", "Q4_1", "Q8_0")


def from_gguf_blocks(kind: str, raw, shape: tuple[int, int]) -> tuple[str, dict]:
    """(method, portable tensors) of a GGUF Q4_0/Q4_1 (int4, groups of 32) or Q8_0 (int8) tensor of shape (N, K).

    raw: the tensor's bytes, (N, bytes per row) uint8 as gguf.GGUFReader gives them.
    Q4_0 blocks are d * (q - 8), Q4_1 blocks d * q + m = d * (q - 8) + (m + 8 d): int4 with scale d, zero 0 or
    m + 8d. Q8_0 is int8 with one scale per block of 32 (Int8Linear keeps them; see rows_only for other layers).
    """
    import numpy as np

    n, k = shape
    b = torch.from_numpy(np.array(raw, copy=True).view(np.uint8).reshape(n, k // 32, -1))  # (N, blocks, bytes)
    d = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # (N, K/32)
    if kind in ("Q4_0", "Q4_1"):
        off = 2 if kind == "Q4_0" else 4
        qs = b[..., off:off + 16]  # element j in the low nibble of byte j, element j + 16 in the high one
        q = torch.cat([qs & 15, qs >> 4], -1).reshape(n, k)
        if kind == "Q4_0":
            zeros = torch.zeros_like(d)
        else:
            zeros = b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8 * d
        return "int4", {"qweight": pack_nibbles(q), "scales": d, "zeros": zeros}
    if kind == "Q8_0":  # blocks kept: int8 with (N, K/32) scales (see Int8Linear)
        return "int8", {"qweight": b[..., 2:34].contiguous().view(torch.int8).reshape(n, k), "scales": d}
    raise ValueError(f"GGUF block type {kind} does not load natively (llmkit reads {', '.join(GGUF_NATIVE)})")


def permute_rows(tensors: dict, perm: torch.Tensor) -> dict:
    """The same portable tensors with output rows reordered (GGUF's q/k RoPE row order)."""
    return {k: v[perm] if isinstance(v, torch.Tensor) and v.dim() >= 1 else v for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------------------
# models from portable tensors (quantized model folders, GGUF files) and back

QUANT_KEYS = ("qweight", "scales", "zeros")


def method_of(tensors: dict) -> str:
    return "int4" if "zeros" in tensors else "int8"


def group_size_of(tensors: dict) -> int | None:
    """int4 group size from the tensors' shapes: K / number of groups."""
    if "zeros" not in tensors:
        return None
    return tensors["qweight"].shape[1] * 2 // tensors["scales"].shape[1]


def split_state_dict(sd) -> tuple[dict, dict]:
    """(float tensors, {module name: portable quantized tensors}) of a quantized model's saved state dict.

    The quantized layers' tensors are looked up in `sd` only when a layer is built (a model.tensor_file.TensorFile
    reads them then), so a loader holds one layer's file tensors at a time."""
    quant = {}
    for name in sd:
        if name.endswith(".qweight"):
            mod = name[: -len(".qweight")]
            quant[mod] = _LayerTensors(sd, mod, [k for k in QUANT_KEYS + ("bias",) if f"{mod}.{k}" in sd])
    taken = {f"{m}.{k}" for m, t in quant.items() for k in t}
    return {k: sd[k] for k in sd if k not in taken}, quant


class _LayerTensors(Mapping):
    """One quantized layer's tensors {key: tensor} in a state dict, looked up there when asked for."""

    def __init__(self, sd, module: str, keys: list[str]):
        self.sd, self.module, self.names = sd, module, keys

    def __getitem__(self, k):
        if k not in self.names:
            raise KeyError(k)
        return self.sd[f"{self.module}.{k}"]

    def __contains__(self, k) -> bool:
        return k in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def quantized_state_dict(model) -> dict:
    """Portable tensors of every quantized layer plus the float ones, under the layers' names (for saving)."""
    out = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (QuantLinear, RowSlice)) and not name.endswith(("qfused", ".table")):
            out.update({f"{name}.{k}": v.contiguous() for k, v in export_rows(m).items()})
    skip = {n for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (QuantLinear, RowSlice, Int8Embedding))}
    for k, v in model.state_dict().items():
        mod = k.rsplit(".", 1)[0]
        if not any(mod == s or mod.startswith(s + ".") for s in skip):
            out[k] = v
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def build_quantized(cfg, float_sd: dict, quant: dict, device="cpu"):
    """A Transformer from float tensors and quantized layers' portable tensors ({module name: tensors}, emptied)."""
    check_device(device)
    model = Transformer(cfg, device="meta")  # quant's entries are taken out as layers are built (memory)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            _install(attn, f"layers.{i}.self_attn", ["q_proj", "k_proj", "v_proj"], quant, device)
            _install(attn, f"layers.{i}.self_attn", ["o_proj"], quant, device)
            _install(mlp, f"layers.{i}.mlp", ["gate_proj", "up_proj"] if mlp.swiglu else ["up_proj"], quant, device)
            _install(mlp, f"layers.{i}.mlp", ["down_proj"], quant, device)
        table = quant.pop("lm_head", None) or quant.pop("embed_tokens", None) if cfg.tie_word_embeddings else None
        if table is not None:
            t = {k: v.to(device) for k, v in table.items()}
            t = _portable_int4_to_int8(t) if method_of(t) == "int4" else t  # int4 tables: no gather, int8 rows
            head = Int8Linear(t["qweight"], t["scales"], t.get("bias"))
            model.lm_head, model.embed_tokens = head, Int8Embedding(head)
        elif "embed_tokens" in quant:
            t = {k: v.to(device) for k, v in quant.pop("embed_tokens").items()}
            t = _portable_int4_to_int8(t) if method_of(t) == "int4" else t  # a Q4 (--pure) GGUF's embedding
            model.embed_tokens = Int8Embedding(Int8Linear(t["qweight"], t["scales"], t.get("bias")))
        for name in ("lm_head", "mlm_dense", "pooler", "score"):
            _install(model, "", [name], quant, device)
    if quant:
        raise ValueError(f"quantized tensors for unknown layers: {', '.join(sorted(quant)[:3])}")
    # copies: a tensor straight from safetensors keeps the whole file's mapping resident (~ the file's size in RSS)
    state = {k: v.to(device, copy=True) for k, v in float_sd.items()}
    float_sd.clear()
    model.load_state_dict(state, strict=False, assign=True)
    if not isinstance(model.embed_tokens, Int8Embedding):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    missing = [n for n in missing if not n.startswith("rope_")]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    if cfg.position == "rope":
        model.rope_cos, model.rope_sin = rope_cache(cfg, device=device)
    return model.eval()


def _install(parent, prefix, members, quant, device):
    names = [f"{prefix}.{m}" if prefix else m for m in members]
    parts = [quant.get(n) for n in names]
    if all(p is None for p in parts):
        return
    if any(p is None for p in parts):
        raise ValueError(f"{', '.join(n for n, p in zip(names, parts) if p is None)}: quantized tensors missing")
    for n in names:
        del quant[n]
    parts = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()} for p in parts]
    if members != ["lm_head"]:  # blocks matter for the head's logits; elsewhere one copy, requantized per row
        parts = [rows_only(p) for p in parts]
    if any(method_of(p) == "int4" and int4_fits(p["qweight"].shape[0], p["qweight"].shape[1] * 2,
                                                   group_size_of(p)) for p in parts):
        warnings.warn(f"{', '.join(names)}: the int4 kernel cannot take these shapes "
                      f"({parts[0]['qweight'].shape[0]} rows); they run int8", stacklevel=3)
        parts = [_portable_int4_to_int8(p) if method_of(p) == "int4" else p for p in parts]
    methods = {method_of(p) for p in parts}
    sizes = {group_size_of(p) for p in parts}
    if len(methods) == 1 and len(sizes) == 1:
        install_group(parent, members, methods.pop(), parts, sizes.pop())
    else:  # mixed formats (e.g. a GGUF with Q8_0 and Q4_1 in one group): separate layers, no fused kernel call
        for m, p in zip(members, parts):
            setattr(parent, m, make_layer(method_of(p), p, group_size_of(p)))


def rows_only(p: dict) -> dict:
    """Portable int8 tensors with one scale per row (block scales requantized); other tensors as they are."""
    if method_of(p) != "int8" or p["scales"].dim() == 1:
        return p
    q8, scales = _rows_from_blocks(p["qweight"], p["scales"].float())
    return p | {"qweight": q8, "scales": scales}


def _portable_int4_to_int8(p: dict) -> dict:
    g = group_size_of(p)
    q = unpack_nibbles(p["qweight"]).float()
    n = q.shape[0]
    w = (q.view(n, -1, g) - 8) * p["scales"][..., None] + p["zeros"][..., None]
    out = Int8Linear.from_float(w.view(n, -1)).export()
    return out | ({"bias": p["bias"]} if "bias" in p else {})
