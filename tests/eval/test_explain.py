"""Explain: the attention math path against SDPA and transformers, rollout, token view, captum attributions,
the CLI, and the HTML pages (explain's and the chat page's token view) in headless Chromium."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from llmkit.model.checkpoint import load_model, save_model
from llmkit.model.config import preset
from llmkit.eval.explain import attention_maps, attention_rollout, attributions, token_view
from llmkit.model.transformer import Transformer, attention_math, capture_attention

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def tiny(name):
    torch.manual_seed(0)
    kw = dict(vocab_size=99, n_layer=2, n_embd=32, n_head=4, max_position_embeddings=64)
    if name == "llama-gqa":
        return Transformer(preset("llama-tiny", **kw, n_kv_head=2, intermediate_size=64)).eval()
    if name == "gpt2":
        return Transformer(preset("gpt2-tiny", **kw)).eval()
    return Transformer(preset("bert-tiny", **kw, intermediate_size=64)).eval()


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "bert"])
def test_math_path_equals_sdpa_with_padding(name):
    model = tiny(name)
    ids = torch.randint(1, 99, (2, 12))
    mask = torch.ones_like(ids)
    if name == "bert":
        mask[1, -4:] = 0  # right padding for the encoder
    else:
        mask[1, :4] = 0  # left padding for decoders
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, head="hidden")
        with capture_attention(model) as maps:
            ours = model(ids, attention_mask=mask, head="hidden")
    assert len(maps) == 2 and maps[0].shape == (2, 4, 12, 12)
    keep = mask.bool()
    assert (ours[keep] - ref[keep]).abs().max() <= 1e-5
    for w in maps:
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 12))
        assert w[1][..., ~keep[1]][:, keep[1]].abs().max() == 0  # real queries never look at padding
        if name != "bert":
            assert w.triu(1).abs().max() == 0  # causal
    # and without a mask (the is_causal branch), for the function alone
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    y, _ = attention_math(q, k, v, None, True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (y - sdpa).abs().max() <= 1e-5


def test_attention_weights_match_transformers_eager(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2,
                                                                attn_implementation="eager")).eval()
    hf.save_pretrained(tmp_path / "hf")
    lm = load_model(tmp_path / "hf", dtype="float32")
    ids = torch.randint(1, 99, (1, 10))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_attentions=True).attentions
    ours = attention_maps(lm.model, ids[0].tolist())
    assert ours.shape == (2, 4, 10, 10)
    for layer in range(2):
        assert (ours[layer] - ref[layer][0]).abs().max() <= 1e-5


def test_rollout_rows_are_distributions():
    maps = torch.softmax(torch.randn(3, 4, 7, 7), -1)
    r = attention_rollout(maps)
    assert torch.allclose(r.sum(-1), torch.ones(7), atol=1e-5)
    eye = torch.eye(7).expand(2, 3, 7, 7)
    assert torch.allclose(attention_rollout(eye), torch.eye(7))


@pytest.fixture(scope="module")
def tiny_lm(default_lm):
    """A tiny random Llama with the default model's tokenizer (so text goes in), context 48."""
    from llmkit.model.checkpoint import LoadedModel

    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=default_lm.config.vocab_size, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                 intermediate_size=64, max_position_embeddings=48)
    return LoadedModel(Transformer(cfg).eval(), default_lm.tokenizer, {}, "tiny")


def test_token_view_logprobs_and_entropy(tiny_lm):
    ids = tiny_lm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    view = token_view(tiny_lm, ids, top_k=3)
    with torch.no_grad():
        logp = tiny_lm.model(torch.tensor([ids])).log_softmax(-1)[0]
    rows = view["tokens"]
    assert len(rows) == len(ids) and rows[0]["logprob"] is None
    for t in range(1, len(ids)):
        assert abs(rows[t]["logprob"] - logp[t - 1, ids[t]].item()) < 1e-4
        assert abs(rows[t]["entropy"] + (logp[t - 1].exp() * logp[t - 1]).sum().item()) < 1e-3
        assert len(rows[t]["top"]) == 3 and rows[t]["top"][0][1] >= rows[t]["top"][1][1]
    assert view["mean_entropy"] == pytest.approx(sum(r["entropy"] for r in rows[1:]) / (len(ids) - 1))


