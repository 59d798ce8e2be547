"""Time of attention maps and integrated gradients for a 128-token input on the default model, llmkit against
transformers on the same float32 weights.

Attention maps: llmkit's math path (capture_attention, every layer and head) against transformers' eager attention
with output_attentions=True; a plain forward through SDPA is timed too (the cost of asking for weights). Integrated
gradients: captum's LayerIntegratedGradients on the token embeddings, --steps steps, the same baseline and target,
through llmkit's model and through the transformers model. Runs alternate; best of --repeats. Also checks that the
two sets of attention maps agree. Writes benchmarks/results/explain_speed.json.

    flock /tmp/llmkit-bench.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/explain_speed.py [--steps 32]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmkit.model.checkpoint import export_hf, load_model
from llmkit.utils.io import write_results
from llmkit.eval.explain import _baseline, attention_maps

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "explain_speed.json"))
    args = ap.parse_args()
    import transformers
    from captum.attr import LayerIntegratedGradients

    torch.set_grad_enabled(True)
    lm = load_model("default", dtype="float32")
    text = DATA.read_text(encoding="utf-8") if DATA.exists() else "The quick brown fox jumps over the lazy dog. " * 40
    ids = lm.tokenizer.encode(text)[: args.tokens]
    x = torch.tensor([ids])
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(lm, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="eager",
                                                               torch_dtype=torch.float32).eval()

    def ours_maps():
        return attention_maps(lm.model, ids)

    def hf_maps():
        with torch.no_grad():
            return torch.stack([a[0] for a in hf(input_ids=x, output_attentions=True).attentions])

    def plain():
        with torch.no_grad():
            return lm.model(x, head="hidden")

    res = {}
    for _ in range(args.repeats):  # alternate: the same machine load for both
        for name, fn in (("llmkit_attention_maps", ours_maps), ("transformers_eager_attentions", hf_maps),
                         ("llmkit_forward_sdpa_no_weights", plain)):
            t, out = best_of(fn, 1)
            res[name] = min(res.get(name, t), t)
            if name == "llmkit_attention_maps":
                ours_out = out
            elif name == "transformers_eager_attentions":
                hf_out = out
    max_diff = float((ours_out - hf_out).abs().max())

    target = int(lm.model(x, last_only=True)[0, -1].argmax())
    base = _baseline(lm.model, lm.tokenizer, x)

    def ig(model, layer, fwd):
        lig = LayerIntegratedGradients(fwd, layer)
        attr, delta = lig.attribute(x, baselines=base, target=target, n_steps=args.steps,
                                    internal_batch_size=min(args.steps, 16), return_convergence_delta=True)
        return attr.sum(-1)[0], float(delta.abs().max())

    ours_fwd = lambda inp: lm.model(inp, last_only=True)[:, -1].float().softmax(-1)
    hf_fwd = lambda inp: hf(input_ids=inp).logits[:, -1].float().softmax(-1)
    for _ in range(max(1, args.repeats - 1)):
        t, (a_ours, d_ours) = best_of(lambda: ig(lm.model, lm.model.embed_tokens, ours_fwd), 1)
        res["llmkit_integrated_gradients"] = min(res.get("llmkit_integrated_gradients", t), t)
        t, (a_hf, d_hf) = best_of(lambda: ig(hf, hf.get_input_embeddings(), hf_fwd), 1)
        res["transformers_integrated_gradients"] = min(res.get("transformers_integrated_gradients", t), t)
    result = {"benchmark": f"explain speed, {len(ids)} tokens, default model (SmolLM2-135M, float32, CPU)",
              "seconds": {k: round(v, 3) for k, v in res.items()},
              "ratio_attention_transformers_over_llmkit": round(res["transformers_eager_attentions"]
                                                                / res["llmkit_attention_maps"], 2),
              "ratio_ig_transformers_over_llmkit": round(res["transformers_integrated_gradients"]
                                                         / res["llmkit_integrated_gradients"], 2),
              "attention_max_abs_diff_vs_transformers": max_diff,
              "ig_steps": args.steps, "ig_convergence_delta": {"llmkit": d_ours, "transformers": d_hf},
              "ig_attribution_max_abs_diff": float((a_ours - a_hf).abs().max()),
              "note": "machine shared with other jobs: compare the ratios measured in this run",
              "command": " ".join(["benchmarks/explain_speed.py", *sys.argv[1:]])}
    write_results(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
