"""A Transformer from a state dict without a random init, the dtypes llmkit names, and what loading returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.model.config import ModelConfig
from llmkit.model.transformer import RMSNorm, Transformer, rope_cache

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}



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
# building a model from a state dict without a random init


def unused_parts(cfg: ModelConfig) -> tuple[str, ...]:
    """Prefixes of the parameters the model's task does not use: a classifier's LM head and MLM transform (saving
    leaves them out: transformers' *ForSequenceClassification has none), a masked LM's pooler (kept when saving, as
    BERT checkpoints keep it, so that a classifier fine-tuned from the folder starts from the same pooler in llmkit
    and in transformers; BertForMaskedLM reports those two tensors as unused). Loading initialises them fresh if a
    task needs them and the folder has none."""
    if cfg.tagger:  # a token classifier (BertForTokenClassification has no pooler either)
        return ("lm_head.", "mlm_", "pooler.")
    return ("lm_head.", "mlm_") if cfg.num_labels else ("pooler.",)


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
    unused = unused_parts(cfg)
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
