"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT) and structured pruning that shrinks the config.

Unstructured / N:M (`prune_unstructured`): every linear layer of the Transformer blocks (q, k, v, o, gate, up, down;
never embeddings, norms or heads) loses `sparsity` of its weights, layer by layer as the papers do:
- magnitude: the smallest |W| of each matrix;
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score |W_ij| * ||X_j||_2, compared
  within each output row, X the layer's inputs on calibration text;
- SparseGPT (Frantar & Alistarh 2023): per matrix, the Hessian H = 2 X^T X of its inputs drives an OBS-style
  column-by-column prune-and-update in blocks of 128 columns; the mask is chosen per block by w^2 / [H^-1]_jj^2.
Wanda and SparseGPT run the calibration samples through block 0, prune it, run the samples through the pruned
block to get block 1's inputs, and so on. With an N:M pattern every group of M consecutive weights of a row (along
the input dimension) keeps exactly N. Masks are exact: each matrix (or row, for Wanda) loses round(sparsity * size).

Structured (`prune_structured`): whole attention heads (whole GQA groups: a key/value head with its query heads),
MLP channels or blocks are removed, ranked by activations on calibration text (Minitron-style: the L2 norm of a
head's / channel's output; for blocks, ShortGPT's block influence 1 - cos(input, output)). The result is a smaller
ModelConfig and a model folder that transformers loads.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer

METHODS = ("magnitude", "wanda", "sparsegpt")
TARGETS = ("heads", "mlp", "layers")
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
    from llmkit.eval.evaluate import read_text

    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"--calib-samples must be >= 1 and --calib-seq-len >= 2, got {n_samples}, {seq_len}")
    ids = tok.encode(read_text(path), add_special_tokens=False)
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
def block_inputs(model: Transformer, samples: torch.Tensor, batch_size: int = 8) -> tuple[list, tuple]:
    """The hidden states entering block 0 for each batch of samples, and the (rope, mask) the blocks receive."""
    captured, extra = [], []

    def grab(_module, args):
        captured.append(args[0])
        extra[:] = [args[1], args[2]]
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
    return captured, tuple(extra)


class _TapLinear(nn.Linear):
    """An nn.Linear whose call goes through nn.Module (so forward hooks run); the model's fast path skips them."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _Taps:
    """Forward hooks on a block's linears, handing each one's input (tokens, in_features) to a callback."""

    def __init__(self, layer: nn.Module, names, fn):
        self.mods = {n: layer.get_submodule(n) for n in names}
        self.handles = []
        for n, m in self.mods.items():
            m.__class__ = _TapLinear
            hook = lambda mod, a, out, n=n: fn(n, a[0].reshape(-1, a[0].shape[-1]))  # noqa: E731
            self.handles.append(m.register_forward_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()
        for m in self.mods.values():
            m.__class__ = nn.Linear


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
    xs, (rope, mask) = block_inputs(model, samples, batch_size)
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

        taps = _Taps(layer, names, record)
        try:
            for x in xs:
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
        xs = [layer(x, rope, mask, None, None) for x in xs]  # the pruned block's outputs feed the next block
    return sparsity_of(model)


def _has(layer, name) -> bool:
    try:
        layer.get_submodule(name)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# structured


@torch.no_grad()
def importance(model: Transformer, samples: torch.Tensor, batch_size: int = 8) -> dict:
    """Activation importances on calibration samples: per layer, each KV group's and MLP channel's L2 output norm,
    and each block's influence 1 - cos(input, output) (ShortGPT)."""
    cfg = model.config
    L, hd, g = cfg.n_layer, cfg.head_dim, cfg.n_head // cfg.n_kv_head
    heads = torch.zeros(L, cfg.n_kv_head)
    channels = torch.zeros(L, cfg.intermediate_size)
    influence = torch.zeros(L)
    n_tok = 0
    xs, (rope, mask) = block_inputs(model, samples, batch_size)
    for i, layer in enumerate(model.layers):
        def record(name, x, i=i):
            x = x.float()
            if name == "self_attn.o_proj":  # (tokens, n_head * hd): the heads' outputs before mixing
                heads[i] += (x ** 2).reshape(-1, cfg.n_kv_head, g * hd).sum((0, 2))
            else:  # down_proj input: the MLP's channels
                channels[i] += (x ** 2).sum(0)

        taps = _Taps(layer, ["self_attn.o_proj", "mlp.down_proj"], record)
        try:
            outs = [layer(x, rope, mask, None, None) for x in xs]
        finally:
            taps.close()
        for x, y in zip(xs, outs):
            influence[i] += (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).sum()
        xs = outs
    n_tok = sum(x.shape[0] * x.shape[1] for x in xs)
    return {"heads": heads.sqrt(), "channels": channels.sqrt(), "layers": influence / n_tok}


