"""Weight-only quantization: int8 (one scale per output channel) and int4 (groups of 32/64/128) linear layers.

Kernels. On a CPU the layers run PyTorch's own weight-only kernels, `torch._weight_int8pack_mm` and
`torch._weight_int4pack_mm_for_cpu` (what torchao's CPU int4/int8 weight-only layouts call as well, so torchao would
add a dependency and no speed). Measured on a 2-core AVX-512 EPYC with one thread, batch-1 (us per call):

    shape (N x K)       float32   bf16    int8(f32 x)  int8(bf16 x)  int4(f32 x)  int4(bf16 x)
    3072 x 576            134      141       1425          96           2964          107
    49152 x 576 (head)   9933     6572      23035        3921          48192         1846

so the kernels are fast only when fed bfloat16 activations there (the float32 entry points are scalar loops). Which
one is faster depends on the CPU (AVX2-only machines emulate bf16), so `kernel_act_dtype` measures it once per
process instead of assuming; activations are cast to that dtype around the kernel and back, so the model's hidden
states and KV cache stay float32. Shape rules: the int4 kernel needs N % 16 == 0 and a group size of 32, 64, 128 or
256 that divides K; int8 has none. A layer the int4 kernel cannot take falls back to int8 with a warning naming it.

On CUDA the same formats run `torch._weight_int4pack_mm` (bf16 activations, tinygemm layout) and a dequantizing
matmul for int8. That path is written to the kernels' documented contracts but UNTESTED: no GPU was available.

Formats (what a quantized model folder stores, see checkpoint.save_model; portable, repacked for the kernel at load):
  int8: `qweight` int8 (N, K), `scales` float32 (N,)                         w = scales[n] * q
  int4: `qweight` uint8 (N, K/2), low nibble = even k, `scales`/`zeros` float32 (N, K/group)
        w = scales[n, g] * (q - 8) + zeros[n, g]                              (q in 0..15, torch's convention)
GGUF's Q4_0 (d*(q-8)) and Q4_1 (d*q + m = d*(q-8) + (m + 8d)) blocks of 32 are this int4 layout exactly.
"""
from __future__ import annotations

import functools
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


# ---------------------------------------------------------------------------------------------------------------
# kernels


@functools.lru_cache(maxsize=None)
def kernel_act_dtype(device_type: str = "cpu") -> torch.dtype:
    """Activation dtype fed to the weight-only kernels here: the faster of float32 and bfloat16, measured once."""
    if device_type != "cpu":
        return torch.bfloat16  # the CUDA int4 kernel takes bf16 only
    n, k = 1024, 576
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    inputs = {dt: (torch.randn(1, k, dtype=dt), torch.rand(k // 32, n, 2, dtype=dt))
              for dt in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(inputs, float("inf"))
    for _ in range(6):  # alternating, best of 6: a busy machine's noise hits both alike
        for dt, (x, sz) in inputs.items():
            t0 = time.perf_counter()
            torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return min(best, key=best.get)


def int4_fits(n: int, k: int, group_size: int) -> str | None:
    """Why the int4 kernel cannot take an (N, K) weight, or None when it can."""
    if n % 16:
        return f"out_features {n} is not a multiple of 16"
    if k % group_size:
        return f"group size {group_size} does not divide in_features {k}"
    return None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, low nibble = even k."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([p & 15, p >> 4], -1).reshape(p.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------------
# layers


class QuantLinear(nn.Module):
    """Base of the weight-only layers: x (..., K) -> (..., N); activations cast to the kernel's dtype and back."""
    method = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self._mm(x2.to(self.act_dtype).contiguous()).to(x.dtype)  # the kernels read x as contiguous
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8Linear(QuantLinear):
    """int8 weights with one scale per output channel (torch._weight_int8pack_mm)."""
    method = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias=None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.act_dtype = kernel_act_dtype(qweight.device.type)
        # fresh, aligned copies: tensors straight from a safetensors file may sit at any byte offset, and the
        # kernel's vector loads crash on those
        self.register_buffer("qweight", qweight.to(torch.int8).clone(memory_format=torch.contiguous_format))
        self.register_buffer("kscales", scales.to(self.act_dtype).clone())  # the kernel wants x's dtype
        # the float32 scales, for saving and dequantizing: a folder must not depend on which activation dtype this
        # process measured faster (bf16-rounded scales in one process, float32 in the next)
        self.register_buffer("scales32", scales.float().clone(), persistent=False)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias=None):
        """Symmetric per-output-channel quantization of a float (N, K) weight."""
        w = w.detach().float()
        scales = (w.abs().amax(1) / 127).clamp(min=1e-12)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scales, bias)

    def _mm(self, x):
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x, self.qweight, self.kscales)
        return F.linear(x, self.qweight.to(x.dtype)) * self.kscales  # CUDA: untested (see the module docstring)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales32[:, None]

    def export(self) -> dict:
        """The portable tensors a model folder stores."""
        return {"qweight": self.qweight, "scales": self.scales32}

    def set_act_dtype(self, dtype):
        self.act_dtype, self.kscales = dtype, self.kscales.to(dtype)