def test_integrated_gradients_completeness_and_gxi(tiny_lm):
    ids = tiny_lm.tokenizer.encode("Paris is the capital of")
    a = attributions(tiny_lm, ids, "ig", steps=64)
    assert len(a["scores"]) == len(ids) and a["convergence_delta"] < 0.01 * max(1e-3, a["probability"]) + 1e-4
    # completeness: the attributions add up to f(input) - f(baseline)
    from llmkit.eval.explain import _baseline

    x = torch.tensor([ids])
    with torch.no_grad():
        f = lambda inp: tiny_lm.model(inp, last_only=True)[:, -1].softmax(-1)[0, a["target_id"]].item()
        gap = f(x) - f(_baseline(tiny_lm.model, tiny_lm.tokenizer, x))
    assert abs(sum(a["scores"]) - gap) <= a["convergence_delta"] + 1e-5
    g = attributions(tiny_lm, ids, "gxi")
    assert len(g["scores"]) == len(ids) and "convergence_delta" not in g
    with pytest.raises(ValueError, match="one token"):
        attributions(tiny_lm, ids, "gxi", target="two words")


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_attributions_of_a_quantized_model_run_on_its_dequantized_weights(tiny_lm, method):
    """The int4/int8 kernels have no backward (issue 20: `derivative for aten::_weight_int8pack_mm is not
    implemented`): attributions run on a float32 copy with the weights dequantized; the model stays quantized."""
    import copy

    from llmkit.model.checkpoint import LoadedModel
    from llmkit.eval.explain import _baseline
    from llmkit.model.quant import dequantize_model, is_quantized, quantize_model

    qmodel = copy.deepcopy(tiny_lm.model)
    quantize_model(qmodel, method)
    qlm = LoadedModel(qmodel, tiny_lm.tokenizer, {}, "tiny-q")
    ids = tiny_lm.tokenizer.encode("Paris is the capital of")
    a = attributions(qlm, ids, "ig", steps=64)
    assert is_quantized(qmodel)  # untouched
    assert a["precision"] == f"float32 (weights dequantized from {method})"
    assert len(a["scores"]) == len(ids) and all(np.isfinite(a["scores"])) and any(s != 0 for s in a["scores"])
    with torch.no_grad():
        want = int(qmodel(torch.tensor([ids]), last_only=True)[0, -1].argmax())
    assert a["target_id"] == want  # the quantized model's own prediction is what gets explained
    # they are the float32 dequantized model's attributions: completeness against it
    ref = dequantize_model(copy.deepcopy(qmodel))
    x = torch.tensor([ids])
    with torch.no_grad():
        f = lambda inp: ref(inp, last_only=True)[:, -1].softmax(-1)[0, a["target_id"]].item()
        gap = f(x) - f(_baseline(ref, tiny_lm.tokenizer, x))
    assert a["probability"] == pytest.approx(f(x), abs=1e-6)
    assert abs(sum(a["scores"]) - gap) <= a["convergence_delta"] + 1e-5
    g = attributions(qlm, ids, "gxi")
    assert all(np.isfinite(g["scores"])) and g["precision"] == a["precision"]
    assert attributions(tiny_lm, ids, "gxi")["precision"] == "float32"


def test_readme_explain_example_on_the_default_model(tmp_path):
    """The README's first explain example. --dtype int4 is what `auto` loads the default model in on the machines
    this was written on; given here so that the test skips auto's one-time timing (tens of seconds) and always
    takes the quantized path."""
    r = llmkit("explain", "The capital of France is", "--out", str(tmp_path / "why"), "--generate", "5",
               "--dtype", "int4")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "attributions (ig) computed in float32 (weights dequantized from int4" in r.stderr
    data = json.loads((tmp_path / "why" / "explain.json").read_text())
    a = data["attributions"]
    assert a["target"] == " Paris" and len(a["scores"]) == data["n_tokens"] == 5
    assert all(np.isfinite(a["scores"])) and a["convergence_delta"] < 0.01
    assert "Paris" in "".join(t["token"] for t in data["token_view"]["tokens"][5:])


def test_classifier_attributions(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, type_vocab_size=2, num_labels=2))
    hf.save_pretrained(tmp_path / "cls")
    from llmkit.model.checkpoint import LoadedModel

    lm = load_model(tmp_path / "cls", dtype="float32")

    class Tok:  # the random HF folder has no tokenizer: ids are given directly
        pad_id, eos_id, all_special_ids = 0, None, [0]

        def decode(self, ids):
            return f"t{ids[0]}"

    lm = LoadedModel(lm.model, Tok(), {}, "cls")
    ids = [5, 17, 33, 8, 60]
    a = attributions(lm, ids, "ig", target=1, steps=64)
    assert a["target_id"] == 1 and len(a["scores"]) == 5 and a["convergence_delta"] < 1e-3
    with pytest.raises(ValueError, match="not one of the labels"):
        attributions(lm, ids, "ig", target="nope")


