"""Unstructured and N:M sparsity (magnitude, Wanda, SparseGPT), and the calibration plumbing pruning shares.

`prune_unstructured`: every linear layer of the Transformer blocks (q, k, v, o, gate, up, down; never embeddings,
norms or heads) loses `sparsity` of its weights, layer by layer as the papers do:
- magnitude: the smallest |W| of each matrix;
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score |W_ij| * ||X_j||_2, compared
  within each output row, X the layer's inputs on calibration text;
- SparseGPT (Frantar & Alistarh 2023): per matrix, the Hessian H = 2 X^T X of its inputs drives an OBS-style
  column-by-column prune-and-update in blocks of 128 columns; the mask is chosen per block by w^2 / [H^-1]_jj^2.
Wanda and SparseGPT run the calibration samples through block 0, prune it, run the samples through the pruned
block to get block 1's inputs, and so on. With an N:M pattern every group of M consecutive weights of a row (along
the input dimension) keeps exactly N. Masks are exact: each matrix (or row, for Wanda) loses round(sparsity * size).

The calibration plumbing (calibration_samples, block_inputs, Taps) is shared with structured pruning (prune.py).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model.transformer import Transformer
from llmkit.utils.io import read_utf8

METHODS = ("magnitude", "wanda", "sparsegpt")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------------------------------------------------------
# patterns and masks


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", (N, M) for "N:M" (N kept of every M)."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"--pattern must be 'unstructured' or N:M such as 2:4, not {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"--pattern {pattern}: need 0 < N < M")
    return n, m


def block_linears(model: Transformer) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every prunable linear layer: the blocks' attention and MLP projections."""
    out = []
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            try:
                out.append((f"layers.{i}.{name}", layer.get_submodule(name)))
            except AttributeError:  # no gate_proj in GPT-2/BERT MLPs
                continue
    return out


def check_pattern(model: Transformer, nm: tuple[int, int] | None):
    """Every prunable matrix's input dimension must be a multiple of M."""
    if nm is None:
        return
    for name, lin in block_linears(model):
        if lin.in_features % nm[1]:
            raise ValueError(f"--pattern {nm[0]}:{nm[1]}: {name} has {lin.in_features} inputs, not a multiple "
                             f"of {nm[1]}")


