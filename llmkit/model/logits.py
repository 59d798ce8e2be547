"""Float32 LM-head logits on every path (issue 20): the fast kernels' shortlist, the top logits recomputed exactly."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model.linear import fused_linear, linear, rows_alone

# ---------------------------------------------------------------------------------------------------------------
# Float32 logits
#
# Fast heads round: a bf16 weight's GEMV and the quantized kernels fed bf16 activations return bf16 outputs, whose
# resolution near a logit of 25 is 0.125, so greedy decoding would take the lower token id at every near-tie and
# sampling would see coarse probabilities. The LM head therefore always returns float32 logits: for a few rows, the
# fast kernel gives every logit to within a bound, and each logit that could lie within HEAD_MARGIN of its row's best
# is computed again exactly (float32 weights as stored, float32 activations, float32 sums); for many rows (scoring a
# prompt) the whole head runs in float32, a block of rows at a time. See docs/library/numerics.md.

HEAD_MARGIN = 4.0  # logits that may lie within this of their row's best are exact (e^-4: 1.8 % of its probability)
HEAD_CAP = 1024  # at most this many exact logits per row (the best ones by upper bound: the argmax is always exact)
EXACT_HEAD_ROWS = 16  # more rows than this: the whole head in float32 (the fast kernel's saving is small there)
ROUNDING = 2.0 ** -8  # twice bf16's unit roundoff: per input element and for the rounded output (and scales)


def head_logits(head: nn.Module, x: torch.Tensor, margin: float = HEAD_MARGIN) -> torch.Tensor:
    """Float32 logits (..., V) of an LM head on hidden states x (..., K), on every path (see above).

    margin: logits that may lie within it of their row's best are exact. 0 keeps only the argmax exact (and every
    logit that could be it): enough for a plain greedy pick, which reads nothing else (the decode core passes it for
    rows with no penalties, processors or logprobs)."""
    if type(head) is nn.Linear and head.weight.dtype == torch.float32 and x.dtype == torch.float32:
        return fused_linear(x, head.weight, head.bias)  # already float32 from end to end
    if torch.is_grad_enabled() and type(head) is nn.Linear:
        return F.linear(x.float(), head.weight.float(), None if head.bias is None else head.bias.float())
    rows_of = head.exact_rows if hasattr(head, "exact_rows") else _dense_rows(head)
    shape, x2 = x.shape, x.reshape(-1, x.shape[-1]).float()
    alone = rows_alone()  # speculative verification: each row exactly as alone (the kernels are row-invariant)
    if len(x2) > EXACT_HEAD_ROWS and not alone:
        y = _exact_head(rows_of, head.bias, x2, head.out_features)
    else:
        y = linear(head, x).reshape(len(x2), -1).float()
        if getattr(head, "act_dtype", None) != torch.float32 or x.dtype != torch.float32:  # the fast path rounded
            for s in range(len(y)) if alone else [None]:
                if s is None:
                    _refine(y, x2, rows_of, head, margin)
                else:
                    _refine(y[s:s + 1], x2[s:s + 1], rows_of, head, margin)
    return y.reshape(*shape[:-1], -1)


def _dense_rows(lin: nn.Linear):
    return lambda idx: lin.weight[idx].float()


def _exact_head(rows_of, bias, x, n_out, block: int = 4096) -> torch.Tensor:
    y = torch.empty(len(x), n_out, device=x.device)
    for s in range(0, n_out, block):
        idx = torch.arange(s, min(s + block, n_out), device=x.device)
        torch.matmul(x, rows_of(idx).T, out=y[:, s:s + len(idx)])
    return y if bias is None else y.add_(bias.float())


def _row_norms(head, rows_of, device) -> torch.Tensor:
    """2^-8 ||w_n||_2 of every output row, computed once per head and weight version (kept on the module, not in its
    state; a dense head trained since is measured again)."""
    version = getattr(getattr(head, "weight", None), "_version", None)
    cached = head.__dict__.get("_row_norms")
    if cached is None or cached[0] != version:
        n = head.out_features
        norms = torch.cat([rows_of(torch.arange(s, min(s + 4096, n), device=device)).norm(dim=1)
                           for s in range(0, n, 4096)]) * ROUNDING
        cached = head.__dict__["_row_norms"] = (version, norms)
    return cached[1]


def _refine(y, x, rows_of, head, margin: float = HEAD_MARGIN):
    """Recompute exactly, in place, every logit of y (M, V) that may lie within margin of its row's best.

    The fast path rounds each input to bf16, may round the scales, and rounds the output: |error| <= 2^-8 (||w_n||
    ||x|| + |y_n|) with a factor of two to spare (Cauchy-Schwarz on the inputs' rounding), plus, where the kernel
    reads weights requantized from blocks (Int8Linear.kernel_step), half a step per weight: step_n / 2 ||x||_1.
    Measured errors stay under 0.21 of this bound on the default model. A logit whose upper bound is below the best
    lower bound minus the margin cannot be within the margin, so it keeps the fast value.
    """
    bound = y.abs().mul_(ROUNDING).addcmul_(_row_norms(head, rows_of, x.device)[None], x.norm(dim=1, keepdim=True))
    step = getattr(head, "kernel_step", None)
    if step is not None:
        bound.addcmul_(step[None], x.abs().sum(1, keepdim=True), value=0.5)
    upper = y + bound
    floor = (y - bound).amax(1, keepdim=True)
    near = upper >= floor - margin
    n = int(near.sum(1).max())
    if len(y) == 1 and n <= HEAD_CAP:
        cand = near[0].nonzero().T  # (1, n)
    else:  # the k highest upper bounds of each row hold every logit within the margin (capped; the argmax always)
        n_tie = int((upper >= floor).sum(1).max())
        cand = upper.topk(min(max(min(n, HEAD_CAP), n_tie), y.shape[1]), dim=1).indices  # (M, k)
    w = rows_of(cand.reshape(-1)).view(*cand.shape, -1)  # (M, k, K)
    exact = torch.bmm(w, x[:, :, None])[..., 0]
    if head.bias is not None:
        exact = exact + head.bias.float()[cand]
    y.scatter_(1, cand, exact)
