"""The Transformer: one module for Llama-, GPT-2- and BERT-style models, chosen by ModelConfig fields.

Parameter names follow Hugging Face's Llama layout (model.layers.N.self_attn.q_proj ...) so that Llama-family
folders load without renaming; checkpoint.py maps GPT-2 and BERT names onto these.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model.config import ModelConfig
from llmkit.model.kvcache import KVCache, PackedKV, PackedLayer, RowKV  # noqa: F401  (re-exported)
from llmkit.model.linear import LOW_PRECISION, _fuse, _still_fused, fused_linear, linear
from llmkit.model.logits import HEAD_MARGIN, head_logits


def activation(name: str):
    return {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x):
        if x.dtype == torch.float32:
            w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
            # the mean square summed in float64 and rounded once: the same float32 number in whatever order a kernel
            # sums (torch's eager kernels and the compiled decode step's generated C++ sum in different orders, and
            # a last-bit difference here could flip a bf16 rounding at the next kernel input; infer/compiled.py)
            ms = x.double().square().mean(-1, keepdim=True).float()
            return x * torch.rsqrt(ms + self.eps) * w
        # computed in float32 as transformers' LlamaRMSNorm does, then cast back before the weight
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        w, b = self.weight, self.bias
        if w is not None and w.dtype != x.dtype:  # low-precision weights, float32 activations
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def make_norm(cfg: ModelConfig, dim: int, device=None) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps, device=device)
    return LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embeddings (the non-interleaved "rotate_half" form used by transformers' Llama)


def rope_cache(cfg: ModelConfig, device=None):
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.extra.get("rope_scaling") if cfg.extra else None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()  # (max_pos, head_dim)


def _llama3_inv_freq(inv_freq, s):
    # Llama 3.1 frequency scaling (transformers' _compute_llama3_parameters)
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=cfg.qkv_bias, device=device)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias, device=device)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * hd, bias=cfg.qkv_bias, device=device)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=cfg.o_bias, device=device)

    def fuse(self):
        _register_fused(self, _fuse([self.q_proj, self.k_proj, self.v_proj]))

    fused = property(lambda self: _fused(self))

    def forward(self, x, rope, mask, kv, slots):
        """kv: this layer's (keys, values) cache buffers, or None; slots: where the new tokens go (_cache_step)."""
        B, T, _ = x.shape
        hd, cfg = self.cfg.head_dim, self.cfg
        H, Hkv = cfg.n_head, cfg.n_kv_head
        fused = getattr(self, "fused", None)
        linears = (self.q_proj, self.k_proj, self.v_proj)
        qfused = getattr(self, "qfused", None)  # quantized q/k/v (llmkit.model.quant): one layer, rows viewed
        if qfused is not None or fused is not None and (torch.compiler.is_compiling() or _still_fused(fused, linears)):
            qkv = qfused(x) if qfused is not None else fused_linear(x, *fused)
            qkv = qkv.view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
            qk, v = qkv.split([H + Hkv, Hkv], 1)
            if rope is not None:  # queries and keys rotated in one go
                qk = apply_rope(qk, *rope)
                qk = qk if qk.dtype == v.dtype else qk.to(v.dtype)
            q, k = qk.split([H, Hkv], 1)
        else:
            q = linear(self.q_proj, x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, D)
            k = linear(self.k_proj, x).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, D)
            v = linear(self.v_proj, x).view(B, T, Hkv, hd).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope).to(v.dtype), apply_rope(k, *rope).to(v.dtype)
        if isinstance(kv, PackedLayer):
            y = kv.attend(q, k, v, enable_gqa=cfg.n_kv_head != cfg.n_head)
            return linear(self.o_proj, y.transpose(1, 2).reshape(B, T, cfg.n_head * hd))
        if kv is not None:
            k, v = self._write_cache(*kv, k, v, slots)
        is_causal = mask is None and cfg.causal and T > 1
        if mask is True:  # the caller has checked that no masking is needed (decode step without padding)
            mask, is_causal = None, False
        store = getattr(self, "weights_store", None)  # set by capture_attention(): the math path, weights kept
        if store is not None:
            y, w = attention_math(q, k, v, mask, is_causal)
            store.append(w)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=cfg.attn_dropout if self.training else 0.0,
                enable_gqa=cfg.n_kv_head != cfg.n_head,
            )
        return linear(self.o_proj, y.transpose(1, 2).reshape(B, T, cfg.n_head * hd))

    @staticmethod
    def _write_cache(kc, vc, k, v, slots):
        start, end, uniform = slots
        if uniform:
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            kc[rows, :, start] = k.transpose(1, 2)  # start: (B, T) slot indices
            vc[rows, :, start] = v.transpose(1, 2)
        return kc[:, :, :end], vc[:, :, :end]