# ---------------------------------------------------------------------------------------------------------------
# CLI and pages


def llmkit(*args):
    return subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def explained(tmp_path_factory, tiny_lm):
    """`llmkit explain` run on a tiny model folder carrying the default tokenizer."""
    root = tmp_path_factory.mktemp("explain")
    save_model(root / "m", tiny_lm.model, tokenizer=tiny_lm.tokenizer)
    r = llmkit("explain", "The capital of France is Paris", "--model", str(root / "m"), "--out", str(root / "out"),
               "--generate", "4", "--steps", "8")
    assert r.returncode == 0, r.stderr
    return root


def test_explain_cli_outputs_and_errors(explained):
    out = explained / "out"
    assert {p.name for p in out.iterdir()} == {"attention.png", "rollout.png", "explain.json", "explain.html"}
    data = json.loads((out / "explain.json").read_text())
    T = data["n_tokens"]
    assert T == len(data["tokens"]) == 6  # "The capital of France is Paris"
    assert data["attention_shape"] == [2, 4, T, T] and len(data["token_view"]["tokens"]) == T + 4
    assert "convergence_delta" in data["attributions"]
    m = str(explained / "m")
    fresh = str(explained / "new")
    for args, needle in [(["x " * 80, "--out", fresh], "context is 48"),
                         (["hi", "--layers", "5", "--out", fresh], "out of range"),
                         (["hi", "--heads", "a-b", "--out", fresh], "--heads"),
                         (["", "--out", fresh], "empty"),
                         (["hi", "--out", str(out)], "not an empty folder")]:
        r = llmkit("explain", *args, "--model", m)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len([x for x in r.stderr.splitlines() if "error" in x]) == 1
    assert not Path(fresh).exists()


CHROMIUM = Path("/usr/bin/chromium")
needs_browser = pytest.mark.skipif(not CHROMIUM.exists() and os.environ.get("CI", "") not in ("1", "true"),
                                   reason="no /usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions",
        "--disable-background-networking", "--no-first-run"]


@needs_browser
def test_explain_page_in_chromium(explained, tmp_path):
    from playwright.sync_api import sync_playwright

    page_file = explained / "out" / "explain.html"
    data = json.loads((explained / "out" / "explain.json").read_text())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_file.as_uri())
        T = data["n_tokens"]
        assert page.locator("#queries .att-tok").count() == T and page.locator("#keys .att-tok").count() == T
        assert page.locator("#token-view .tok").count() == len(data["token_view"]["tokens"])
        assert page.locator("#attr-view .attr-tok").count() == T
        page.hover("#queries .att-tok >> nth=3")
        assert page.locator("#lines line").count() >= 1
        page.hover("#token-view .tok >> nth=2")
        assert page.locator("#tok-tip").is_visible() and "p=" in page.locator("#tok-tip").inner_text()
        page.select_option("#layer", "1")
        page.check("#rollout")
        page.screenshot(path=str(tmp_path / "explain.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert all(u.startswith("file:") or u.startswith("data:") for u in requests), requests
    assert (tmp_path / "explain.png").stat().st_size > 10_000


@needs_browser
def test_chat_page_token_view_toggle(default_lm, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from llmkit.serve.app import BackgroundServer, ServeConfig

    srv = BackgroundServer(ServeConfig(models={"default": default_lm}, port=0, max_batch=2))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url + "/")
            expect(page.locator("#status")).to_contain_text("ready", timeout=60_000)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.fill("#input", "What is the capital of France?")
            page.press("#input", "Enter")
            expect(page.locator("#send")).to_be_enabled(timeout=90_000)
            reply = page.locator(".msg.assistant").last
            assert reply.locator(".tok").count() == 0
            page.check("#token-view")
            n = reply.locator(".tok").count()
            assert 1 <= n <= 12 and "".join(reply.locator(".tok").all_inner_texts()).strip()
            reply.locator(".tok").first.hover()
            assert page.locator("#tok-tip").is_visible()
            page.screenshot(path=str(tmp_path / "chat-tokens.png"))
            page.uncheck("#token-view")
            assert reply.locator(".tok").count() == 0
            browser.close()
        assert not errors, errors
    finally:
        srv.stop()
