"""Decode-time linear products: the split-bmm path for a few rows, fused q/k/v and gate/up buffers, and bf16 weights
under float32 activations on a CPU."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# Decode-time matrix-vector products
#
# On CPUs, torch's float32 matrix-vector path (a decode step has 1-16 rows) reads weights at about a third of the
# memory bandwidth and uses one core. Splitting the weight's rows in two halves and running them as a 2-batch bmm
# uses both halves of the machine and about doubles the rate; fusing q/k/v and gate/up into one buffer each halves
# the number of calls.
#
# bfloat16/float16 weights on a CPU are a storage format: activations stay float32 (CPUs without native bf16 math
# emulate it op by op, slowly). One row (batch-1 decode) goes through torch's reduced-precision GEMV, which reads
# half the bytes and accumulates in float32; more rows upcast the weight and run a float32 GEMM.
# benchmarks/generate_speed.py measures both against transformers.

SMALL_M = 16  # rows (batch x new tokens) up to which the bmm path is used
LOW_PRECISION = (torch.bfloat16, torch.float16)
LOW_PRECISION_GEMV_ROWS = 2  # rows up to which low-precision weights take the GEMV path


_ROWS = threading.local()  # .alone: products compute each row as its own one-row call (one_row_products)


@contextmanager
def one_row_products():
    """Within it, on this thread, dense products compute every row exactly as a call with that row alone would (and
    head_logits refines each row alone): speculative decoding verifies k tokens in one forward whose numbers must equal
    k one-token steps'. torch's dense kernels may sum in another order for another row count; the int4/int8 kernels
    do not (tested), so quantized layers keep their one call."""
    before = getattr(_ROWS, "alone", False)
    _ROWS.alone = True
    try:
        yield
    finally:
        _ROWS.alone = before


def rows_alone() -> bool:
    return getattr(_ROWS, "alone", False)


def fused_linear(x, w, b=None):
    """x (..., K) @ w(N, K).T (+ b), taking the split-bmm path for a few rows."""
    m = x.numel() // x.shape[-1]
    if m > 1 and rows_alone():
        rows = x.reshape(m, x.shape[-1])
        return torch.cat([fused_linear(rows[i:i + 1], w, b) for i in range(m)]).reshape(*x.shape[:-1], -1)
    if w.dtype != x.dtype:  # bfloat16/float16 weights under float32 activations (CPU, see activation_dtype)
        if m <= LOW_PRECISION_GEMV_ROWS and not torch.is_grad_enabled():
            return F.linear(x.to(w.dtype), w, b).to(x.dtype)  # torch's GEMV: fp32 accumulation, half the bytes
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
    if m > SMALL_M or w.shape[0] % 2 or torch.is_grad_enabled():
        return F.linear(x, w, b)
    n, k = w.shape
    x2 = x.reshape(m, k).T.expand(2, k, m)
    y = torch.bmm(w.view(2, n // 2, k), x2).view(n, m).T
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], n)


def _fuse(linears: list[nn.Linear]):
    """One weight (and bias) buffer holding the linears' rows; their parameters' data become views of it.

    The Parameter objects stay the same (only their .data moves), so an optimizer built before the fusion still
    holds the model's parameters, and training writes into the fused buffer that decoding reads.
    """
    w = torch.cat([m.weight.detach() for m in linears])
    b = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = w[start:start + n]
        if b is not None:
            m.bias.data = b[start:start + n]
        start += n
    return w, b


def _still_fused(fused, linears) -> bool:
    # False once a parameter was replaced (model.to(), load_state_dict(assign=True), LoRA wrapping ...); the fused
    # buffer is no Parameter, so with gradients on (training) the separate layers run and gradients reach them
    if torch.is_grad_enabled():
        return False
    w = fused[0]
    return all(type(m) is nn.Linear and m.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
               for m in linears)


def linear(m, x):
    """m(x) for any linear layer, taking fused_linear's fast paths for a plain nn.Linear."""
    return fused_linear(x, m.weight, m.bias) if type(m) is nn.Linear else m(x)