def _register_fused(m: nn.Module, fused):
    # buffers, not plain attributes: .to() moves them and the compiled decode step (infer/compiled.py) takes every
    # tensor the forward reads as an input; non-persistent, so checkpoints are unchanged
    m.register_buffer("fused_weight", fused[0], persistent=False)
    m.register_buffer("fused_bias", fused[1], persistent=False)


def _fused(m: nn.Module):
    w = m._buffers.get("fused_weight")
    return None if w is None else (w, m._buffers.get("fused_bias"))


def attention_math(q, k, v, mask=None, is_causal=False):
    """SDPA's result in plain ops (no dropout), plus the attention weights (B, H, Tq, Tk); keys/values may have
    fewer heads (GQA). mask: bool (True = may attend) or additive float, as SDPA takes it."""
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    if H != Hkv:
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D)
    if is_causal:  # top-left aligned, as SDPA's is_causal
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None and mask is not True:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    w = scores.softmax(-1)
    return (w @ v.float()).to(q.dtype), w


@contextmanager
def capture_attention(model):
    """Within the block, every layer's attention runs the math path and appends its weights (B, H, Tq, Tk) to the
    yielded list, one entry per layer per forward."""
    maps: list = []
    attns = [layer.self_attn for layer in model.layers]
    for a in attns:
        a.weights_store = maps
    try:
        yield maps
    finally:
        for a in attns:
            a.weights_store = None


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.act = activation(cfg.activation)
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias, device=device)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.mlp_bias, device=device)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.mlp_bias, device=device)

    def fuse(self):
        if self.swiglu:
            _register_fused(self, _fuse([self.gate_proj, self.up_proj]))

    fused = property(lambda self: _fused(self))

    def forward(self, x):
        if not self.swiglu:
            return linear(self.down_proj, self.act(linear(self.up_proj, x)))
        fused = getattr(self, "fused", None)
        linears = (self.gate_proj, self.up_proj)
        qfused = getattr(self, "qfused", None)
        if qfused is not None:
            gate, up = qfused(x).chunk(2, -1)
        elif fused is not None and (torch.compiler.is_compiling() or _still_fused(fused, linears)):
            gate, up = fused_linear(x, *fused).chunk(2, -1)
        else:
            gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        return linear(self.down_proj, self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.self_attn = Attention(cfg, device)
        self.mlp = MLP(cfg, device)
        self.input_layernorm = make_norm(cfg, cfg.n_embd, device)
        self.post_attention_layernorm = make_norm(cfg, cfg.n_embd, device)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, kv, slots):
        drop = self.drop if self.training and self.drop.p > 0 else _identity
        if self.pre_norm:
            x = x + drop(self.self_attn(self.input_layernorm(x), rope, mask, kv, slots))
            return x + drop(self.mlp(self.post_attention_layernorm(x)))
        # post-norm (original Transformer / BERT)
        x = self.input_layernorm(x + drop(self.self_attn(x, rope, mask, kv, slots)))
        return self.post_attention_layernorm(x + drop(self.mlp(x)))


def _identity(x):
    return x


@contextmanager
def _no_init():
    # torch's layers run a random init in their constructors; on meta tensors that init goes through Python refs
    # that import torch._dynamo (~2 s), so skip it when only the structure is wanted (transformers does the same)
    saved = {c: c.reset_parameters for c in (nn.Linear, nn.Embedding, nn.LayerNorm)}
    for c in saved:
        c.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for c, f in saved.items():
            c.reset_parameters = f


