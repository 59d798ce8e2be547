"""Pretraining recipe: tokenizer -> cached token stream -> Transformer -> train.py's loop -> model folder.

Causal LM (GPT-style, next-token prediction) or masked LM (BERT-style, 15% masking). The output folder is a normal
model folder (`llmkit generate --model OUT` works) with checkpoints/, metrics.jsonl, loss.png and run_config.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkit.data.corpus import BlockLoader, split_tokens, tokenize_files
from llmkit.data.tokenizer_train import train_tokenizer
from llmkit.model.checkpoint import config_from_hf, save_model
from llmkit.model.config import PRESETS, ModelConfig, load_config
from llmkit.model.tokenizer import Tokenizer
from llmkit.model.transformer import Transformer
from llmkit.train.loop import TrainConfig, find_checkpoint, setup_distributed, train
from llmkit.train.losses import clm_loss, mlm_loss
from llmkit.utils.io import check_file, read_utf8


@dataclass
class PretrainConfig:
    data: list[str]
    out: str
    model_config: str | None = None  # preset name or config.json; None: llama-tiny (clm) / bert-tiny (mlm)
    tokenizer: str | None = None  # tokenizer folder; None: train one on the data (saved in out)
    vocab_size: int = 4096  # for a tokenizer trained here
    char: bool = False  # train a character-level tokenizer instead of byte-level BPE
    objective: str = "clm"  # clm | mlm
    val_data: list[str] | None = None
    val_fraction: float = 0.1
    text_field: str = "text"
    lines: bool = False  # .txt: one document per line
    block_size: int | None = None  # None: min(256, max_position_embeddings)
    batch_size: int = 16  # blocks per process per micro-step
    max_tokens: int | None = None  # sets max_steps from the tokens per optimizer step
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    n_embd: int | None = None
    dropout: float | None = None
    mask_prob: float = 0.15
    sample_tokens: int = 48  # CLM: length of the greedy sample printed at each evaluation (0: none)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------------------------
# samples


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt_ids: list[int], n: int, block_size: int) -> str:
    """A short greedy continuation with plain forward passes (the engine is a higher layer than training)."""
    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    for _ in range(n):
        logits = model(ids[:, -block_size:], last_only=True)  # (1, 1, V)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokenizer.decode(ids[0].tolist())


# ---------------------------------------------------------------------------------------------------------------
# pieces of the recipe


def load_run_yaml(path) -> dict:
    """Flags from a YAML file (keys as flag names, dashes or underscores)."""
    import yaml

    text = read_utf8(path)
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"--config {path} is not valid YAML/JSON{where} ({getattr(e, 'problem', None) or e}); "
                         "write one `flag: value` per line") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a mapping of flag: value")
    return {k.replace("-", "_"): v for k, v in d.items()}


def config_from_flags(flags: dict) -> PretrainConfig:
    """A PretrainConfig from CLI flags (None = not given) over an optional --config YAML file over the defaults."""
    flags = dict(flags)
    given = load_run_yaml(flags.pop("config")) if flags.get("config") else {}
    given.update({k: v for k, v in flags.items() if v is not None})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {f.name for f in dataclasses.fields(PretrainConfig)} - {"train"}
    unknown = sorted(set(given) - train_fields - own - {"config"})
    if unknown:
        raise ValueError(f"unknown pretrain setting(s): {', '.join(unknown)}")
    for key in ("data", "val_data"):
        if isinstance(given.get(key), str):
            given[key] = [given[key]]
    if not given.get("data") or not given.get("out"):
        raise ValueError("pretrain needs --data FILE... and --out DIR (on the command line or in --config)")
    tc = TrainConfig(**{k: v for k, v in given.items() if k in train_fields})
    return PretrainConfig(**{k: v for k, v in given.items() if k in own}, train=tc)


# settings that must be >= 1 (>= 0 for the second group); checked before anything is written
_POSITIVE = ("vocab_size", "block_size", "batch_size", "max_tokens", "n_layer", "n_head", "n_kv_head", "n_embd",
             "max_steps", "grad_accum", "eval_steps", "log_every", "keep_last")
_NON_NEGATIVE = ("warmup_steps", "eval_every", "save_every", "early_stopping", "weight_decay", "grad_clip",
                 "sample_tokens")


def check_config(pc: PretrainConfig) -> ModelConfig:
    """Refuse bad settings before any output exists: paths, numbers, the model config; returns the base config."""
    tc = pc.train
    if pc.objective not in ("clm", "mlm"):
        raise ValueError(f"--objective must be clm or mlm, not {pc.objective!r}")
    for key in _POSITIVE + _NON_NEGATIVE:
        v = getattr(pc, key) if hasattr(pc, key) else getattr(tc, key)
        low = 1 if key in _POSITIVE else 0
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < low):
            raise ValueError(f"--{key.replace('_', '-')} {v!r} must be a number >= {low}")
    for key, value in (("lr", tc.lr), ("max_time", tc.max_time), ("min_lr", tc.min_lr)):
        if value is not None and (not isinstance(value, (int, float)) or value < 0 or (key != "min_lr" and not value)):
            raise ValueError(f"--{key.replace('_', '-')} {value!r} must be a number > 0")
    if not 0 < pc.val_fraction < 1 and not pc.val_data:
        raise ValueError(f"--val-fraction {pc.val_fraction} must lie in (0, 1), or pass --val-data")
    if pc.dropout is not None and not 0 <= pc.dropout < 1:
        raise ValueError(f"--dropout {pc.dropout} must lie in [0, 1)")
    out = Path(pc.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {pc.out} is a file; give a folder (new, or a run to --resume)")
    for f in list(pc.data) + list(pc.val_data or []):
        if check_file(f).stat().st_size == 0:
            raise ValueError(f"data file {f} is empty")
    if pc.tokenizer and not (Path(pc.tokenizer) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--tokenizer {pc.tokenizer} is not a tokenizer folder (no tokenizer.json in it)")
    cfg = base_model_config(pc)
    if pc.objective == "mlm" and cfg.causal:
        raise ValueError("--objective mlm needs a bidirectional model (causal: false), e.g. --model-config bert-tiny")
    n_embd, n_head = pc.n_embd or cfg.n_embd, pc.n_head or cfg.n_head
    if n_embd % n_head:
        raise ValueError(f"--n-embd {n_embd} must be a multiple of --n-head {n_head}")
    return cfg


def base_model_config(pc: PretrainConfig) -> ModelConfig:
    """The preset or JSON file --model-config names, before the tokenizer and size flags are applied."""
    name = pc.model_config or ("bert-tiny" if pc.objective == "mlm" else "llama-tiny")
    p = Path(name)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".json" and p.is_file():
        try:
            raw = json.loads(read_utf8(p))
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-config {p} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"--model-config {p} must hold a JSON object")
        try:
            if "llmkit" in raw or "model_type" in raw:  # a model folder's HF config.json
                return ModelConfig.from_dict(raw["llmkit"]) if "llmkit" in raw else config_from_hf(raw)
            return ModelConfig.from_dict(raw)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"--model-config {p} is not a model config ({type(e).__name__}: {e})") from None
    return load_config(name)


def resolve_model_config(pc: PretrainConfig, tok) -> ModelConfig:
    """The model config: preset or JSON, size flags applied, vocabulary and special ids from the tokenizer."""
    name = pc.model_config or ("bert-tiny" if pc.objective == "mlm" else "llama-tiny")
    cfg = base_model_config(pc)
    if name not in PRESETS:
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but {name} has vocab_size {cfg.vocab_size}: "
                             f"use a matching tokenizer or config")
        overrides = {}
    else:
        overrides = {"vocab_size": tok.vocab_size}
    overrides.update({k: v for k, v in (("n_layer", pc.n_layer), ("n_head", pc.n_head), ("n_embd", pc.n_embd),
                                         ("dropout", pc.dropout)) if v is not None})
    if pc.n_embd is not None or pc.n_head is not None:  # derived sizes follow the new width
        n_embd, n_head = pc.n_embd or cfg.n_embd, pc.n_head or cfg.n_head
        overrides.update(head_dim=n_embd // n_head, intermediate_size=cfg.intermediate_size * n_embd // cfg.n_embd)
        if pc.n_kv_head is None and cfg.n_kv_head == cfg.n_head:
            overrides["n_kv_head"] = n_head
    if pc.n_kv_head is not None:
        overrides["n_kv_head"] = pc.n_kv_head
    if pc.n_head is not None and pc.n_kv_head is None and (pc.n_head % cfg.n_kv_head):
        overrides["n_kv_head"] = pc.n_head
    if pc.objective == "mlm" and cfg.causal:
        raise ValueError("--objective mlm needs a bidirectional model (causal: false), e.g. --model-config bert-tiny")
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    overrides.update({k: (-1 if v is None else v) for k, v in ids.items()})
    block = pc.block_size or min(256, cfg.max_position_embeddings)
    if block > cfg.max_position_embeddings:  # a fresh model can simply have more positions
        overrides["max_position_embeddings"] = block
    return cfg.replace(**overrides)


def get_tokenizer(pc: PretrainConfig, rank: int, world: int):
    """--tokenizer, the one a resumed run saved in out, or a new one trained on the data by rank 0."""
    if pc.tokenizer:
        return Tokenizer.from_dir(pc.tokenizer)
    out = Path(pc.out)
    if pc.train.resume and (out / "tokenizer.json").is_file():
        return Tokenizer.from_dir(out)
    if rank == 0:
        print(f"training a {'character' if pc.char else f'{pc.vocab_size}-token BPE'} tokenizer on the data",
              file=sys.stderr)
        train_tokenizer(pc.data, pc.vocab_size, out, char=pc.char, text_field=pc.text_field)
    _barrier(world)
    return Tokenizer.from_dir(out)


def _barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------------------------
# the recipe


def pretrain(pc: PretrainConfig) -> dict:
    """Pretrain a model as pc says; returns the final metrics (val_loss, val_ppl, ...)."""
    tc = pc.train
    tc.out = pc.out
    check_config(pc)
    if not tc.resume and (Path(pc.out) / "checkpoints").is_dir():
        if find_checkpoint(pc.out) is not None:  # checked before the tokenizer is (re)written into out
            raise ValueError(f"{pc.out} already holds checkpoints: pass --resume to continue, or a new --out")
    rank, world, device = setup_distributed(tc.device)

    # ---- tokenizer and data (rank 0 tokenizes and caches; the others read the cache)
    tok = get_tokenizer(pc, rank, world)
    cache = Path(pc.out) / "cache"
    kw = dict(text_field=pc.text_field, lines=pc.lines, progress=tc.progress and rank == 0)
    if rank == 0:
        tokens = tokenize_files(pc.data, tok, cache, **kw)
        val_tokens = tokenize_files(pc.val_data, tok, cache, **kw) if pc.val_data else None
    _barrier(world)
    if rank != 0:
        tokens = tokenize_files(pc.data, tok, cache, **kw)
        val_tokens = tokenize_files(pc.val_data, tok, cache, **kw) if pc.val_data else None
    if val_tokens is None:
        tokens, val_tokens = split_tokens(tokens, pc.val_fraction)

    # ---- model
    cfg = resolve_model_config(pc, tok)
    block = pc.block_size or min(256, cfg.max_position_embeddings)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank and every run
    model = Transformer(cfg)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"model: {cfg.family}, {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}, "
              f"{n / 1e6:.2f}M parameters; {len(tokens):,} train / {len(val_tokens):,} validation tokens",
              file=sys.stderr)

    # ---- loaders
    mlm = pc.objective == "mlm"
    lkw = dict(objective=pc.objective, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
               special_ids=tok.all_special_ids, mask_prob=pc.mask_prob)
    train_data = BlockLoader(tokens, block, pc.batch_size, seed=tc.seed, rank=rank, world_size=world, **lkw)
    span = block + (0 if mlm else 1)
    if len(val_tokens) < span:
        raise ValueError(f"validation data has {len(val_tokens)} tokens, fewer than one block of {span}: "
                         f"raise --val-fraction, pass --val-data, or use a smaller --block-size")
    val_data = BlockLoader(val_tokens, block, min(pc.batch_size, max(1, (len(val_tokens) - 1) // block)),
                           seed=tc.seed, shuffle=False, **lkw)
    if pc.max_tokens:
        tc.max_steps = math.ceil(pc.max_tokens / (pc.batch_size * block * tc.grad_accum * world))

    # ---- train
    prompt = [int(t) for t in val_tokens[:min(16, block // 2)]]
    sample_fn = None
    if not mlm and pc.sample_tokens:
        sample_fn = lambda m: greedy_sample(m, tok, prompt, pc.sample_tokens, block)  # noqa: E731
    run = {"pretrain": {k: v for k, v in dataclasses.asdict(pc).items() if k != "train"}}
    result = train(model, train_data, mlm_loss if mlm else clm_loss, tc, val_data=val_data,
                   save_fn=lambda d, m: save_model(d, m, tok), sample_fn=sample_fn, run_config=run)
    if rank == 0:
        print(f"done: step {result.get('step')}, val_loss {result.get('val_loss')}, model folder {pc.out}",
              file=sys.stderr)
    return result
