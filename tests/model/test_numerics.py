"""Numerics (issue 20): float32 logits on every path, every kernel input dtype tested on every machine (forced, never
read from a measurement), the Q8_0 token table kept exact, answers that do not depend on the batch, and --dtype
auto choosing only among candidates that pass its quality probe."""
from pathlib import Path

import pytest
import torch

from llmkit.model import auto_dtype
from llmkit.model import quant as Q
from llmkit.model.checkpoint import default_gguf_path, load_model
from llmkit.model.config import preset
from llmkit.infer.engine import Engine, SamplingParams
from llmkit.model.logits import HEAD_MARGIN, head_logits
from llmkit.model.transformer import Transformer

DATA = Path(__file__).parents[1] / "data"
KERNEL_INPUTS = [torch.float32, torch.bfloat16]
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


def _exact(head, x):
    """The head in float32 from its exact stored weights: the reference every path must match on top tokens."""
    w = head.exact_rows(torch.arange(head.out_features)) if hasattr(head, "exact_rows") else head.weight.float()
    y = x.float() @ w.T
    return y if head.bias is None else y + head.bias.float()


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = preset("llama-tiny", vocab_size=512, tie_word_embeddings=True)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # logits spread like a trained model's (a random tiny head is nearly flat)
        m.embed_tokens.weight.mul_(40)
    return m


# ---------------------------------------------------------------------------------------------------------------
# float32 logits


@pytest.mark.parametrize("kernel_input", KERNEL_INPUTS, ids=["f32-in", "bf16-in"])
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 17, 40])
def test_quantized_head_logits_are_float32_and_exact_on_top(kernel_input, method, rows):
    m = _tiny()
    Q.quantize_model(m, method, 32)
    Q.set_act_dtype(m, kernel_input)
    x = torch.randn(rows, m.config.n_embd) * 3
    with torch.inference_mode():
        y = m.logits(x)
        ref = _exact(m.lm_head, x)
    assert y.dtype == torch.float32
    # every logit within HEAD_MARGIN of the best is the float32 value to float32 rounding; so is the argmax
    near = ref >= ref.amax(1, keepdim=True) - HEAD_MARGIN + 0.5
    assert torch.allclose(y[near], ref[near], rtol=1e-5, atol=1e-5)
    assert torch.equal(y.argmax(1), ref.argmax(1))
    # the rest within the fast kernel's bound (bf16 inputs and outputs: measured < 0.4 of 2^-8 (|w||x| + |y|))
    bound = 2 ** -8 * (ref.abs() + x.norm(dim=1, keepdim=True) * m.lm_head.exact_rows(
        torch.arange(m.lm_head.out_features)).norm(dim=1))
    assert ((y - ref).abs() <= bound).all()


@pytest.mark.parametrize("kernel_input", KERNEL_INPUTS, ids=["f32-in", "bf16-in"])
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_greedy_margin_keeps_the_argmax_exact(kernel_input, method, rows):
    """margin=0 (plain greedy rows): only the logits that could be the argmax are recomputed; the argmax and its
    logit are still the float32 ones, and every logit stays within the fast kernel's bound."""
    m = _tiny(seed=3)
    Q.quantize_model(m, method, 32)
    Q.set_act_dtype(m, kernel_input)
    for _ in range(5):
        x = torch.randn(rows, m.config.n_embd) * 3
        with torch.inference_mode():
            y = m.logits(x, margin=0.0)
        ref = _exact(m.lm_head, x)
        top = ref.argmax(1, keepdim=True)
        assert torch.equal(y.argmax(1, keepdim=True), top)
        assert torch.allclose(y.gather(1, top), ref.gather(1, top), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 17])
def test_bf16_weights_give_float32_logits_exact_on_top(rows):
    """bf16 weights: one or two rows take torch's bf16 GEMV (bf16 outputs), more a float32 GEMM; the logits are
    float32 and exact near the top either way, so the answer does not depend on how many rows ran."""
    m = _tiny().to(torch.bfloat16)
    x = torch.randn(rows, m.config.n_embd) * 3
    with torch.inference_mode():
        y = m.logits(x)
    ref = x @ m.lm_head.weight.float().T
    near = ref >= ref.amax(1, keepdim=True) - HEAD_MARGIN + 0.5
    assert y.dtype == torch.float32 and torch.allclose(y[near], ref[near], rtol=1e-5, atol=1e-5)
    assert torch.equal(y.argmax(1), ref.argmax(1))