def _count(ratio: float, total: int, what: str) -> int:
    n = round(ratio * total)
    if n <= 0:
        raise ValueError(f"--ratio {ratio} removes none of the {total} {what}; use a larger ratio")
    if n >= total:
        raise ValueError(f"--ratio {ratio} would remove every one of the {total} {what}; use a smaller ratio")
    return n


def plan_structured(cfg: ModelConfig, targets: list[str], ratio: float) -> dict:
    """How many KV groups / channels / blocks each target removes (validated: never all, never none)."""
    if not 0 < ratio < 1:
        raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"--target must be one or more of {', '.join(TARGETS)} (comma-separated), not {bad or ''}")
    plan = {}
    if "heads" in targets:
        if cfg.family != "llama":
            raise ValueError(f"--target heads: a {cfg.family} config derives head_dim from n_embd / n_head, so a "
                             "model with fewer heads is not a valid config for transformers; prune mlp or layers")
        what = "key/value head groups" if cfg.n_kv_head < cfg.n_head else "attention heads"
        plan["heads"] = _count(ratio, cfg.n_kv_head, what)
    if "mlp" in targets:
        plan["mlp"] = _count(ratio, cfg.intermediate_size, "MLP channels")
    if "layers" in targets:
        plan["layers"] = _count(ratio, cfg.n_layer, "layers")
    return plan