class Int4Linear(QuantLinear):
    """int4 weights in groups along K with a scale and a zero point each (torch's tinygemm convention)."""
    method = "int4"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bias=None,
                 keep_portable: bool = False):
        """q: (N, K) integers 0..15; scales, zeros: (N, K / group_size); w = scales * (q - 8) + zeros.

        keep_portable: also keep the portable tensors (for saving soon after, without reading the kernel's layout).
        """
        n, k = q.shape
        why = int4_fits(n, k, group_size)
        if why or group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 kernel cannot take this layer: {why or f'group size {group_size}'}")
        super().__init__(k, n, bias)
        self.group_size = group_size
        dev = q.device
        self.act_dtype = kernel_act_dtype(dev.type)
        if dev.type == "cpu":
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        else:  # CUDA tinygemm layout: untested (see the module docstring)
            self.register_buffer("packed", torch._convert_weight_to_int4pack(pack_nibbles(q), 8))
        if keep_portable:
            self.__dict__["_portable"] = {"qweight": pack_nibbles(q), "scales": scales.float(), "zeros": zeros.float()}
        # (K / group, N, 2): scale and zero interleaved, as the kernel reads them
        self.register_buffer("sz", torch.stack([scales.float().T, zeros.float().T], -1).to(self.act_dtype).contiguous())

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int, bias=None, keep_portable: bool = False):
        """Asymmetric min/max quantization of a float (N, K) weight in groups of group_size along K."""
        w = w.detach().float()
        n, k = w.shape
        why = int4_fits(n, k, group_size)
        if why:
            raise ValueError(why)
        g = w.view(n, k // group_size, group_size)
        lo, hi = g.amin(-1), g.amax(-1)
        scales = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 15).view(n, k)
        return cls(q, scales, lo + 8 * scales, group_size, bias, keep_portable)

    def _mm(self, x):
        if x.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.sz)
        return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.sz)  # CUDA: untested

    def unpacked(self) -> torch.Tensor:
        """(N, K) uint8 values 0..15, read back out of the kernel's layout by multiplying with the identity."""
        if "_portable" in self.__dict__:
            return unpack_nibbles(self._portable["qweight"])
        k, dt = self.in_features, self.act_dtype  # the kernel's fast entry point; 0..15 are exact in bf16
        ones = torch.zeros(k // self.group_size, self.out_features, 2, dtype=dt, device=self.packed.device)
        ones[..., 0], ones[..., 1] = 1, 8  # scale 1, zero 8: w = q
        eye = torch.eye(k, dtype=dt, device=self.packed.device)
        if self.packed.device.type == "cpu":
            q = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, ones)
        else:
            q = torch._weight_int4pack_mm(eye.bfloat16(), self.packed, self.group_size, ones.bfloat16())
        return q.T.round().to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        s, z = self.sz.float().unbind(-1)  # (G, N)
        q = self.unpacked().float().view(self.out_features, -1, self.group_size)
        return ((q - 8) * s.T[..., None] + z.T[..., None]).view(self.out_features, self.in_features)

    def export(self) -> dict:
        if "_portable" in self.__dict__:
            return dict(self._portable)
        s, z = self.sz.float().unbind(-1)
        return {"qweight": pack_nibbles(self.unpacked()), "scales": s.T.contiguous(), "zeros": z.T.contiguous()}

    def set_act_dtype(self, dtype):
        self.act_dtype, self.sz = dtype, self.sz.to(dtype)


