"""Weight-only quantization: int8 (one scale per output channel) and int4 (groups of 32/64/128) linear layers.

Kernels. On a CPU the layers run PyTorch's own weight-only kernels, `torch._weight_int8pack_mm` and
`torch._weight_int4pack_mm_for_cpu` (what torchao's CPU int4/int8 weight-only layouts call as well, so torchao would
add a dependency and no speed). Measured on a 2-core AVX-512 EPYC with one thread, batch-1 (us per call):

    shape (N x K)       float32   bf16    int8(f32 x)  int8(bf16 x)  int4(f32 x)  int4(bf16 x)
    3072 x 576            134      141       1425          96           2964          107
    49152 x 576 (head)   9933     6572      23035        3921          48192         1846

so the kernels are fast only when fed bfloat16 activations there (the float32 entry points are scalar loops). The
kernels' input dtype is bfloat16 unless set otherwise (default_act_dtype, set_act_dtype; `--dtype auto` may choose
float32 where it measures faster and passes a quality probe): activations are cast to it around the kernel and the
output back to float32, so hidden states and the KV cache stay float32, rounded to bf16 only at the kernels' inputs
and outputs. The LM head's logits are float32 on every path (model.logits.head_logits). Shape rules: the int4
kernel needs N % 16 == 0 and a group size of 32, 64, 128 or 256 that divides K; int8 has none. A layer the int4
kernel cannot take falls back to int8 with a warning naming it. GGUF blocks, state dicts and building a quantized
Transformer from portable tensors are quant_io.py's.

On CUDA the same formats would run `torch._weight_int4pack_mm` (bf16 activations, tinygemm layout, packed as torch's
own reference helper packs) and a dequantizing matmul for int8. No GPU test has run, so a request for quantized layers
off the CPU is a one-line error (check_device) until one does; GPUs run bfloat16.

Formats (what a quantized model folder stores, see checkpoint.save_model; portable, repacked for the kernel at load):
  int8: `qweight` int8 (N, K), `scales` float32 (N,) or (N, K/32)           w = scales[n] * q or scales[n, k/32] * q
  int4: `qweight` uint8 (N, K/2), low nibble = even k, `scales`/`zeros` float32 (N, K/group)
        w = scales[n, g] * (q - 8) + zeros[n, g]                              (q in 0..15, torch's convention)
GGUF's Q4_0 (d*(q-8)) and Q4_1 (d*q + m = d*(q-8) + (m + 8d)) blocks of 32 are this int4 layout exactly, and Q8_0
blocks the int8 layout with block scales.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


# ---------------------------------------------------------------------------------------------------------------
# kernels


KERNEL_INPUTS = ("float32", "bfloat16")
KERNEL_INPUT_ENV = "LLMKIT_KERNEL_INPUT"  # float32 or bfloat16: forces the kernels' activation dtype (tests, users)


def default_act_dtype(device_type: str = "cpu") -> torch.dtype:
    """Activation dtype the weight-only kernels are fed unless told otherwise (see set_act_dtype): bfloat16.

    No stopwatch decides it: $LLMKIT_KERNEL_INPUT (float32 or bfloat16) if set, else bfloat16, the input torch's CPU
    kernels vectorize (natively with AVX512_BF16/AMX, by conversion on AVX2; their float32 entry points are scalar
    loops, 10-30x slower here) and the only one the CUDA int4 kernel takes. `--dtype auto` picks float32 inputs
    where they measure faster and pass the quality probe (auto_dtype). The tests force both on every machine.
    """
    forced = os.environ.get(KERNEL_INPUT_ENV)
    if forced:
        if forced not in KERNEL_INPUTS:
            raise ValueError(f"${KERNEL_INPUT_ENV} must be float32 or bfloat16, got {forced!r}")
        return getattr(torch, forced)
    return torch.bfloat16


def int4_fits(n: int, k: int, group_size: int) -> str | None:
    """Why the int4 kernel cannot take an (N, K) weight, or None when it can."""
    if n % 16:
        return f"out_features {n} is not a multiple of 16"
    if k % group_size:
        return f"group size {group_size} does not divide in_features {k}"
    return None


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of a packed tensor in memory order, low nibble of each byte first."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([b & 15, b >> 4], -1).reshape(-1)


@functools.lru_cache(maxsize=16)
def _cpu_int4_layout(n: int, k: int) -> torch.Tensor | None:
    """For each nibble of torch's CPU int4 packing of an (n, k) weight, the flat index of the element it holds.

    Found from the packing itself, not assumed: pack the elements' own indices, one base-16 digit at a time. Used to
    read weights back (dequantize, export) without a matrix product; None if the packing is not a permutation.
    """
    if n % 64 == 0 and n > 64:  # the packing repeats every 64 rows: derive one block, tile, verify below
        one = _cpu_int4_layout(64, k)
        if one is None:
            return None
        src = (torch.arange(n // 64, dtype=torch.int64)[:, None] * (64 * k) + one[None]).reshape(-1)
    else:
        idx = torch.arange(n * k, dtype=torch.int64)
        src, shift = torch.zeros(n * k, dtype=torch.int64), 0
        while (1 << shift) < n * k:
            digit = ((idx >> shift) & 15).to(torch.int32).view(n, k)
            src |= _nibbles(torch._convert_weight_to_int4pack_for_cpu(digit, 1)).long() << shift
            shift += 4
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    back = torch.empty(n * k, dtype=torch.uint8)
    back[src] = _nibbles(torch._convert_weight_to_int4pack_for_cpu(q, 1))
    return src if torch.equal(back.view(n, k), q.to(torch.uint8)) else None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, low nibble = even k."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([p & 15, p >> 4], -1).reshape(p.shape[0], -1)


def pack_nibbles_tinygemm(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8 as torch._convert_weight_to_int4pack (CUDA) takes them: even k in the
    HIGH nibble, the opposite of the portable pack_nibbles. The layout of torch's own reference helper,
    torch/testing/_internal/common_quantization.py `_group_quantize_tensor`: `(out[::, ::2] << 4 | out[::, 1::2])`."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def check_finite(w: torch.Tensor, name: str = "the weight") -> None:
    """A one-line error naming the tensor if it holds NaN or infinite values (quantizing it would spread them)."""
    if w.is_meta:
        return  # no values (a structure being built)
    bad = ~torch.isfinite(w.detach())
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} holds {int(bad.sum())} NaN/infinite values (first in row {row}); quantization "
                         "needs finite weights: fix or retrain the model first")


def check_device(device) -> None:
    """Quantized layers run on CPUs only: no GPU test has run, so a GPU request is a one-line error, not an
    untested path (the CUDA code below is written to torch's contracts and kept for when one does)."""
    dev = torch.device(device)
    if dev.type != "cpu":
        raise ValueError(f"int4/int8 on {dev.type} is not tested yet; use --dtype bfloat16 on GPUs "
                         f"(or --device cpu for int4/int8)")


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
        if x2.dtype != self.act_dtype:
            x2 = x2.to(self.act_dtype)
        y = self._mm(x2.contiguous())  # the kernels read x as contiguous
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y if len(shape) == 2 else y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"

    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class Int8Linear(QuantLinear):
    """int8 weights with one scale per output channel (torch._weight_int8pack_mm), or per block of 32 along K.

    Block scales (GGUF's Q8_0, the default model's token table) are kept exactly: the kernel reads a copy requantized
    to one scale per row (its only layout), while the embedding lookup, dequantize, export and the LM head's exact
    logits (model.logits.head_logits) read the blocks. Requantizing cost 1.7 points of teacher-forced top-1 agreement
    with the float32 path on the default model (0.974 vs 0.990 on 2,048 WikiText-2 tokens), so the blocks stay.
    """
    method = "int8"
    BLOCK = 32

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias=None):
        """qweight (N, K) int8; scales (N,) per row or (N, K / 32) per block: w = scales * q."""
        check_device(qweight.device)
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.act_dtype = default_act_dtype(qweight.device.type)
        blocks = scales.dim() == 2
        # fresh, aligned copies: tensors straight from a safetensors file may sit at any byte offset, and the
        # kernel's vector loads crash on those
        bq = qweight.to(torch.int8).clone(memory_format=torch.contiguous_format)
        self.register_buffer("bq", bq if blocks else None, persistent=False)
        self.register_buffer("bscales", scales.float().clone() if blocks else None, persistent=False)
        if blocks:
            qweight, scales = _rows_from_blocks(bq, self.bscales)
        self.register_buffer("qweight", bq if not blocks else qweight.clone(memory_format=torch.contiguous_format))
        self.register_buffer("kscales", scales.to(self.act_dtype).clone())  # the kernel wants x's dtype
        # the float32 scales, for saving and dequantizing: a folder must not depend on the kernel input dtype of the
        # process that wrote it (bf16-rounded scales in one process, float32 in the next)
        self.register_buffer("scales32", scales.float().clone(), persistent=False)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias=None):
        """Symmetric per-output-channel quantization of a float (N, K) weight."""
        check_finite(w)
        w = w.detach().float()
        scales = (w.abs().amax(1) / 127).clamp(min=1e-12)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scales, bias)

    def _mm(self, x):
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x, self.qweight, self.kscales)
        return F.linear(x, self.qweight.to(x.dtype)) * self.kscales  # CUDA: untested (see the module docstring)

    def dequantize(self) -> torch.Tensor:
        return self.exact_rows(slice(None))

    def export(self) -> dict:
        """The portable tensors a model folder stores (the exact blocks where there are blocks)."""
        if self.bq is not None:
            return {"qweight": self.bq, "scales": self.bscales}
        return {"qweight": self.qweight, "scales": self.scales32}

    def exact_rows(self, idx) -> torch.Tensor:
        """(len(idx), K) float32 weights of output rows idx, exactly as stored (no bf16 rounding, blocks kept)."""
        if self.bq is None:
            return self.qweight[idx].float() * self.scales32[idx, None]
        q = self.bq[idx].float()
        return (q.view(*q.shape[:-1], -1, self.BLOCK) * self.bscales[idx][..., None]).view(q.shape)

    @property
    def kernel_step(self):
        """Where the kernel reads weights requantized from blocks: its per-row step (each weight within half of it
        from the exact one), or None (model.logits.head_logits widens its bound by it)."""
        return None if self.bq is None else self.scales32

    def set_act_dtype(self, dtype):
        self.act_dtype, self.kscales = dtype, self.scales32.to(dtype)


