"""Why a model says what it says: attention maps and rollout, a token view (probability, entropy, alternatives),
and attributions (captum's integrated gradients with its convergence delta, or gradient x input).

`explain_to_folder` writes attention.png (layers x heads), rollout.png, explain.json and explain.html: one
self-contained page (no network; works from a file) with a bertviz-style head view, the token view and the
attributions.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch

from llmkit.infer.engine import Engine, SamplingParams
from llmkit.model import quant as quantize
from llmkit.model.transformer import capture_attention
from llmkit.utils.io import write_atomic

WEB = Path(__file__).parents[1] / "web"


def encode(lm, text: str) -> list[int]:
    """Token ids of text as the model reads it (its tokenizer's special tokens), checked against the context."""
    if lm.tokenizer is None:
        raise ValueError(f"{lm.path} has no tokenizer; explain needs one")
    ids = lm.tokenizer.encode(text)
    ctx = lm.config.max_position_embeddings
    if not ids:
        raise ValueError("nothing to explain: the text has no tokens")
    if len(ids) > ctx:
        raise ValueError(f"the text has {len(ids)} tokens but the model's context is {ctx}; shorten it")
    return ids


def token_strings(tok, ids) -> list[str]:
    """Each token's own text (decoded alone, so byte-level markers become spaces)."""
    return [tok.decode([i]) for i in ids]


# ---------------------------------------------------------------------------------------------------------------
# attention


@torch.no_grad()
def attention_maps(model, ids: list[int]) -> torch.Tensor:
    """Attention weights of every layer and head for one sequence: (layers, heads, T, T), float32."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    head = "classify" if model.config.num_labels else "hidden"
    with capture_attention(model) as maps:
        model(x, head=head)
    return torch.stack([m[0] for m in maps]).float().cpu()


def attention_rollout(maps: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): heads averaged, the residual path added as identity, rows
    renormalised, layers multiplied from the first up. maps (L, H, T, T) -> (T, T)."""
    T = maps.shape[-1]
    eye = torch.eye(T)
    out = eye
    for layer in maps:
        a = residual * eye + (1 - residual) * layer.mean(0)
        a = a / a.sum(-1, keepdim=True)
        out = a @ out
    return out


# ---------------------------------------------------------------------------------------------------------------
# token view


@torch.no_grad()
def token_view(lm, ids: list[int], top_k: int = 5, n_prompt: int | None = None) -> dict:
    """Per token: its log-probability given the tokens before it, the entropy there and the top-k alternatives;
    plus the mean entropy. Tokens from n_prompt on are marked as generated."""
    model, tok = lm.model, lm.tokenizer
    if not model.config.causal or model.config.num_labels:
        raise ValueError("the token view needs a causal language model (not an encoder or a classifier)")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logp = model(x).float().log_softmax(-1)[0].cpu()  # (T, V): row t predicts token t + 1
    ent = -(logp.exp() * logp).nan_to_num().sum(-1)
    names = token_strings(tok, ids)
    rows = [{"token": names[0], "id": ids[0], "logprob": None, "entropy": None, "top": [], "generated": False}]
    for t in range(1, len(ids)):
        vals, idx = logp[t - 1].topk(top_k)
        rows.append({"token": names[t], "id": ids[t], "logprob": round(float(logp[t - 1, ids[t]]), 5),
                     "entropy": round(float(ent[t - 1]), 5),
                     "top": [[tok.decode([i]), round(float(v), 5)] for i, v in zip(idx.tolist(), vals.tolist())],
                     "generated": n_prompt is not None and t >= n_prompt})
    scored = [r for r in rows if r["logprob"] is not None]
    return {"tokens": rows, "mean_entropy": sum(r["entropy"] for r in scored) / len(scored) if scored else None,
            "mean_logprob": sum(r["logprob"] for r in scored) / len(scored) if scored else None}


# ---------------------------------------------------------------------------------------------------------------
# attributions


def _baseline(model, tok, x: torch.Tensor) -> torch.Tensor:
    # every token replaced by padding (or EOS), special tokens kept: the usual reference for text IG
    ref = next((i for i in (tok.pad_id, model.config.pad_token_id, tok.eos_id, 0) if i is not None and i >= 0), 0)
    special = torch.isin(x, torch.tensor(tok.all_special_ids or [-1], device=x.device))
    return torch.where(special, x, torch.full_like(x, ref))


def gradient_model(model) -> tuple[torch.nn.Module, str]:
    """(a model gradients flow through, its precision in words): the model itself, or for a weight-only quantized
    one (its int4/int8 kernels have no backward) a float32 copy with every weight dequantized exactly."""
    import copy


    if not quantize.is_quantized(model):
        return model, str(next(model.parameters()).dtype).removeprefix("torch.")
    methods = sorted({m.method for m in model.modules() if isinstance(m, quantize.QuantLinear)})
    return quantize.dequantize_model(copy.deepcopy(model), torch.float32), \
        f"float32 (weights dequantized from {'/'.join(methods)})"


def attributions(lm, ids: list[int], method: str = "ig", target=None, steps: int = 32) -> dict:
    """Per-token attributions of a classifier's label or a causal LM's next token, through captum on the token
    embeddings: LayerIntegratedGradients (with its convergence delta) or LayerGradientXActivation ("gxi").

    The target is the model's own prediction (unless given); a quantized model's attributions and the probability
    shown with them are computed on its weights dequantized to float32 (gradient_model), said in "precision"."""
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    model, tok = lm.model, lm.tokenizer
    cfg = model.config
    if method not in ("ig", "gxi"):
        raise ValueError(f"attribution method must be 'ig' or 'gxi', got {method!r}")
    if not cfg.num_labels and not cfg.causal:
        raise ValueError("attributions need a classifier or a causal language model")
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    was_training = model.training
    model.eval()

    def forward(inp, m=None):  # probability of every class / next token, (B, C)
        m = grad_model if m is None else m
        if cfg.num_labels:
            return m(inp, head="classify").float().softmax(-1)
        return m(inp, last_only=True)[:, -1].float().softmax(-1)

    with torch.no_grad():
        probs = forward(x, model)[0]  # what the model as loaded predicts
    if cfg.num_labels:
        names = [(cfg.id2label or {}).get(str(i), str(i)) for i in range(cfg.num_labels)]
        if target is None:
            t = int(probs.argmax())
        elif str(target) in names:
            t = names.index(str(target))
        elif str(target).isdigit() and int(target) < len(names):
            t = int(target)
        else:
            raise ValueError(f"--target {target!r} is not one of the labels {names}")
        label = names[t]
    else:
        if target is None:
            t = int(probs.argmax())
        else:
            tids = tok.encode(str(target), add_special_tokens=False)
            if len(tids) != 1:
                raise ValueError(f"--target {target!r} is {len(tids)} tokens; give a text that is one token")
            t = tids[0]
        label = tok.decode([t])
    grad_model, precision = gradient_model(model)
    if grad_model is not model:
        with torch.no_grad():
            probs = forward(x)[0]  # the probability the attributions explain
    out = {"method": method, "target": label, "target_id": t, "probability": round(float(probs[t]), 6),
           "precision": precision}
    try:
        if method == "ig":
            lig = LayerIntegratedGradients(forward, grad_model.embed_tokens)
            attr, delta = lig.attribute(x, baselines=_baseline(model, tok, x), target=t, n_steps=steps,
                                        internal_batch_size=min(steps, 16), return_convergence_delta=True)
            out["convergence_delta"] = round(float(delta.abs().max()), 6)
            out["steps"] = steps
        else:
            attr = LayerGradientXActivation(forward, grad_model.embed_tokens).attribute(x, target=t)
    finally:
        model.train(was_training)
    scores = attr[0].sum(-1).detach().float().cpu()  # (T,): summed over the embedding dimension
    out["scores"] = [round(float(s), 6) for s in scores]
    out["tokens"] = token_strings(tok, ids)
    return out


# ---------------------------------------------------------------------------------------------------------------
# output: PNGs, JSON, one HTML page


def plot_attention(maps: torch.Tensor, layers: list[int], heads: list[int], tokens: list[str], path) -> None:
    """A grid of heatmaps, one row per layer and one column per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(layers), len(heads)
    cell = max(0.9, min(2.2, 16 / max(rows, cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 0.6, rows * cell + 0.6), squeeze=False)
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(maps[layer, head].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {head}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=7)
    fig.suptitle(f"attention: {len(tokens)} tokens (rows: queries, columns: keys)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rollout(roll: torch.Tensor, tokens: list[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(tokens)
    size = min(14, 3 + T * 0.18)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(roll.numpy(), cmap="magma", interpolation="nearest")
    if T <= 64:
        labels = [repr(t)[1:-1][:12] for t in tokens]
        ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(T), labels, fontsize=6)
    ax.set_title("attention rollout")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_html(data: dict) -> str:
    """The self-contained page: the template with tokens.js and the data inlined."""
    page = (WEB / "explain.html").read_text(encoding="utf-8")
    blob = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")  # cannot close the script element
    return page.replace("/*TOKENS_JS*/", (WEB / "tokens.js").read_text(encoding="utf-8")).replace(
        "/*DATA*/null", blob)


def explain_to_folder(lm, text: str, out, layers=None, heads=None, attributions: str = "ig", steps: int = 32,
                      target=None, generate: int = 0, top_k: int = 5) -> list[Path]:
    """Everything `llmkit explain` writes, into a new folder: attention.png, rollout.png, explain.json,
    explain.html; returns the paths."""
    cfg = lm.config
    ids = encode(lm, text)
    layers = list(range(cfg.n_layer)) if layers is None else list(layers)
    heads = list(range(cfg.n_head)) if heads is None else list(heads)
    maps = attention_maps(lm.model, ids)
    roll = attention_rollout(maps)
    tokens = token_strings(lm.tokenizer, ids)
    sel = maps[layers][:, heads]  # (l, h, T, T)
    q = (sel.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # 1 byte per weight keeps the page small
    data = {"text": text, "tokens": tokens, "layers": layers, "heads": heads, "n_tokens": len(ids),
            "attention_b64": base64.b64encode(np.ascontiguousarray(q).tobytes()).decode(),
            "rollout": [[round(float(v), 4) for v in row] for row in roll]}
    if cfg.causal and not cfg.num_labels:
        seq, n_prompt = ids, None
        if generate:
            room = cfg.max_position_embeddings - len(ids)
            if room < 1:
                raise ValueError("the text fills the context; nothing can be generated after it")
            done = Engine(lm.model, lm.tokenizer).generate([ids], SamplingParams(max_new_tokens=min(generate, room),
                                                                                 temperature=0))[0]
            seq, n_prompt = ids + done.token_ids, len(ids)
        data["token_view"] = token_view(lm, seq, top_k=top_k, n_prompt=n_prompt)
    if attributions != "none" and (cfg.num_labels or cfg.causal):
        data["attributions"] = globals()["attributions"](lm, ids, attributions, target, steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "attention.png", out / "rollout.png", out / "explain.json", out / "explain.html"]
    plot_attention(maps, layers, heads, tokens, paths[0])
    plot_rollout(roll, tokens, paths[1])
    summary = {k: v for k, v in data.items() if k != "attention_b64"}
    summary["attention_shape"] = list(sel.shape)
    # how peaked each head is: the mean over queries of the largest weight (1.0: every query looks at one key)
    summary["attention_peak_per_layer_head"] = [[round(float(sel[i, j].max(-1).values.mean()), 4)
                                                 for j in range(sel.shape[1])] for i in range(sel.shape[0])]
    write_atomic(paths[2], json.dumps(summary, indent=1, ensure_ascii=False))
    write_atomic(paths[3], render_html(data))
    return paths
