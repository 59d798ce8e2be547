"""Pruning: the `llmkit prune` recipe (load, check everything, prune, optionally recover, save, report), and
structured pruning that shrinks the config. Unstructured and N:M sparsity (magnitude, Wanda, SparseGPT) is
sparsity.py's `prune_unstructured`.

Structured (`prune_structured`): whole attention heads (whole GQA groups: a key/value head with its query heads),
MLP channels or blocks are removed, ranked by activations on calibration text (Minitron-style: the L2 norm of a
head's / channel's output; for blocks, ShortGPT's block influence 1 - cos(input, output)). The result is a smaller
ModelConfig and a model folder that transformers loads.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit.compress import report as cr
from llmkit.compress.report import non_embedding_params, storage_dtype
from llmkit.compress.sparsity import (METHODS, Taps, block_inputs, block_linears, calibration_samples, check_pattern,
                                      parse_pattern, prune_unstructured, semi_structured_support)
from llmkit.data.sft import ExampleLoader
from llmkit.infer.classify import pad_id_for
from llmkit.model import lora as lora_lib
from llmkit.model.checkpoint import build_model, load_model, save_model
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import Transformer
from llmkit.train.loop import TrainConfig, train
from llmkit.train.losses import clm_loss
from llmkit.utils.io import read_utf8, write_json

TARGETS = ("heads", "mlp", "layers")


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
    xs, args = block_inputs(model, samples, batch_size)
    for i, layer in enumerate(model.layers):
        def record(name, x, i=i):
            x = x.float()
            if name == "self_attn.o_proj":  # (tokens, n_head * hd): the heads' outputs before mixing
                heads[i] += (x ** 2).reshape(-1, cfg.n_kv_head, g * hd).sum((0, 2))
            else:  # down_proj input: the MLP's channels
                channels[i] += (x ** 2).sum(0)

        taps = Taps(layer, ["self_attn.o_proj", "mlp.down_proj"], record)
        try:
            outs = [layer(x, rope, mask, None, None) for x, (rope, mask) in zip(xs, args)]
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
    ids = tok.encode(read_utf8(path), add_special_tokens=False)
    blocks = [ids[s:s + seq_len + 1] for s in range(0, len(ids) - seq_len, seq_len)]
    ex = [{"input_ids": b[:-1], "labels": b[1:]} for b in blocks]
    n_val = max(1, len(ex) // 10)
    if len(ex) - n_val < batch_size:
        raise ValueError(f"{path}: --recover needs at least {batch_size + 1} blocks of {seq_len} tokens of "
                         f"calibration text, it holds {len(ex)}; give more text or a smaller --recover-batch-size")
    return ex[n_val:], ex[:n_val]


def prune_model(pc: PruneConfig) -> dict:
    """Prune pc.model into pc.out (a model folder), recover if asked, and write the before/after report."""
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
    handles = []
    if keep_zeros:  # zero gradients keep pruned weights at exactly zero under AdamW (decay scales zero to zero)
        for _, lin in block_linears(model):
            mask = (lin.weight != 0).to(lin.weight.dtype)
            handles.append(lin.weight.register_hook(lambda g, m=mask: g * m))
    if pc.recover_method == "lora":  # adapters on every linear of every block; merged back before saving
        for q in model.parameters():
            q.requires_grad_(False)
        torch.manual_seed(pc.seed)  # the adapters' init: one seed, one run (issue 26)
        lora_lib.inject_lora(model, lora_lib.LoRAConfig(r=16, alpha=32.0, dropout=0.0, targets=["all"]))
    pad = pad_id_for(lm.tokenizer, model.config)
    tr, va = ExampleLoader(rec[0], pc.recover_batch_size, pad, seed=pc.seed), \
        ExampleLoader(rec[1], pc.recover_batch_size, pad, shuffle=False)
    tc = TrainConfig(max_steps=pc.recover, lr=pc.recover_lr, warmup_steps=max(1, pc.recover // 10), weight_decay=0.0,
                     eval_every=0, eval_steps=min(len(va), 20), log_every=max(1, pc.recover // 20), seed=pc.seed,
                     device=pc.device, out=pc.out, progress=pc.progress)
    model.train()

    def save_fn(d, m):
        if pc.recover_method == "lora":  # a plain (smaller) model folder: the adapters merged into a copy
            m = lora_lib.merge_lora(copy.deepcopy(m))
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