class RowSlice(nn.Module):
    """Rows [start, end) of a fused quantized layer (q/k/v or gate/up): the fused layer holds the only copy."""

    def __init__(self, fused: QuantLinear, start: int, end: int):
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the owning block registers it once
        self.start, self.end = start, end
        self.in_features, self.out_features, self.method = fused.in_features, end - start, fused.method

    def forward(self, x):
        return self.fused(x)[..., self.start:self.end]

    def extra_repr(self):
        return f"rows {self.start}:{self.end} of a fused {self.method} layer"


class Int8Embedding(nn.Module):
    """Token embedding over an Int8Linear's weights (a tied head and embedding share one int8 copy)."""

    def __init__(self, table: Int8Linear):
        super().__init__()
        self.table = table  # the same module as lm_head when tied
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids):
        t = self.table
        return t.qweight[ids].float() * t.scales32[ids][..., None]


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of the model holds quantized weights."""
    return any(isinstance(m, (QuantLinear, RowSlice)) for m in model.modules())


def export_rows(m) -> dict:
    """Portable tensors of a quantized layer or of a RowSlice of a fused one (rows cut out)."""
    if isinstance(m, RowSlice):
        full = m.fused.export()
        out = {k: v[m.start:m.end] for k, v in full.items()}
        if m.fused.bias is not None:
            out["bias"] = m.fused.bias[m.start:m.end]
        return out
    out = m.export()
    if m.bias is not None:
        out["bias"] = m.bias
    return out


KEEP_PORTABLE = False  # set by keep_portable(): layers built meanwhile keep their portable tensors for saving


def make_layer(method: str, tensors: dict, group_size: int | None = None) -> QuantLinear:
    """A quantized layer from portable tensors (export_rows' output)."""
    bias = tensors.get("bias")
    if method == "int8":
        return Int8Linear(tensors["qweight"], tensors["scales"], bias)
    return Int4Linear(unpack_nibbles(tensors["qweight"]), tensors["scales"], tensors["zeros"], group_size, bias,
                      keep_portable=KEEP_PORTABLE)


class keep_portable:
    """`with keep_portable():` int4 layers built inside keep their portable tensors (a model about to be saved)."""

    def __enter__(self):
        global KEEP_PORTABLE
        self.saved, KEEP_PORTABLE = KEEP_PORTABLE, True

    def __exit__(self, *exc):
        global KEEP_PORTABLE
        KEEP_PORTABLE = self.saved


def drop_portable(model):
    """Free the portable copies kept by keep_portable() once saved."""
    for m in model.modules():
        m.__dict__.pop("_portable", None)


def fuse_rows(method: str, parts: list[dict], group_size: int | None = None):
    """One quantized layer holding the rows of several (portable tensors), and a RowSlice view for each part."""
    keys = parts[0].keys()
    if any(p.keys() != keys for p in parts):
        raise ValueError("cannot fuse layers with and without bias")
    fused = make_layer(method, {k: torch.cat([p[k] for p in parts]) for k in keys}, group_size)
    views, start = [], 0
    for p in parts:
        n = p["qweight"].shape[0]
        views.append(RowSlice(fused, start, start + n))
        start += n
    return fused, views


# ---------------------------------------------------------------------------------------------------------------
# quantizing a model


def linear_names(model) -> list[str]:
    """Names of the model's linear layers that quantization replaces, fused groups' members included."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def quantize_model(model, method: str, group_size: int = 32, skip=()) -> dict:
    """Replace the model's linear layers by int8/int4 ones in place; returns the quantization_config.

    Fused groups (q/k/v, gate/up) become one fused layer; a tied embedding and head share one int8 copy; layers
    named in `skip` (e.g. "lm_head") stay in float. A layer the int4 kernel cannot take runs int8, with a warning.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose int8 or int4")
    if is_quantized(model):
        raise ValueError("this model is already quantized; quantize its float original instead")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    skip = set(skip)
    unknown = skip - {n for n, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"--skip names no layer of this model: {', '.join(sorted(unknown))}")
    names = linear_names(model)
    if method == "int4":
        for n in names:
            k = model.get_submodule(n).in_features
            if n not in skip and k % group_size:
                fits = [str(g) for g in GROUP_SIZES if k % g == 0]
                raise ValueError(f"group size {group_size} does not divide in_features {k} of {n}; "
                                 + (f"choose {' or '.join(fits)}" if fits else "use --method int8"))
    fallback = []

    def group(parent, prefix, members):
        names = [f"{prefix}.{m}" if prefix else m for m in members]
        if any(n in skip for n in names):
            return
        lins = [getattr(parent, m) for m in members]
        m = method
        if m == "int4":
            for n, lin in zip(names, lins):
                why = int4_fits(*lin.weight.shape, group_size)
                if why:  # a fused group runs one kernel, so the whole group falls back
                    warnings.warn(f"{n}: {why}, so the int4 kernel cannot take it; {', '.join(names)} run int8",
                                  stacklevel=4)
                    m = "int8"
        if m != method:
            fallback.extend(names)
        parts = [export_rows(quantize_linear(lin, m, group_size)) for lin in lins]
        install_group(parent, members, m, parts, group_size)

    cfg = model.config
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            group(attn, f"layers.{i}.self_attn", ["q_proj", "k_proj", "v_proj"])
            group(attn, f"layers.{i}.self_attn", ["o_proj"])
            group(mlp, f"layers.{i}.mlp", ["gate_proj", "up_proj"] if mlp.swiglu else ["up_proj"])
            group(mlp, f"layers.{i}.mlp", ["down_proj"])
        tied = cfg.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
        if tied and "lm_head" not in skip:
            # one int8 copy for the embedding lookup and the head, as llama.cpp keeps token_embd in Q8_0
            model.lm_head = Int8Linear.from_float(model.lm_head.weight, model.lm_head.bias)
            model.embed_tokens = Int8Embedding(model.lm_head)
        elif not tied:
            group(model, "", ["lm_head"])
        for name in ("mlm_dense", "pooler", "score"):
            if type(getattr(model, name, None)) is nn.Linear:
                group(model, "", [name])
    qc = {"quant_method": "llmkit", "method": method, "skip": sorted(skip), "int8_fallback": fallback,
          "format_version": 1}
    if method == "int4":
        qc["group_size"] = group_size
    model.quantization_config = qc
    return qc


def quantize_linear(lin: nn.Linear, method: str, group_size: int = 32) -> QuantLinear:
    """An int8/int4 layer from an nn.Linear."""
    if method == "int4":
        return Int4Linear.from_float(lin.weight, group_size, lin.bias, KEEP_PORTABLE)
    return Int8Linear.from_float(lin.weight, lin.bias)


def install_group(parent, members: list[str], method: str, parts: list[dict], group_size=None):
    """Put quantized layers for `members` of `parent` (one fused layer when several), from portable tensors."""
    if len(members) == 1:
        setattr(parent, members[0], make_layer(method, parts[0], group_size))
        return
    fused, views = fuse_rows(method, parts, group_size)
    for m, v in zip(members, views):
        setattr(parent, m, v)
    parent.qfused = fused  # registered submodule: moves with .to(); Attention/MLP.forward call it directly


def set_act_dtype(model, dtype: torch.dtype):
    """Feed the model's quantized kernels activations in `dtype` (float32 or bfloat16)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_act_dtype(dtype)


def dequantize_model(model, dtype=torch.float32):
    """Replace every quantized layer by an nn.Linear holding its dequantized weight (in place)."""
    with torch.no_grad():
        for name, m in list(model.named_modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, (QuantLinear, RowSlice)):
                    t = child if isinstance(child, QuantLinear) else child.fused
                    w = t.dequantize()
                    b = t.bias
                    if isinstance(child, RowSlice):
                        w, b = w[child.start:child.end], None if b is None else b[child.start:child.end]
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
                    lin.weight = nn.Parameter(w.to(dtype).contiguous(), requires_grad=False)
                    if b is not None:
                        lin.bias = nn.Parameter(b.to(dtype).clone(), requires_grad=False)
                    setattr(m, child_name, lin)
            if hasattr(m, "qfused"):
                del m.qfused
        if isinstance(model.embed_tokens, Int8Embedding):
            model.embed_tokens = nn.Embedding.from_pretrained(model.lm_head.weight.detach(), freeze=True)
            if model.config.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight
    model.__dict__.pop("quantization_config", None)
    return model


# ---------------------------------------------------------------------------------------------------------------
# GGUF blocks straight into these formats (no float copy of the weight)

GGUF_NATIVE = ("Q4_0", "Q4_1", "Q8_0")


def from_gguf_blocks(kind: str, raw, shape: tuple[int, int]) -> tuple[str, dict]:
    """(method, portable tensors) of a GGUF Q4_0/Q4_1 (int4, groups of 32) or Q8_0 (int8) tensor of shape (N, K).

    raw: the tensor's bytes, (N, bytes per row) uint8 as gguf.GGUFReader gives them.
    Q4_0 blocks are d * (q - 8), Q4_1 blocks d * q + m = d * (q - 8) + (m + 8 d): int4 with scale d, zero 0 or
    m + 8d. Q8_0 keeps one scale per block of 32 while the int8 kernel takes one per row, so its rows are
    requantized to a per-row scale from the int8 values (rounding to the nearest; at most half a row step).
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
    if kind == "Q8_0":
        q = b[..., 2:34].contiguous().view(torch.int8).float()  # (N, K/32, 32)
        w_abs = (q.abs().amax(-1) * d.abs()).amax(-1)  # (N,) largest |weight| of each row
        scales = (w_abs / 127).clamp(min=1e-12)
        q8 = (q * (d / scales[:, None])[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
        return "int8", {"qweight": q8, "scales": scales}
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


def split_state_dict(sd: dict) -> tuple[dict, dict]:
    """(float tensors, {module name: portable quantized tensors}) of a quantized model's saved state dict."""
    quant = {}
    for name in sd:
        if name.endswith(".qweight"):
            mod = name[: -len(".qweight")]
            quant[mod] = {k: sd[f"{mod}.{k}"] for k in QUANT_KEYS + ("bias",) if f"{mod}.{k}" in sd}
    taken = {f"{m}.{k}" for m, t in quant.items() for k in t}
    return {k: v for k, v in sd.items() if k not in taken}, quant


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
    from llmkit.model import Transformer, rope_cache

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
            head = Int8Linear(t["qweight"], t["scales"], t.get("bias")) if method_of(t) == "int8" else \
                Int8Linear.from_float(make_layer("int4", t).dequantize(), t.get("bias"))  # int4 tables: no gather
            model.lm_head, model.embed_tokens = head, Int8Embedding(head)
        elif "embed_tokens" in quant:
            t = quant.pop("embed_tokens")
            layer = make_layer(method_of(t), {k: v.to(device) for k, v in t.items()})
            model.embed_tokens = Int8Embedding(layer if layer.method == "int8" else Int8Linear.from_float(
                layer.dequantize()))
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


def _portable_int4_to_int8(p: dict) -> dict:
    g = group_size_of(p)
    q = unpack_nibbles(p["qweight"]).float()
    n = q.shape[0]
    w = (q.view(n, -1, g) - 8) * p["scales"][..., None] + p["zeros"][..., None]
    out = Int8Linear.from_float(w.view(n, -1)).export()
    return out | ({"bias": p["bias"]} if "bias" in p else {})