def test_a_near_tie_goes_to_the_larger_float32_logit():
    """Today's defect in miniature: two logits 0.03 apart near 25 are equal once rounded to bf16 (step 0.125), and
    argmax took the lower id; the float32 head picks the larger one."""
    q = torch.zeros(64, 32, dtype=torch.int8)
    q[7], q[9] = 101, 101
    q[7, :1], q[9, :5] = 102, 102  # with x = 1 and the scale 2^-7 (exact in bf16): token 7 25.258, token 9 25.289
    head = Q.Int8Linear(q, torch.full((64,), 2.0 ** -7))  # both 25.25 once rounded to bf16
    head.set_act_dtype(torch.bfloat16)
    x = torch.ones(1, 32)
    assert head(x).to(torch.bfloat16)[0, 7] == head(x).to(torch.bfloat16)[0, 9]  # the kernel alone cannot tell
    with torch.inference_mode():
        assert int(head_logits(head, x).argmax()) == int(_exact(head, x).argmax()) == 9


# ---------------------------------------------------------------------------------------------------------------
# the default model on every kernel input


@pytest.fixture(scope="module")
def default_int4():
    return load_model("default", dtype="int4")


@pytest.mark.parametrize("kernel_input", KERNEL_INPUTS, ids=["f32-in", "bf16-in"])
def test_default_model_answers_paris_on_every_kernel_input(default_int4, kernel_input):
    Q.set_act_dtype(default_int4.model, kernel_input)
    try:
        out = Engine(default_int4.model, default_int4.tokenizer, default_int4.generation_config).chat(
            PARIS, SamplingParams(temperature=0, max_new_tokens=8))
    finally:
        Q.set_act_dtype(default_int4.model, torch.bfloat16)
    assert out.text.startswith("The capital of France is Paris"), out.text


def _top1_agreement(model, ref_top1, ids):
    with torch.inference_mode():
        return float((model(torch.tensor([ids]))[0].argmax(-1) == ref_top1[:len(ids)]).float().mean())


@pytest.fixture(scope="module")
def held_out(default_lm):
    """1,828 held-out WikiText-2 tokens and the float32 path's teacher-forced top-1 token at each."""
    ids = default_lm.tokenizer.encode((DATA / "wikitext2_test_2k_tokens.txt").read_text())
    with torch.inference_mode():
        return ids, default_lm.model(torch.tensor([ids]))[0].argmax(-1)


def test_int4_bf16_inputs_agree_with_float32_on_held_out_text(default_int4, held_out):
    """Measured 0.9902 on these 1,828 tokens (0.9736 before the table kept its Q8_0 blocks and the head its float32
    logits)."""
    ids, ref = held_out
    Q.set_act_dtype(default_int4.model, torch.bfloat16)
    assert len(ids) > 1800 and _top1_agreement(default_int4.model, ref, ids) >= 0.985


def test_int4_float32_inputs_are_the_float32_path(default_int4, held_out):
    """float32 kernel inputs compute what the float32 path computes (the same weights, float32 sums): every top
    token agrees. 48 tokens only: torch's float32 int4 CPU entry point is a scalar loop (~0.4 s a token here)."""
    ids, ref = held_out
    Q.set_act_dtype(default_int4.model, torch.float32)
    try:
        assert _top1_agreement(default_int4.model, ref, ids[:48]) == 1.0
    finally:
        Q.set_act_dtype(default_int4.model, torch.bfloat16)


def test_float32_default_is_the_gguf_exactly(default_lm, default_int4):
    """--dtype float32 of the default model is the GGUF dequantized exactly (not the rounded bf16 folder), and the
    int4 load's token table keeps its Q8_0 blocks: the embedding rows are the same numbers."""
    import gguf
    from gguf.quants import dequantize

    t = next(t for t in gguf.GGUFReader(str(default_gguf_path())).tensors if t.name == "token_embd.weight")
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(-1, t.shape[0]).astype("float32"))
    ids = torch.tensor([0, 1, 504, 60, 49151])
    assert torch.equal(default_lm.model.embed_tokens.weight[ids], ref[ids])
    assert torch.equal(default_int4.model.embed_tokens(ids), ref[ids])
    assert default_int4.model.lm_head.bq is not None  # the kernel's per-row copy is only for the fast shortlist


# ---------------------------------------------------------------------------------------------------------------
# int4 layers: saving never depends on the kernel input