@torch.no_grad()
def prune_structured(model: Transformer, plan: dict, samples: torch.Tensor, batch_size: int = 8) -> Transformer:
    """A new, smaller Transformer: the plan's least important KV groups, MLP channels and blocks removed."""
    from llmkit.model.checkpoint import build_model

    cfg = model.config
    imp = importance(model, samples, batch_size)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = list(range(cfg.n_layer))
    new = {}
    if "layers" in plan:
        drop = set(imp["layers"].argsort()[:plan["layers"]].tolist())
        layers = [i for i in layers if i not in drop]
        new["n_layer"] = len(layers)
    hd, g = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    if "heads" in plan:
        new.update(n_kv_head=cfg.n_kv_head - plan["heads"], n_head=(cfg.n_kv_head - plan["heads"]) * g)
    if "mlp" in plan:
        new["intermediate_size"] = cfg.intermediate_size - plan["mlp"]
    out = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    for j, i in enumerate(layers):
        p = {k.removeprefix(f"layers.{i}."): v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        if "heads" in plan:
            keep = imp["heads"][i].argsort(descending=True)[:new["n_kv_head"]].sort().values
            kv_rows = (keep[:, None] * hd + torch.arange(hd)).flatten()
            q_rows = ((keep[:, None] * g + torch.arange(g))[:, :, None] * hd + torch.arange(hd)).flatten()
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                p[f"self_attn.{name}.weight"] = p[f"self_attn.{name}.weight"][rows]
                if f"self_attn.{name}.bias" in p:
                    p[f"self_attn.{name}.bias"] = p[f"self_attn.{name}.bias"][rows]
            p["self_attn.o_proj.weight"] = p["self_attn.o_proj.weight"][:, q_rows]
        if "mlp" in plan:
            keep = imp["channels"][i].argsort(descending=True)[:new["intermediate_size"]].sort().values
            for name in ("gate_proj", "up_proj"):
                if f"mlp.{name}.weight" in p:
                    p[f"mlp.{name}.weight"] = p[f"mlp.{name}.weight"][keep]
                    if f"mlp.{name}.bias" in p:
                        p[f"mlp.{name}.bias"] = p[f"mlp.{name}.bias"][keep]
            p["mlp.down_proj.weight"] = p["mlp.down_proj.weight"][:, keep]
        out.update({f"layers.{j}.{k}": v.contiguous() for k, v in p.items()})
    small = cfg.replace(**new, head_dim=cfg.head_dim)
    return build_model(small, out, dtype=next(model.parameters()).dtype)


def non_embedding_params(model: Transformer) -> int:
    """Parameters outside the token/position embeddings and the LM head."""
    skip = ("embed_tokens.", "embed_positions.", "embed_types.", "lm_head.")
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


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


# ---------------------------------------------------------------------------------------------------------------
# the recipe: load, check everything, prune, optionally recover, save, report


@dataclass
class PruneConfig:
    model: str
    out: str
    method: str = "magnitude"  # magnitude | wanda | sparsegpt | structured
    sparsity: float | None = None  # unstructured: required; N:M: implied (1 - N/M)
    pattern: str = "unstructured"  # unstructured | N:M
    target: str = "mlp"  # structured: comma-separated heads, mlp, layers
    ratio: float = 0.25  # structured: share of KV groups / channels / blocks removed
    calib_data: str | None = None
    calib_samples: int = 128
    calib_seq_len: int = 128
    recover: int = 0  # optimizer steps of fine-tuning on calib_data afterwards (pruned weights stay zero)
    recover_method: str = "full"  # full | lora (structured only: merged into the smaller model at the end)
    recover_lr: float = 5e-5
    recover_batch_size: int = 4
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    report: bool = True
    report_kwargs: dict = field(default_factory=dict)


def _check_out(out):
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new one")


def _recovery_examples(tok, path, seq_len: int, batch_size: int):
    from llmkit.eval.evaluate import read_text

    ids = tok.encode(read_text(path), add_special_tokens=False)
    blocks = [ids[s:s + seq_len + 1] for s in range(0, len(ids) - seq_len, seq_len)]
    ex = [{"input_ids": b[:-1], "labels": b[1:]} for b in blocks]
    n_val = max(1, len(ex) // 10)
    if len(ex) - n_val < batch_size:
        raise ValueError(f"{path}: --recover needs at least {batch_size + 1} blocks of {seq_len} tokens of "
                         f"calibration text, it holds {len(ex)}; give more text or a smaller --recover-batch-size")
    return ex[n_val:], ex[:n_val]


def prune_model(pc: PruneConfig) -> dict:
    """Prune pc.model into pc.out (a model folder), recover if asked, and write the before/after report."""
    from llmkit.model.checkpoint import load_model, save_model
    from llmkit.utils.io import write_json
    from llmkit.compress.report import storage_dtype

    t0 = time.time()
    if pc.method not in METHODS + ("structured",):
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, structured; not {pc.method!r}")
    structured = pc.method == "structured"
    nm = None if structured else parse_pattern(pc.pattern)
    if not structured:
        if nm is None and pc.sparsity is None:
            raise ValueError("--sparsity is required for unstructured pruning (e.g. --sparsity 0.5)")
        if pc.sparsity is not None and not 0 < pc.sparsity < 1:
            raise ValueError(f"--sparsity must be in (0, 1), got {pc.sparsity}")
        if nm is not None and pc.sparsity is not None and abs(pc.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"--pattern {pc.pattern} means sparsity {1 - nm[0] / nm[1]:g}; drop --sparsity "
                             f"{pc.sparsity} or make it match")
    if pc.recover < 0:
        raise ValueError(f"--recover must be >= 0 steps, got {pc.recover}")
    if pc.recover_method not in ("full", "lora"):
        raise ValueError(f"--recover-method must be full or lora, not {pc.recover_method!r}")
    if pc.recover and pc.recover_method == "lora" and not structured:
        raise ValueError("--recover-method lora is for structured pruning: a merged LoRA update is dense and would "
                         "undo the sparsity; use --recover-method full (pruned weights stay zero)")
    needs_calib = structured or pc.method in ("wanda", "sparsegpt") or pc.recover > 0
    if needs_calib and not pc.calib_data:
        raise ValueError(f"--method {pc.method}{' with --recover' if pc.recover else ''} needs calibration text: "
                         "pass --calib-data FILE")
    if pc.calib_data and not Path(pc.calib_data).is_file():
        raise FileNotFoundError(f"calibration data not found: {pc.calib_data}")
    _check_out(pc.out)
    lm = load_model(pc.model, dtype="float32", device=pc.device)
    model, tok, cfg = lm.model, lm.tokenizer, lm.model.config
    plan = plan_structured(cfg, [t.strip() for t in pc.target.split(",") if t.strip()], pc.ratio) \
        if structured else None
    if not structured:
        check_pattern(model, nm)
    if needs_calib and tok is None:
        raise ValueError(f"{pc.model} has no tokenizer, so calibration text cannot be read")
    if pc.recover and not cfg.causal:
        raise ValueError("--recover fine-tunes with next-token loss: it needs a causal LM, not an encoder")
    samples = calibration_samples(tok, pc.calib_data, pc.calib_samples, pc.calib_seq_len, pc.seed) \
        if needs_calib and pc.method != "magnitude" else None
    rec = _recovery_examples(tok, pc.calib_data, pc.calib_seq_len, pc.recover_batch_size) if pc.recover else None
    if samples is not None:
        samples = samples.to(pc.device)

    # ---- prune
    info = {"model": pc.model, "method": pc.method, "calib_data": pc.calib_data,
            "calib_samples": 0 if samples is None else len(samples), "calib_seq_len": pc.calib_seq_len}
    before = {"params": model.num_params(), "non_embedding_params": non_embedding_params(model)}
    if structured:
        model = prune_structured(model, plan, samples)
        info.update(target=pc.target, ratio=pc.ratio, removed=plan,
                    config_before={k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_kv_head", "intermediate_size")},
                    config_after={k: getattr(model.config, k)
                                  for k in ("n_layer", "n_head", "n_kv_head", "intermediate_size")})
    else:
        per = prune_unstructured(model, pc.method, pc.sparsity if nm is None else 1 - nm[0] / nm[1], nm, samples,
                                 progress=pc.progress)
        info.update(pattern=pc.pattern, sparsity=pc.sparsity if nm is None else 1 - nm[0] / nm[1], per_matrix=per)
    info["params_before"], info["params_after"] = before, {"params": model.num_params(),
                                                         "non_embedding_params": non_embedding_params(model)}
    info["prune_seconds"] = time.time() - t0
    print(f"pruned in {info['prune_seconds']:.1f} s", file=sys.stderr)

    # ---- recover (the shared training loop writes checkpoints/, metrics.jsonl, loss.png and the model into out)
    if pc.recover:
        result = _recover(model, lm, rec, pc, keep_zeros=not structured)
        info["recovery"] = {"steps": pc.recover, "method": pc.recover_method, "lr": pc.recover_lr,
                            **{k: result.get(k) for k in ("train_loss", "val_loss", "val_ppl")}}
    else:
        save_model(pc.out, model, tok, lm.generation_config, dtype=storage_dtype(pc.model))
    info["run_seconds"] = time.time() - t0
    write_json(Path(pc.out) / "prune_config.json", info)
    if pc.report:
        info["report"] = str(_report(pc, info, nm, structured))
    return info


def _recover(model, lm, rec, pc: PruneConfig, keep_zeros: bool) -> dict:
    from llmkit.model.checkpoint import save_model
    from llmkit.compress.report import storage_dtype
    from llmkit.train.finetune import ExampleLoader, _pad_id
    from llmkit.train.pretrain import clm_loss
    from llmkit.train.loop import TrainConfig, train

    handles = []
    if keep_zeros:  # zero gradients keep pruned weights at exactly zero under AdamW (decay scales zero to zero)
        for _, lin in block_linears(model):
            mask = (lin.weight != 0).to(lin.weight.dtype)
            handles.append(lin.weight.register_hook(lambda g, m=mask: g * m))
    if pc.recover_method == "lora":  # adapters on every linear of every block; merged back before saving
        from llmkit.model import lora as lora_lib

        for q in model.parameters():
            q.requires_grad_(False)
        lora_lib.inject_lora(model, lora_lib.LoRAConfig(r=16, alpha=32.0, dropout=0.0, targets=["all"]))
    pad = _pad_id(lm.tokenizer, model.config)
    tr, va = ExampleLoader(rec[0], pc.recover_batch_size, pad, seed=pc.seed), \
        ExampleLoader(rec[1], pc.recover_batch_size, pad, shuffle=False)
    tc = TrainConfig(max_steps=pc.recover, lr=pc.recover_lr, warmup_steps=max(1, pc.recover // 10), weight_decay=0.0,
                     eval_every=0, eval_steps=min(len(va), 20), log_every=max(1, pc.recover // 20), seed=pc.seed,
                     device=pc.device, out=pc.out, progress=pc.progress)
    model.train()

    def save_fn(d, m):
        if pc.recover_method == "lora":  # a plain (smaller) model folder: the adapters merged into a copy
            import copy

            from llmkit.model.lora import merge_lora

            m = merge_lora(copy.deepcopy(m))
        save_model(d, m, lm.tokenizer, lm.generation_config, dtype=dtype)

    try:
        dtype = storage_dtype(pc.model) if pc.model else None
        return train(model, tr, clm_loss, tc, val_data=va, save_fn=save_fn,
                     run_config={"prune": {k: v for k, v in pc.__dict__.items() if k != "report_kwargs"}})
    finally:
        for h in handles:
            h.remove()
        model.eval()


def _report(pc: PruneConfig, info: dict, nm, structured: bool) -> Path:
    from llmkit.compress import report as cr

    rows = [cr.measure(pc.model, name="before", **pc.report_kwargs),
            cr.measure(pc.out, name=f"{pc.method}" + (f" {pc.pattern}" if not structured else f" {pc.target}")
                       + (f" +recover {pc.recover}" + (" lora" if pc.recover_method == "lora" else "")
                          if pc.recover else ""),
                       run_seconds=info["run_seconds"], **pc.report_kwargs)]
    notes = []
    if not structured:
        notes.append("sparse weights are stored plainly (dense safetensors): the file, the memory and the decode "
                     "speed stay those of the dense model; only the non-zero count falls")
        if nm is not None:
            notes.append(semi_structured_support())
    else:
        a, b = info["config_before"], info["config_after"]
        notes.append("structured pruning shrinks the config: " +
                     ", ".join(f"{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]))
    print(cr.render(rows, notes))
    return cr.write_report(pc.out, rows, notes)
