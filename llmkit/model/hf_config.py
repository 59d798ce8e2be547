"""Hugging Face config.json <-> ModelConfig: the field names transformers writes and reads, per family."""
from __future__ import annotations

from llmkit.model.config import ModelConfig

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
    head = ("TokenClassification" if cfg.tagger else "SequenceClassification") if cfg.num_labels else None
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
    if "SequenceClassification" not in arch and "TokenClassification" not in arch:
        return {}
    id2label = {str(k): v for k, v in (hf.get("id2label") or {}).items()}
    n = hf.get("num_labels") or len(id2label) or 2
    return dict(num_labels=n, id2label=id2label or None, tagger="TokenClassification" in arch)
