"""ModelConfig: one dataclass that describes Llama-, GPT-2- and BERT-style Transformers by its fields."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    # family tag: decides only the Hugging Face architecture name on export ("llama" | "gpt2" | "bert")
    family: str = "llama"
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain MHA)
    n_embd: int = 576
    intermediate_size: int | None = None  # None means 4 * n_embd
    head_dim: int | None = None  # None means n_embd // n_head
    max_position_embeddings: int = 2048
    # attention
    causal: bool = True  # False for bidirectional encoders (BERT)
    qkv_bias: bool = False
    o_bias: bool = False
    # MLP
    mlp: str = "swiglu"  # "swiglu" (gate, up, down) or "mlp" (up, down)
    activation: str = "silu"  # silu | gelu | gelu_tanh | relu
    mlp_bias: bool = False
    # norms
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm with bias
    pre_norm: bool = True  # False: post-norm residual blocks (original BERT)
    final_norm: bool = True  # norm after the last block (pre-norm models)
    embed_norm: bool = False  # LayerNorm on the embeddings (BERT)
    # positions
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    type_vocab_size: int = 0  # token-type (segment) embeddings, BERT uses 2
    # heads
    tie_word_embeddings: bool = True
    mlm_transform: bool = False  # BERT MLM head: dense + activation + norm before the output projection
    lm_head_bias: bool = False
    pooler: bool = False  # BERT pooler (dense + tanh on [CLS]) for classification
    num_labels: int = 0  # > 0 adds a sequence-classification head
    id2label: dict[str, str] | None = None
    tagger: bool = False  # with num_labels: the head labels every token (token classification, NER)
    # regularisation
    dropout: float = 0.0  # embeddings, residual branches, classifier
    attn_dropout: float = 0.0
    # special token ids (-1 = none)
    bos_token_id: int = -1
    eos_token_id: int | list[int] = -1
    pad_token_id: int = -1
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)  # HF fields we keep verbatim for a faithful export

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_head
        problems = []
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.mlp not in ("swiglu", "mlp"):
            problems.append(f"mlp must be 'swiglu' or 'mlp', not {self.mlp!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            problems.append(f"norm must be 'rmsnorm' or 'layernorm', not {self.norm!r}")
        if self.position not in ("rope", "learned"):
            problems.append(f"position must be 'rope' or 'learned', not {self.position!r}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, not {self.activation!r}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def eos_ids(self) -> list[int]:
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        return [i for i in ids if i is not None and i >= 0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


ACTIVATIONS = {"silu", "gelu", "gelu_tanh", "relu"}

# ---------------------------------------------------------------------------------------------------------------
# Presets: model families are data. Tiny ones keep the test suite fast on a CPU.

_LLAMA = dict(family="llama", mlp="swiglu", activation="silu", norm="rmsnorm", position="rope", causal=True)
_GPT2 = dict(family="gpt2", mlp="mlp", activation="gelu_tanh", norm="layernorm", norm_bias=True, norm_eps=1e-5,
             position="learned", qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True)
_BERT = dict(family="bert", mlp="mlp", activation="gelu", norm="layernorm", norm_bias=True, norm_eps=1e-12,
             position="learned", causal=False, qkv_bias=True, o_bias=True, mlp_bias=True, pre_norm=False,
             final_norm=False, embed_norm=True, type_vocab_size=2, pooler=True, tie_word_embeddings=True,
             mlm_transform=True, lm_head_bias=True)

PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         intermediate_size=1536, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama-tiny": dict(_LLAMA, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False),
    "gpt2-small": dict(_GPT2, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, max_position_embeddings=1024,
                       bos_token_id=50256, eos_token_id=50256),
    "gpt2-tiny": dict(_GPT2, vocab_size=256, n_layer=2, n_head=4, n_embd=64, max_position_embeddings=256),
    "bert-base": dict(_BERT, vocab_size=30522, n_layer=12, n_head=12, n_embd=768, intermediate_size=3072,
                      max_position_embeddings=512, pad_token_id=0),
    "bert-tiny": dict(_BERT, vocab_size=256, n_layer=2, n_head=4, n_embd=64, intermediate_size=128,
                      max_position_embeddings=256, pad_token_id=0),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def load_config(path: str | Path) -> ModelConfig:
    """A preset name, or a JSON file holding a ModelConfig (llmkit's own fields)."""
    if str(path) in PRESETS:
        return preset(str(path))
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model config {path!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model config {path} is not valid JSON ({e}); fix the file or name a preset") from None
    if not isinstance(d, dict):
        raise ValueError(f"model config {path} must hold a JSON object of ModelConfig fields")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config {path}: {e}") from None
