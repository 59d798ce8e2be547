"""llmkit as an lm-evaluation-harness model named `llmkit`, so any lm-eval task runs on llmkit's model and engine.

lm-eval 0.4 finds models in its own registry and has no plugin entry point, so `lm_eval --model llmkit` works
only in a process that imported this module. Run lm-eval through it instead; the arguments are lm-eval's own:

    llmkit lm-eval --model llmkit --model_args pretrained=default --batch_size 32 --tasks hellaswag --limit 100
    python -m llmkit.eval.lm_eval --model llmkit ...   # the same, without the llmkit CLI

`pretrained` is anything `llmkit.model.checkpoint.load_model` takes (a model folder, a .gguf file, or "default");
other model_args: dtype, device, max_length, max_gen_toks. The batch size is lm-eval's own --batch_size flag
(its default is 1: pass 32 or so, it counts continuation rows per forward).
"""
from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llmkit.eval import evaluate
from llmkit.infer.engine import Engine, SamplingParams
from llmkit.model.checkpoint import load_model


@register_model("llmkit")
class LlmkitLM(LM):
    """loglikelihood, loglikelihood_rolling and generate_until on llmkit's Transformer and Engine."""

    def __init__(self, pretrained="default", dtype=None, device="cpu", batch_size=32, max_length=None,
                 max_gen_toks=256, **kwargs):
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's CLI asks for cuda by default; fall back as its HF backend does
        self.lm = load_model(pretrained, dtype=dtype, device=device)
        self.model, self.tok = self.lm.model, evaluate._need_tokenizer(self.lm)
        # lm-eval passes batch_size as a string ("8", or "auto" which we treat as the default)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self._engine = None

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.path).replace("/", "__")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request, choices sharing their context's forward pass."""
        pairs = [req.args for req in requests]
        return evaluate.loglikelihood(self.model, self.tok, pairs, batch_size=self.batch_size,
                                      max_length=self.max_length, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text in disjoint windows of max_length tokens (HFLM's rolling windows)."""
        out = []
        prefix = evaluate.prefix_token_id(self.tok)
        for req in requests:
            (text,) = req.args
            tokens = evaluate.tok_encode(self.tok, text)
            r = evaluate.rolling_loglikelihood(self.model, tokens, prefix, self.max_length,
                                               batch_size=max(1, self.batch_size // 4))
            out.append(r["loglikelihood"])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if do_sample) continuations cut at the first stop string, through llmkit's Engine."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tok, self.lm.generation_config)
        out = []
        for context, gen_kwargs in (req.args for req in requests):
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok.decode([self.tok.eos_id]) if self.tok.eos_id is not None else None
            if eos and eos not in until:  # HFLM stops at EOS text too
                until.append(eos)
            max_new = int(kw.get("max_gen_toks", kw.get("max_new_tokens", self.max_gen_toks)))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ids = evaluate.tok_encode(self.tok, context)
            ids = ids[-(self.max_length - max_new):]  # HFLM left-truncates the context to leave room
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, stop=[u for u in until if u],
                                    top_p=float(kw.get("top_p", 1.0)), top_k=int(kw.get("top_k", 0) or 0))
            out.append(self._engine.generate([ids], params)[0].text)
        return out

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """Render lm-eval's few-shot chat history with the model's own chat template."""
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False) -> str | None:
        return self.tok.chat_template if chat_template else None


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's own command line with the `llmkit` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