@pytest.mark.parametrize("kernel_input", KERNEL_INPUTS, ids=["f32-in", "bf16-in"])
def test_int4_export_and_dequantize_are_float32_whatever_the_kernel_input(kernel_input):
    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.linspace(0.1, 3, 128)
    ref = Q.Int4Linear.from_float(w, 32, keep_portable=True)
    layer = Q.Int4Linear.from_float(w, 32)  # no portable copy: read back from the kernel's layout
    layer.set_act_dtype(kernel_input)
    out = layer.export()
    for k in ("qweight", "scales", "zeros"):
        assert torch.equal(out[k], ref.export()[k]), k
    assert out["scales"].dtype == torch.float32
    assert torch.equal(layer.dequantize(), ref.dequantize())


# ---------------------------------------------------------------------------------------------------------------
# batch invariance


PROMPTS = ["What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
           "Write a haiku about the sea.", "What is 12 times 12?", "Give me a synonym for happy.",
           "Why is the sky blue?", "Translate 'good morning' into Spanish.", "What is photosynthesis?",
           "List two uses of copper.", "Who wrote Romeo and Juliet?", "What does a thermometer measure?",
           "Suggest a name for a pet cat.", "What is the boiling point of water?",
           "Describe a rainbow in one sentence.", "What is the largest ocean on Earth?"]


def test_batch_invariant_answers_equal_alone_in_a_batch_and_beside_a_long_prefill(default_int4):
    lm = default_int4
    engine = Engine(lm.model, lm.tokenizer, lm.generation_config, batch_invariant=True)
    p = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    ids = [engine.chat_prompt_ids([{"role": "user", "content": q}]) for q in PROMPTS]
    long = lm.tokenizer.encode((DATA / "wikitext2_test_excerpt.txt").read_text())[:900]
    alone = [engine.generate([i], p)[0].token_ids for i in ids]
    batched = [c.token_ids for half in (ids[:8], ids[8:]) for c in engine.generate(half, p)]
    beside = [c.token_ids for half in (ids[:8], ids[8:]) for c in engine.generate([long] + half, p)[1:]]
    assert batched == alone and beside == alone


def test_batch_invariant_rows_compute_exactly_what_they_compute_alone():
    """A float32 model: the split-bmm path (up to 16 rows) and the plain GEMM sum in other orders; a batch-invariant
    row's sampled tokens and logprobs are bit-equal to the same request alone."""
    torch.manual_seed(0)
    m = Transformer(preset("llama-tiny", vocab_size=300)).eval()
    e = Engine(m, None, batch_invariant=True, prefix_caching=True)
    prompts = [[(7 * i + j) % 300 for j in range(5 + 3 * i)] for i in range(20)]
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3, logprobs=True)
    alone = [e.generate([q], params)[0] for q in prompts]
    together = e.generate(prompts, params)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.logprobs for c in together] == [c.logprobs for c in alone]


# ---------------------------------------------------------------------------------------------------------------
# --dtype auto: a probe before a stopwatch


@pytest.fixture()
def tiny_q4_gguf(tmp_path):
    from llmkit.model.gguf_export import export_gguf
    from helpers import make_tiny_model

    lm = load_model(make_tiny_model(tmp_path / "tiny"), dtype="float32")
    return export_gguf(lm, tmp_path / "tiny.q4_0.gguf", quant="q4_0")