def keep_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Boolean mask (True = keep) that drops the lowest scores: exactly round(sparsity * size) per matrix (or row),
    or M - N of every group of M consecutive entries of a row."""
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)
        drop = groups.topk(m - n, dim=-1, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return mask.reshape(rows, cols)
    if per_row:
        k = round(sparsity * cols)
        drop = score.topk(k, dim=1, largest=False).indices
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    k = round(sparsity * score.numel())
    drop = score.flatten().topk(k, largest=False).indices
    return torch.ones(score.numel(), dtype=torch.bool, device=score.device).scatter_(0, drop, False).view_as(score)


def sparsity_of(model: Transformer) -> dict[str, float]:
    """Share of zeros in every prunable matrix."""
    return {name: float((lin.weight == 0).float().mean()) for name, lin in block_linears(model)}


# ---------------------------------------------------------------------------------------------------------------
# calibration data


def calibration_samples(tok, path, n_samples: int = 128, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    """(n, seq_len) token windows drawn at random (seeded) from a text file; fewer if the text is short."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"--calib-samples must be >= 1 and --calib-seq-len >= 2, got {n_samples}, {seq_len}")
    ids = tok.encode(read_utf8(path), add_special_tokens=False)
    n_windows = len(ids) // seq_len
    if n_windows < 1:
        raise ValueError(f"{path}: calibration text is too short: {len(ids)} tokens, fewer than one sample of "
                         f"--calib-seq-len {seq_len}")
    if n_windows < n_samples:
        print(f"{path}: only {n_windows} calibration samples of {seq_len} tokens (asked for {n_samples})",
              file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(n_windows, generator=g)[:n_samples] * seq_len
    data = torch.tensor(ids, dtype=torch.long)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()])


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(model: Transformer, samples: torch.Tensor, batch_size: int = 8) -> tuple[list, list]:
    """The hidden states entering block 0 for each batch of samples, and each batch's (rope, mask) the blocks
    receive: rope's cos/sin are (batch, 1, T, dim), so the last batch (shorter when batch_size does not divide the
    sample count) needs its own."""
    captured, extra = [], []

    def grab(_module, args):
        captured.append(args[0])
        extra.append((args[1], args[2]))
        raise _Stop

    handle = model.layers[0].register_forward_pre_hook(grab)
    try:
        for s in range(0, len(samples), batch_size):
            try:
                model(samples[s:s + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured, extra


class _TapLinear(nn.Linear):
    """An nn.Linear whose call goes through nn.Module (so forward hooks run); the model's fast path skips them."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Taps:
    """Forward hooks on a block's linears, handing each one's input (tokens, in_features) to a callback.

    A plain nn.Linear becomes a _TapLinear while tapped (the model calls any other class, a LoRALinear or another
    subclass, through nn.Module already, so it keeps its class and its forward); close() gives each its own class back.
    """

    def __init__(self, layer: nn.Module, names, fn):
        self.mods = {n: layer.get_submodule(n) for n in names}
        self.classes = {n: type(m) for n, m in self.mods.items()}
        self.handles = []
        for n, m in self.mods.items():
            if type(m) is nn.Linear:
                m.__class__ = _TapLinear

            def hook(mod, a, out, n=n):  # returns None: what fn returns never replaces the layer's output
                fn(n, a[0].reshape(-1, a[0].shape[-1]))

            self.handles.append(m.register_forward_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()
        for n, m in self.mods.items():
            m.__class__ = self.classes[n]


# ---------------------------------------------------------------------------------------------------------------
# unstructured / N:M


def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                    blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) on one matrix w (rows, cols) with Hessian H (cols, cols).

    Follows the reference implementation (IST-DASLab/sparsegpt), except that an unstructured block drops exactly
    round(sparsity * block size) weights instead of those under a threshold. Returns the pruned, updated weights.
    """
    # the column loop runs thousands of tiny ops: one thread avoids the thread pool's hand-offs, which cost ~40x
    # on a busy 2-core machine (measured: 34 s -> 0.9 s for a 576 x 1536 matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sparsegpt(w, H, sparsity, nm, blocksize, percdamp)
    finally:
        torch.set_num_threads(threads)


def _sparsegpt(w, H, sparsity, nm, blocksize, percdamp):
    W = w.detach().clone().float()
    H = H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        if nm is None:
            prune1 = ~keep_mask(W1 ** 2 / d[None] ** 2, sparsity, None, per_row=False)
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                tmp = W1[:, i:i + m] ** 2 / d[i:i + m][None] ** 2
                prune1.scatter_(1, i + tmp.topk(m - n, dim=1, largest=False).indices, True)
            col = W1[:, i]
            q = col.clone()
            q[prune1[:, i]] = 0
            Q1[:, i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)


@torch.no_grad()
def prune_unstructured(model: Transformer, method: str, sparsity: float, nm: tuple[int, int] | None = None,
                       samples: torch.Tensor | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """Prune every block linear in place; returns {matrix name: sparsity}. Wanda and SparseGPT need samples."""
    from tqdm import tqdm

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)} or structured, not {method!r}")
    if nm is None and not 0 < sparsity < 1:
        raise ValueError(f"--sparsity must be in (0, 1), got {sparsity}")
    check_pattern(model, nm)
    model.eval()
    if method == "magnitude":
        for _, lin in block_linears(model):
            lin.weight.mul_(keep_mask(lin.weight.abs().float(), sparsity, nm, per_row=False))
        return sparsity_of(model)
    if samples is None:
        raise ValueError(f"--method {method} needs calibration text: pass --calib-data FILE")
    xs, args = block_inputs(model, samples, batch_size)
    for i, layer in enumerate(tqdm(model.layers, desc=f"{method} pruning", disable=not progress, file=sys.stderr)):
        names = [n for n in LINEARS if _has(layer, n)]
        stats: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def record(name, x):
            x = x.float()
            if method == "wanda":  # running sum of squares of each input feature
                stats[name] = stats.get(name, 0) + (x ** 2).sum(0)
            else:
                stats[name] = stats.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        taps = Taps(layer, names, record)
        try:
            for x, (rope, mask) in zip(xs, args):
                layer(x, rope, mask, None, None)
        finally:
            taps.close()
        for name in names:
            lin = layer.get_submodule(name)
            if method == "wanda":
                score = lin.weight.abs().float() * stats[name].sqrt()[None]
                lin.weight.mul_(keep_mask(score, sparsity, nm, per_row=True))
            else:
                H = 2 * stats[name] / counts[name]
                lin.weight.copy_(sparsegpt_prune(lin.weight, H, sparsity, nm))
        # the pruned block's outputs feed the next block
        xs = [layer(x, rope, mask, None, None) for x, (rope, mask) in zip(xs, args)]
    return sparsity_of(model)


def _has(layer, name) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


def semi_structured_support() -> str:
    """Whether torch can turn a 2:4 matrix into its compressed (half-size) form on this machine, as a sentence."""
    try:
        from torch.sparse import to_sparse_semi_structured

        w = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(64, 16).half()
        to_sparse_semi_structured(w)
        return "torch.sparse.to_sparse_semi_structured accepts a CPU tensor here"
    except Exception as e:  # torch raises RuntimeError for CPU tensors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"2:4 weights are stored dense: torch's semi-structured sparse kernels (to_sparse_semi_structured, "
                f"cuSPARSELt/CUTLASS) run on CUDA GPUs only, and on this CPU torch says: {msg}")
