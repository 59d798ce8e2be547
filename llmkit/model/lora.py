"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): inject, merge, save and load adapters.

Adapters are saved in PEFT's layout (adapter_config.json + adapter_model.safetensors with tensor names such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads them on
the Hugging Face export of the base model, and llmkit loads them back (`load_model(adapter_dir)`).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from llmkit.model.config import ModelConfig
from llmkit.model.linear import fused_linear
from llmkit.model.transformer import Transformer
from llmkit.model.names import hf_module
from llmkit.utils.io import shared_mode, write_atomic

# --lora-targets short names -> llmkit module names (the last part of layers.N.self_attn.q_proj ...)
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
META = "llmkit_adapter.json"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    layers: list[int] | None = None  # only these block indices (PEFT's layers_to_transform); None: every block
    use_rslora: bool = False  # rank-stabilized LoRA (Kalajdzievski 2023): scale by alpha / sqrt(r), not alpha / r
    rank_pattern: dict = field(default_factory=dict)  # PEFT's per-module rank: {module-name regex: r}
    alpha_pattern: dict = field(default_factory=dict)  # PEFT's per-module alpha: {module-name regex: alpha}

    def __post_init__(self):
        for what, v in [("r", self.r), *((f"rank_pattern[{k!r}]", x) for k, x in self.rank_pattern.items())]:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoRA {what} must be an integer >= 1, got {v!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.scaling_of(self.r, self.alpha)

    def scaling_of(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def for_module(self, hf_name: str) -> tuple[int, float]:
        """(r, alpha) of one module, by its Hugging Face name, through rank_pattern/alpha_pattern as PEFT matches."""
        return (_pattern(self.rank_pattern, hf_name, self.r), float(_pattern(self.alpha_pattern, hf_name, self.alpha)))


def _pattern(patterns: dict, name: str, default):
    # peft.utils.other.get_pattern_key: the first key that matches the end of the name at a dot boundary
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + b + (alpha / r) * B A dropout(x).

    It subclasses nn.Linear and keeps `weight`/`bias` under their own names, so the base tensors keep their
    checkpoint names and the adapter tensors are `<module>.lora_A.weight` / `<module>.lora_B.weight`, as in PEFT.
    """

    def __init__(self, base: nn.Linear, cfg: LoRAConfig, r: int | None = None, alpha: float | None = None):
        nn.Module.__init__(self)
        r, alpha = r or cfg.r, cfg.alpha if alpha is None else alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling_of(r, alpha)
        # PEFT's default init: A ~ kaiming-uniform, B = 0, so the adapted model starts equal to the base
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        low_rank = fused_linear(fused_linear(self.lora_dropout(x), self.lora_A.weight), self.lora_B.weight)
        return fused_linear(x, self.weight, self.bias) + low_rank * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + (alpha / r) B A."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
            lin.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


# ---------------------------------------------------------------------------------------------------------------
# inject / merge


def target_names(model: Transformer, targets: list[str], layers: list[int] | None = None) -> list[str]:
    """Full module names (layers.N.self_attn.q_proj ...) that `targets` picks, or a clear error."""
    wanted = []
    for t in targets:
        t = t.strip()
        if t in ("all", "all-linear"):
            wanted += list(TARGETS.values())
        elif t in TARGETS or t in TARGETS.values():
            wanted.append(TARGETS.get(t, t))
        else:
            raise ValueError(f"unknown LoRA target {t!r}; use names from {','.join(TARGETS)} or 'all'")
    names = [n for n, m in model.named_modules()
             if n.startswith("layers.") and isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted
             and (layers is None or int(n.split(".")[1]) in layers)]
    if not names:
        raise ValueError(f"--lora-targets {','.join(targets)} names no layer of this {model.config.family} model "
                         f"(it has {', '.join(sorted(_linear_kinds(model)))})")
    if model.config.family == "gpt2" and any(n.endswith(("q_proj", "k_proj", "v_proj")) for n in names):
        raise ValueError("GPT-2 keeps q, k and v in one fused c_attn layer, so LoRA on q/k/v cannot be saved for "
                         "PEFT; use --lora-targets o,up,down (or --method full)")
    return names


def _linear_kinds(model) -> set[str]:
    inv = {v: k for k, v in TARGETS.items()}
    return {inv.get(n.rsplit(".", 1)[-1], n) for n, m in model.named_modules()
            if n.startswith("layers.") and isinstance(m, nn.Linear)}


def inject_lora(model: Transformer, cfg: LoRAConfig, trainable: tuple[str, ...] = ()) -> list[str]:
    """Wrap the targeted linears in LoRALinear and freeze everything except the adapters and `trainable` modules."""
    names = target_names(model, cfg.targets, cfg.layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, child = name.rsplit(".", 1)
        r, alpha = cfg.for_module(hf_module(model.config, name))
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), cfg, r, alpha))
    for name in trainable:  # e.g. the classification head, trained fully (PEFT's modules_to_save)
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return names


def merge_lora(model: Transformer) -> Transformer:
    """Fold every LoRALinear into a plain nn.Linear (in place); the result is an ordinary model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: Transformer, extra: tuple[str, ...] = ()) -> dict:
    """The adapter tensors (llmkit names), plus the full tensors of the `extra` modules."""
    sd = model.state_dict()
    return {k: v for k, v in sd.items() if ".lora_A." in k or ".lora_B." in k or k.split(".")[0] in extra}


def add_classifier(model: Transformer, id2label: dict[str, str], tagger: bool = False) -> Transformer:
    """Give the model a fresh classification head (`score`) for the labels, unless it has that one: a sequence
    classifier, or with tagger=True a token classifier (a label for every token, forward(head="tag"))."""
    cfg = model.config
    id2label = {str(k): str(v) for k, v in id2label.items()}
    if cfg.num_labels == len(id2label) and (cfg.id2label or {}) == id2label and cfg.tagger == tagger \
            and hasattr(model, "score"):
        return model
    model.config = cfg.replace(num_labels=len(id2label), id2label=id2label, tagger=tagger)
    w = model.embed_tokens.weight
    model.score = nn.Linear(cfg.n_embd, len(id2label), bias=cfg.pooler or tagger, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        model.score.weight.normal_(0.0, cfg.initializer_range)
        if model.score.bias is not None:
            model.score.bias.zero_()
    return model


# ---------------------------------------------------------------------------------------------------------------
# PEFT layout: names and config


def _peft_names(cfg: ModelConfig, sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if ".lora_A." in k or ".lora_B." in k:
            mod, rest = k.split(".lora_", 1)
            out[f"base_model.model.{hf_module(cfg, mod)}.lora_{rest}"] = v
        else:  # a fully trained module (the classification head)
            mod, pname = k.rsplit(".", 1)
            out[f"base_model.model.{hf_module(cfg, mod)}.{pname}"] = v
    return out


def save_adapter(out_dir, model: Transformer, lora: LoRAConfig, base: str, tokenizer=None,
                 extra: tuple[str, ...] = ()) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) and the tokenizer, each file atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {k: v.detach().contiguous().cpu() for k, v in _peft_names(cfg, lora_state_dict(model, extra)).items()}
    tmp = out / f".adapter_model.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    shared_mode(tmp)  # safetensors creates its files 0600
    os.replace(tmp, out / "adapter_model.safetensors")
    modules = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    if cfg.family != "llama":  # BERT/GPT-2 module names repeat ("dense"), so list each module by its full name
        modules = sorted({hf_module(cfg, n) for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    hf_extra = [hf_module(cfg, e) for e in extra]
    task = ("TOKEN_CLS" if cfg.tagger else "SEQ_CLS") if cfg.num_labels else "CAUSAL_LM"
    config = {
        "peft_type": "LORA", "task_type": task,
        "base_model_name_or_path": base, "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": modules, "modules_to_save": hf_extra or None, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": lora.use_rslora, "use_dora": False,
        "layers_to_transform": lora.layers, "layers_pattern": "layers" if lora.layers is not None else None,
        "rank_pattern": dict(lora.rank_pattern), "alpha_pattern": dict(lora.alpha_pattern),
    }
    # what llmkit needs to rebuild the model and to refuse a different base model (own file: peft warns on extra keys)
    meta = {"targets": list(lora.targets), "layers": lora.layers, "modules_to_save": list(extra),
            "base_fingerprint": fingerprint(cfg), "num_labels": cfg.num_labels, "id2label": cfg.id2label,
            "tagger": cfg.tagger}
    for name, obj in ((META, meta), ("adapter_config.json", config)):
        write_atomic(out / name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def fingerprint(cfg: ModelConfig) -> dict:
    """The shape-defining fields of a model config: an adapter only fits a base that matches them."""
    keys = ("family", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "head_dim")
    return {k: getattr(cfg, k) for k in keys}


def read_adapter_config(path) -> dict:
    """adapter_config.json of an adapter folder, checked to be a LoRA adapter."""
    p = Path(path) / "adapter_config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path} has no adapter_config.json: not an adapter folder")
    try:
        ac = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e})") from None
    if ac.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {ac.get('peft_type')} adapter; llmkit loads LoRA adapters only")
    # variants whose arithmetic llmkit does not implement: refused, never loaded as plain LoRA
    unsupported = [(ac.get("use_dora"), "use_dora (DoRA)"), (ac.get("bias", "none") != "none", "bias"),
                   (ac.get("lora_bias"), "lora_bias"),
                   (ac.get("use_qalora"), "use_qalora"), (ac.get("layer_replication"), "layer_replication"),
                   (ac.get("target_parameters"), "target_parameters")]
    bad = [name for on, name in unsupported if on]
    if bad:
        raise ValueError(f"{path} is a LoRA adapter with {', '.join(bad)}, which llmkit does not support; fold it "
                         "into its base with peft (merge_and_unload, then save_pretrained) and load that folder")
    return ac


def resolve_base(path: Path, base: str | None) -> str:
    """The base model an adapter names, as a loadable spec (a path relative to the adapter folder is resolved)."""
    if base in (None, ""):
        raise ValueError(f"{path}/adapter_config.json names no base model; pass the base model explicitly")
    if base == "default" or Path(base).exists():
        return base
    rel = path / base  # a base stored relative to the adapter folder
    if rel.exists():
        return str(rel)
    raise FileNotFoundError(f"base model {base!r} of adapter {path} not found; edit base_model_name_or_path in "
                            "adapter_config.json to point at it")


def attach_adapter(model: Transformer, path, ac: dict | None = None) -> Transformer:
    """Put the LoRA adapter stored at `path` on `model` (unmerged), checking that it was made for this base."""
    from safetensors.torch import load_file

    path = Path(path)
    ac = ac or read_adapter_config(path)
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}  # absent in adapters from peft
    cfg = model.config
    fp = meta.get("base_fingerprint")
    if fp and fp != fingerprint(cfg):
        diff = ", ".join(f"{k} {fp.get(k)} vs {v}" for k, v in fingerprint(cfg).items() if fp.get(k) != v)
        raise ValueError(f"adapter {path} was trained for a different base model ({diff})")
    if meta.get("num_labels"):
        add_classifier(model, meta.get("id2label") or {str(i): f"LABEL_{i}" for i in range(meta["num_labels"])},
                       tagger=bool(meta.get("tagger")))
    targets = meta.get("targets") or _targets_from_peft(ac["target_modules"])
    lora = LoRAConfig(r=int(ac["r"]), alpha=float(ac["lora_alpha"]), dropout=float(ac.get("lora_dropout", 0.0)),
                      targets=targets, layers=meta.get("layers", ac.get("layers_to_transform")),
                      use_rslora=bool(ac.get("use_rslora")), rank_pattern=dict(ac.get("rank_pattern") or {}),
                      alpha_pattern=dict(ac.get("alpha_pattern") or {}))
    extra = tuple(meta.get("modules_to_save") or ())
    inject_lora(model, lora, trainable=extra)
    f = path / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{path} has no adapter_model.safetensors")
    try:
        stored = load_file(str(f))
    except Exception as e:
        raise ValueError(f"cannot read {f}: {e} (truncated or corrupt?)") from None
    expected = lora_state_dict(model, extra)
    names = dict(zip(_peft_names(cfg, expected), expected))  # PEFT name -> llmkit name
    stored = {k.replace(".default.", "."): v for k, v in stored.items()}  # tolerate un-stripped PEFT names
    missing = [k for k in names if k not in stored]
    if missing or len(stored) != len(names):
        raise ValueError(f"adapter {path} does not fit this base model: {len(missing)} tensors missing "
                         f"(e.g. {missing[:1]}) and {len(set(stored) - set(names))} unexpected")
    sd = {}
    for peft_name, ours in names.items():
        if stored[peft_name].shape != expected[ours].shape:
            raise ValueError(f"adapter {path} was trained for a different base model: {peft_name} has shape "
                             f"{tuple(stored[peft_name].shape)}, this base needs {tuple(expected[ours].shape)}")
        sd[ours] = stored[peft_name]
    model.load_state_dict(sd, strict=False)
    return model


def _targets_from_peft(modules) -> list[str]:
    if isinstance(modules, str):
        modules = [modules]
    inv = {v: k for k, v in TARGETS.items()}
    found = [inv[m.rsplit(".", 1)[-1]] for m in modules if m.rsplit(".", 1)[-1] in inv]
    if not found:
        raise ValueError(f"adapter target_modules {modules} name no layer llmkit knows ({', '.join(TARGETS.values())})")
    return found