def _rows_from_blocks(q: torch.Tensor, d: torch.Tensor, chunk: int = 4096):
    """int8 blocks of 32 with scales d (N, K/32) -> (q8 (N, K), one scale per row), rounding to the nearest.

    A few thousand rows at a time (a whole table in float32 would be a large transient); largest |q| in integers,
    the rest in place: 3x faster than float copies, the same numbers."""
    n, k = q.shape
    q8, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
    for s in range(0, n, chunk):
        qi = q[s:s + chunk].view(-1, k // Int8Linear.BLOCK, Int8Linear.BLOCK)
        db = d[s:s + chunk]
        w_abs = (qi.to(torch.int16).abs_().amax(-1).float() * db.abs()).amax(-1)  # largest |weight| (-128 too)
        scales[s:s + chunk] = sc = (w_abs / 127).clamp(min=1e-12)
        q8[s:s + chunk] = qi.float().mul_((db / sc[:, None])[..., None]).round_().clamp_(-127, 127).view(-1, k)
    return q8, scales


class Int4Linear(QuantLinear):
    """int4 weights in groups along K with a scale and a zero point each (torch's tinygemm convention)."""
    method = "int4"

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bias=None,
                 keep_portable: bool = False):
        """q: (N, K) integers 0..15; scales, zeros: (N, K / group_size); w = scales * (q - 8) + zeros.

        keep_portable: also keep the portable tensors (for saving soon after, without reading the kernel's layout).
        """
        check_device(q.device)
        n, k = q.shape
        why = int4_fits(n, k, group_size)
        if why or group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 kernel cannot take this layer: {why or f'group size {group_size}'}")
        super().__init__(k, n, bias)
        self.group_size = group_size
        dev = q.device
        self.act_dtype = default_act_dtype(dev.type)
        if dev.type == "cpu":
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        else:  # CUDA tinygemm layout: untested, unreachable (check_device). Inner k-tiles: the kernel needs K to be a
            # multiple of 16 * tiles (8 would refuse K = 576); even k in the high nibble (pack_nibbles_tinygemm)
            tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
            self.register_buffer("packed", torch._convert_weight_to_int4pack(pack_nibbles_tinygemm(q), tiles))
        if keep_portable:
            self.__dict__["_portable"] = {"qweight": pack_nibbles(q), "scales": scales.float(), "zeros": zeros.float()}
        # (K / group, N, 2): scale and zero interleaved, as the kernel reads them, in the kernel's input dtype
        sz = torch.stack([scales.float().T, zeros.float().T], -1).contiguous()
        self.register_buffer("sz", sz.to(self.act_dtype))
        # the exact ones, for saving and dequantizing while the kernel reads bf16-rounded ones (as Int8Linear's
        # scales32): a folder must not depend on the kernel input dtype of the process that wrote it
        self.register_buffer("sz_exact", None if self.act_dtype == torch.float32 else _compact(sz), persistent=False)

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int, bias=None, keep_portable: bool = False):
        """Asymmetric min/max quantization of a float (N, K) weight in groups of group_size along K."""
        check_finite(w)
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
        """(N, K) uint8 values 0..15, read back out of the kernel's layout."""
        if "_portable" in self.__dict__:
            return unpack_nibbles(self._portable["qweight"])
        n, k = self.out_features, self.in_features
        if self.packed.device.type == "cpu":
            src = _cpu_int4_layout(n, k)
            if src is not None:
                q = torch.empty(n * k, dtype=torch.uint8)
                q[src] = _nibbles(self.packed)
                return q.view(n, k)
        dt = self.act_dtype  # multiplying with the identity: 0..15 are exact in bf16
        ones = torch.zeros(k // self.group_size, n, 2, dtype=dt, device=self.packed.device)
        ones[..., 0], ones[..., 1] = 1, 8  # scale 1, zero 8: w = q
        eye = torch.eye(k, dtype=dt, device=self.packed.device)
        if self.packed.device.type == "cpu":
            q = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, ones)
        else:
            q = torch._weight_int4pack_mm(eye.bfloat16(), self.packed, self.group_size, ones.bfloat16())
        return q.T.round().to(torch.uint8)

    def exact_sz(self) -> torch.Tensor:
        """(K / group, N, 2) float32 scales and zeros, never the bf16-rounded kernel copy."""
        return self.sz if self.sz_exact is None else self.sz_exact.float()

    def dequantize(self) -> torch.Tensor:
        s, z = self.exact_sz().unbind(-1)  # (G, N)
        q = self.unpacked().float().view(self.out_features, -1, self.group_size)
        return ((q - 8) * s.T[..., None] + z.T[..., None]).view(self.out_features, self.in_features)

    def export(self) -> dict:
        if "_portable" in self.__dict__:
            return dict(self._portable)
        s, z = self.exact_sz().unbind(-1)
        return {"qweight": pack_nibbles(self.unpacked()), "scales": s.T.contiguous(), "zeros": z.T.contiguous()}

    def exact_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), K) float32 weights of output rows idx; the first call keeps the nibbles (N * K / 2 bytes)."""
        if "_nibbles" not in self.__dict__:  # the kernel's layout has no row access; an LM head asks row by row
            self.__dict__["_nibbles"] = pack_nibbles(self.unpacked())
        q = unpack_nibbles(self.__dict__["_nibbles"][idx]).float().view(len(idx), -1, self.group_size)
        s, z = self.exact_sz()[:, idx].unbind(-1)  # (G, n)
        return ((q - 8) * s.T[..., None] + z.T[..., None]).view(len(idx), self.in_features)

    def set_act_dtype(self, dtype):
        exact = self.exact_sz()
        self.act_dtype, self.sz = dtype, exact.to(dtype)
        self.sz_exact = None if dtype == torch.float32 else _compact(exact)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """float32 t stored as float16 where that is exact: GGUF Q4_0/Q4_1 scales and zeros are float16 numbers (118 of
    the default model's 120 int4 layers), 12.6 MB less than float32 copies."""
    half = t.half()
    return half if torch.equal(half.float(), t) else t


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
        return self.table.exact_rows(ids)


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
    check_device(next(model.parameters()).device)
    if is_quantized(model):
        raise ValueError("this model is already quantized; quantize its float original instead")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    skip = set(skip)
    unknown = skip - {n for n, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"--skip names no layer of this model: {', '.join(sorted(unknown))}")
    names = linear_names(model)
    for n in names:  # one NaN/inf would make its whole int8 row or int4 group's scale, and so every weight, NaN
        if n not in skip:
            check_finite(model.get_submodule(n).weight, f"{n}.weight")
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
    done = {}  # a fused layer's weight, once for all its row slices
    with torch.no_grad():
        for name, m in list(model.named_modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, (QuantLinear, RowSlice)):
                    t = child if isinstance(child, QuantLinear) else child.fused
                    w = done[id(t)] if id(t) in done else done.setdefault(id(t), t.dequantize())
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
