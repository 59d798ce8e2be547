"""Speculative decoding on the real default model: greedy tokens identical with speculation on and off, on a
copy-heavy prompt and an open chat prompt, on the int4 path with each kernel input forced (bf16: the default; float32:
torch's scalar loop, ~0.4 s a token, so its run is short) and on the float32 path."""
from pathlib import Path

import pytest
import torch

from llmkit.infer.engine import Engine, SamplingParams
from llmkit.infer.speculative import Speculation
from llmkit.model import quant as Q
from llmkit.model.checkpoint import load_model

PASSAGE = (Path(__file__).parents[1] / "data" / "wikitext2_test_excerpt.txt").read_text()[:420]
COPY = [{"role": "user", "content": "Repeat this text exactly:\n\n" + PASSAGE}]
CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def default_int4():
    return load_model("default", dtype="int4")


def _on_off(lm, prompt, n, chat=True):
    """Greedy tokens without and with n-gram speculation (one engine: the second run reads the prompt's cached
    blocks), and what speculation did."""
    eng = Engine(lm.model, lm.tokenizer, lm.generation_config, kv_cache_mb=64)
    p = SamplingParams(temperature=0, max_new_tokens=n)
    run = (lambda: eng.chat(prompt, p)) if chat else (lambda: eng.generate([prompt], p)[0])
    off = run()
    eng.speculation = Speculation("ngram", 4)
    on = run()
    return off, on, eng.speculation.stats


def test_int4_bf16_inputs_same_tokens(default_int4):
    Q.set_act_dtype(default_int4.model, torch.bfloat16)
    off, on, stats = _on_off(default_int4, COPY, 32)
    assert on.token_ids == off.token_ids and on.text == off.text
    assert stats["accepted"] >= 10, stats  # the copy is drafted and kept
    off, on, stats = _on_off(default_int4, CHAT, 24)
    assert on.token_ids == off.token_ids


def test_int4_float32_inputs_same_tokens(default_int4):
    Q.set_act_dtype(default_int4.model, torch.float32)
    try:
        off, on, stats = _on_off(default_int4, "Copy: the cat sat on the mat.\nCopy: the cat sat", 10, chat=False)
    finally:
        Q.set_act_dtype(default_int4.model, torch.bfloat16)
    assert on.token_ids == off.token_ids and stats["accepted"] >= 1, (off.text, stats)


def test_float32_same_tokens(default_lm):
    off, on, stats = _on_off(default_lm, COPY, 20)
    assert on.token_ids == off.token_ids and stats["accepted"] >= 5, stats
    off, on, _ = _on_off(default_lm, CHAT, 12)
    assert on.token_ids == off.token_ids