class Transformer(nn.Module):
    """Decoder or encoder stack with optional LM / MLM / classification heads."""

    def __init__(self, cfg: ModelConfig, device=None):
        """device="meta" builds the structure without memory or init (checkpoint loading fills it)."""
        super().__init__()
        self.config = cfg
        with _no_init() if str(device) == "meta" else nullcontext():
            self._build(cfg, device)

    def _build(self, cfg: ModelConfig, d):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd, device=d)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.n_embd, device=d)
        if cfg.type_vocab_size:
            self.embed_types = nn.Embedding(cfg.type_vocab_size, cfg.n_embd, device=d)
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg, cfg.n_embd, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, d) for _ in range(cfg.n_layer))
        if cfg.final_norm:
            self.norm = make_norm(cfg, cfg.n_embd, d)
        if cfg.mlm_transform:
            self.mlm_dense = nn.Linear(cfg.n_embd, cfg.n_embd, device=d)
            self.mlm_norm = make_norm(cfg, cfg.n_embd, d)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.lm_head_bias, device=d)
        if cfg.pooler:
            self.pooler = nn.Linear(cfg.n_embd, cfg.n_embd, device=d)
        if cfg.num_labels:
            self.score = nn.Linear(cfg.n_embd, cfg.num_labels, bias=cfg.pooler or cfg.tagger, device=d)
        if str(d) != "meta":
            self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.position == "rope":
            cos, sin = rope_cache(cfg, device=None if str(d) == "meta" else d)  # real values even for meta
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, m):
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    def fuse_for_decode(self):
        """Fuse q/k/v and gate/up weights into one buffer each (parameters become views; nothing is copied twice).

        Inference only: engine.py calls it. Training, saving and loading work as before.
        """
        for layer in self.layers:
            if getattr(layer.self_attn, "fused", None) is None and type(layer.self_attn.q_proj) is nn.Linear:
                layer.self_attn.fuse()
            if getattr(layer.mlp, "fused", None) is None and type(layer.mlp.up_proj) is nn.Linear:
                layer.mlp.fuse()
        return self

    @property
    def activation_dtype(self) -> torch.dtype:
        """dtype of hidden states and of the KV cache: the weights' own, but float32 for bf16/fp16 weights on a CPU.

        Quantized models (llmkit.model.quant): float32 on a CPU, bfloat16 on a GPU.
        """
        w = getattr(self.embed_tokens, "weight", None)
        if w is None or w.dtype in (torch.int8, torch.uint8):
            w = next(self.parameters())
            return torch.float32 if w.device.type == "cpu" else torch.bfloat16
        return torch.float32 if w.device.type == "cpu" and w.dtype in LOW_PRECISION else w.dtype

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # -----------------------------------------------------------------------------------------------------------
    def forward(self, input_ids, *, attention_mask=None, positions=None, token_type_ids=None,
                cache: KVCache | PackedKV | None = None, head: str = "lm", last_only: bool = False):
        """input_ids (B, T) -> logits (B, T, V) for head="lm", (B, num_labels) for "classify", (B, T, num_labels) for
        "tag" (a token classifier), (B, T, C) for "hidden".

        attention_mask (B, T): 1 for real tokens, 0 for padding. With a cache, tokens are written after each row's
        previous ones and attend to them. With a PackedKV, input_ids (1, N) holds several rows' new tokens back to back.
        """
        cfg = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        real = None if attention_mask is None else attention_mask.bool()
        mask, slots = None, None
        if isinstance(cache, PackedKV):
            if B != 1 or T != cache.n_tokens or attention_mask is not None:
                raise ValueError(f"packed input must be (1, {cache.n_tokens}) without attention_mask, got ({B}, {T})")
            positions = cache.positions(dev) if positions is None else positions
        elif cache is not None:
            mask, slots, positions_c = self._cache_step(cache, real, B, T, dev)
            positions = positions_c if positions is None else positions
        elif real is not None and not bool(real.all()):
            allowed = real[:, None, None, :]  # (B, 1, 1, T) keys
            if cfg.causal:
                allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=dev).tril()
            mask = allowed | torch.eye(T, dtype=torch.bool, device=dev)  # padding queries see themselves: no NaN
        if positions is None:
            if real is not None:
                positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = torch.arange(T, device=dev).expand(B, T)

        x = self.embed_tokens(input_ids).to(self.activation_dtype)
        if cfg.position == "learned":
            x = x + self.embed_positions(positions)
        if cfg.type_vocab_size:
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.embed_types(tt)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        x = self.drop(x)
        rope = None
        if cfg.position == "rope":
            rope = tuple(t[positions].unsqueeze(1).to(x.dtype) for t in (self.rope_cos, self.rope_sin))
        x = self._layers(x, rope, mask, cache, slots)
        if isinstance(cache, PackedKV):
            cache.advance()
        elif cache is not None:
            self._cache_advance(cache, real, B, T, slots)

        if head == "hidden":
            return x
        if head == "classify":
            return self.classify(x, input_ids, real)
        if head == "tag":
            return linear(self.score, self.drop(x))
        if last_only:
            x = x[:, -1:]
        if cfg.mlm_transform:
            x = self.mlm_norm(activation(cfg.activation)(linear(self.mlm_dense, x)))
        return head_logits(self.lm_head, x)

    def logits(self, hidden, margin: float = HEAD_MARGIN):
        """Float32 LM-head logits of hidden states (B, ..., C) from head="hidden" (decoders without MLM transform);
        margin: see model.logits.head_logits."""
        return head_logits(self.lm_head, hidden, margin)

    def _layers(self, x, rope, mask, cache, slots):
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if cache is None else cache.layer(i), slots)
        return self.norm(x) if self.config.final_norm else x

    def classify(self, x, input_ids, real):
        """Sequence classification logits from hidden states: [CLS] + pooler for encoders, last real token otherwise."""
        cfg = self.config
        if cfg.pooler:
            pooled = torch.tanh(linear(self.pooler, x[:, 0]))
            return linear(self.score, self.drop(pooled))
        if real is None and cfg.pad_token_id >= 0:
            real = input_ids != cfg.pad_token_id
        if real is None:
            last = torch.full((x.shape[0],), x.shape[1] - 1, device=x.device)
        else:  # last real token; works for left and right padding alike
            idx = torch.arange(x.shape[1], device=x.device)
            last = torch.where(real, idx, -1).max(-1).values.clamp(min=0)
        return linear(self.score, x[torch.arange(x.shape[0], device=x.device), last])

    # -----------------------------------------------------------------------------------------------------------
    def _cache_step(self, cache: KVCache, real, B, T, dev):
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} rows does not match the KV cache's {cache.batch_size}")
        lengths = cache.length
        end = max(lengths) + T
        if end > cache.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache ({cache.max_len}); raise max_len")
        uniform = all(n == lengths[0] for n in lengths)
        if real is None:
            real = torch.ones(B, T, dtype=torch.bool, device=dev)
        if uniform:
            start = lengths[0]
            slots = (start, end, True)
            cache.valid[:, start:end] = real
            q_slot = torch.arange(start, end, device=dev).expand(B, T)
        else:
            q_slot = torch.tensor(lengths, device=dev)[:, None] + torch.arange(T, device=dev)  # (B, T)
            slots = (q_slot, end, False)
            cache.valid[torch.arange(B, device=dev)[:, None], q_slot] = real
        positions = cache.n_tokens[:, None] + (real.long().cumsum(-1) - 1).clamp(min=0)
        needs_mask = cache.has_padding or not uniform or not bool(real.all()) or not self.config.causal
        if not needs_mask and T == 1:
            mask = True  # one new token that may see every earlier slot: no mask at all
        elif not needs_mask and lengths[0] == 0:
            mask = None  # plain causal prefill
        else:
            k_slot = torch.arange(end, device=dev)
            allowed = cache.valid[:, None, None, :end]  # (B, 1, 1, Tk)
            if self.config.causal:
                allowed = allowed & (k_slot[None, None, None, :] <= q_slot[:, None, :, None])
            mask = allowed | (k_slot[None, None, None, :] == q_slot[:, None, :, None])
        return mask, slots, positions

    def _cache_advance(self, cache: KVCache, real, B, T, slots):
        for r in range(B):
            cache.length[r] += T
        if real is None:
            cache.n_tokens += T
        else:
            cache.n_tokens += real.long().sum(-1)
            if not bool(real.all()):
                cache.has_padding = True

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