def test_auto_records_the_probe_and_never_chooses_a_candidate_that_fails_it(tiny_q4_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(auto_dtype, "_load_avg", lambda: 0.0)
    real_top1 = auto_dtype.top1

    def broken_int4(model, ids):  # a CPU whose int4 kernels are wrong: every top token off by one
        top = real_top1(model, ids)
        return (top + 1) % model.config.vocab_size if Q.is_quantized(model) else top

    monkeypatch.setattr(auto_dtype, "top1", broken_int4)
    # int4 measures fastest, so only the probe can keep it out
    monkeypatch.setattr(auto_dtype, "time_decode_step",
                        lambda m, *a, **k: (1.0, 1.0, 0.1) if Q.is_quantized(m) else (5.0, 5.0, 0.5))
    lm = load_model(tiny_q4_gguf, dtype="auto")
    entry = auto_dtype.cached(tiny_q4_gguf, tiny_q4_gguf, "cpu")
    assert entry["choice"] in ("float32", "bfloat16") and not Q.is_quantized(lm.model)
    assert entry["probe"]["int4/bfloat16"] < auto_dtype.PROBE_MIN_AGREEMENT
    assert entry["probe"]["int4/float32"] < auto_dtype.PROBE_MIN_AGREEMENT
    assert entry["probe_tokens"] > 0 and entry["load_avg"] == [0.0, 0.0]


def test_auto_with_a_passing_probe_takes_the_fastest_and_info_shows_why(tiny_q4_gguf, tmp_path, monkeypatch,
                                                                        capsys):
    from llmkit.cli import main

    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(auto_dtype, "_load_avg", lambda: 0.0)
    monkeypatch.setattr(auto_dtype, "time_decode_step",
                        lambda m, *a, **k: (1.0, 1.0, 0.1) if Q.is_quantized(m) and m.lm_head.act_dtype == torch.float32
                        else (3.0, 3.0, 0.3))
    lm = load_model(tiny_q4_gguf, dtype="auto")
    entry = auto_dtype.cached(tiny_q4_gguf, tiny_q4_gguf, "cpu")
    assert (entry["choice"], entry["kernel_input"]) == ("int4", "float32")
    assert lm.model.lm_head.act_dtype == torch.float32  # the choice is applied, not only recorded
    assert list(entry["probe"]) == ["int4/float32"]  # the fastest passed: nothing slower was probed
    capsys.readouterr()
    assert main(["info", "--model", str(tiny_q4_gguf)]) == 0
    out = capsys.readouterr().out
    assert "int4 with float32 kernel inputs" in out and "load average 0.0-0.0" in out and "quality probe" in out


def test_a_disturbed_timing_is_not_cached(tiny_q4_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(auto_dtype, "_load_avg", lambda: 99.0)  # a machine far busier than its cores

    def never(*a, **k):
        raise AssertionError("a busy machine is not timed")

    monkeypatch.setattr(auto_dtype, "time_decode_step", never)
    lm = load_model(tiny_q4_gguf, dtype="auto")
    assert Q.is_quantized(lm.model) and lm.model.lm_head.act_dtype == torch.bfloat16  # the shipped format
    entry = auto_dtype.cached(tiny_q4_gguf, tiny_q4_gguf, "cpu")
    assert "choice" not in entry and "above the" in entry["disturbed"] and entry["probe"]
    monkeypatch.setattr(auto_dtype, "_load_avg", lambda: 0.0)
    monkeypatch.setattr(auto_dtype, "top1", lambda *a: (_ for _ in ()).throw(AssertionError("probed again")))
    lm = load_model(tiny_q4_gguf, dtype="auto")  # within the back-off: the shipped format again, untimed
    assert Q.is_quantized(lm.model) and "choice" not in auto_dtype.cached(tiny_q4_gguf, tiny_q4_gguf, "cpu")
    real_time = auto_dtype.time.time
    monkeypatch.setattr(auto_dtype.time, "time", lambda: real_time() + auto_dtype.RETRY_AFTER_S + 1)
    monkeypatch.setattr(auto_dtype, "time_decode_step", lambda m, *a, **k: (2.0, 2.0, 0.2))
    load_model(tiny_q4_gguf, dtype="auto")  # later and quiet: timed and cached, the probe's figures reused
    assert auto_dtype.cached(tiny_q4_gguf, tiny_q4_gguf, "cpu")["choice"] == "int4"


def test_a_noisy_timing_is_disturbed():
    assert auto_dtype._noisy({"int4/bfloat16": (1.0, 2.0, 0.1)})
    assert auto_dtype._noisy({"int4/bfloat16": (1.0, 1.2, 0.1)}) is None


def test_a_dense_head_changed_after_its_first_logits_is_measured_again():
    """The bound's row norms are cached per weight version: a bf16 head trained (changed in place) after decoding
    still gets exact top logits."""
    m = _tiny().to(torch.bfloat16)
    x = torch.randn(1, m.config.n_embd) * 3
    with torch.inference_mode():
        m.logits(x)
    with torch.no_grad():
        m.lm_head.weight.mul_(3)  # a training step in place: larger rows, so the old norms would bound too little
    with torch.inference_mode():
        y = m.logits(x)
    ref = x @ m.lm_head.weight.float().T
    near = ref >= ref.amax(1, keepdim=True) - HEAD_MARGIN + 0.5
    assert torch.allclose(y[near], ref[near], rtol=1e-5, atol=1e-5) and torch.equal(y.argmax(1), ref.argmax(1))


def test_plain_greedy_tokens_equal_the_full_margin_ones(default_int4):
    """The decode core refines only the argmax's candidates for plain greedy rows; asking for logprobs (full margin)
    gives the same tokens."""
    e = Engine(default_int4.model, default_int4.tokenizer, default_int4.generation_config)
    msgs = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    plain = e.chat(msgs, SamplingParams(temperature=0, max_new_tokens=48))
    full = e.chat(msgs, SamplingParams(temperature=0, max_new_tokens=48, logprobs=True))
    assert plain.token_ids == full.token_ids
