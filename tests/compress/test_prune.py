"""Pruning: exact masks (per matrix, row and N:M group), Wanda and SparseGPT against direct computations, structured
pruning that transformers loads with the same logits, the prune / compare commands and their bad-input errors."""
import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.compress import prune as P
from llmkit.compress import sparsity as S
from llmkit.model.checkpoint import load_model, save_model
from llmkit.cli import main
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer
from llmkit.model.tokenizer import Tokenizer

DATA = Path(__file__).parents[1] / "data"
CALIB = DATA / "tinyshakespeare_head.txt"
REPORT = ["--wikitext", str(DATA / "wikitext2_test_excerpt.txt"), "--hellaswag", str(DATA / "hellaswag_val_8.jsonl"),
          "--eval-limit", "4", "--ppl-chars", "1000", "--decode-tokens", "4", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread (a busy 2-core machine makes torch's thread hand-offs cost more than the math)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE tokenizer trained in-process."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CALIB.read_text().splitlines(), trainer)
    return Tokenizer(hf, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>", add_bos_token=False)


def tiny(name, **kw):
    torch.manual_seed(0)
    return Transformer(preset(name, vocab_size=320, **kw)).eval()


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    save_model(out, tiny("llama-tiny", bos_token_id=1, eos_token_id=2), tok)
    return out


def samples(n=8, T=32):
    return torch.randint(3, 320, (n, T), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# masks


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 6), m=st.sampled_from([2, 4, 8]), data=st.data())
def test_nm_mask_keeps_exactly_n_of_every_group(rows, groups, m, data):
    n = data.draw(st.integers(1, m - 1))
    score = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(rows * 31 + groups))
    mask = S.keep_mask(score, 0.0, (n, m), per_row=False)
    g = mask.reshape(rows, groups, m)
    assert (g.sum(-1) == n).all()
    # the kept ones are the largest of their group
    s = score.reshape(rows, groups, m)
    assert (s.masked_fill(~g, float("inf")).min(-1).values >= s.masked_fill(g, -float("inf")).max(-1).values).all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 40), sparsity=st.floats(0.01, 0.99), per_row=st.booleans())
def test_unstructured_mask_drops_exactly_round_sparsity_times_size(rows, cols, sparsity, per_row):
    score = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows + 100 * cols))
    mask = S.keep_mask(score, sparsity, None, per_row=per_row)
    if per_row:
        assert ((~mask).sum(1) == round(sparsity * cols)).all()
    else:
        assert int((~mask).sum()) == round(sparsity * rows * cols)
        if mask.any() and (~mask).any():
            assert score[mask].min() >= score[~mask].max()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_every_matrix_has_the_exact_sparsity(method, pattern):
    model = tiny("llama-tiny")
    nm = S.parse_pattern(pattern)
    embed = model.embed_tokens.weight.clone()
    S.prune_unstructured(model, method, 0.6, nm, samples(), progress=False)
    for name, lin in S.block_linears(model):
        w = lin.weight
        if nm is None:
            if method == "wanda":  # compared per output row
                assert ((w == 0).sum(1) == round(0.6 * w.shape[1])).all(), name
            else:  # whole matrix (SparseGPT: per block of 128 columns; these matrices have <= 128)
                assert int((w == 0).sum()) == round(0.6 * w.numel()), name
        else:
            n, m = nm
            assert ((w.reshape(w.shape[0], -1, m) != 0).sum(-1) == n).all(), name
    assert torch.equal(model.embed_tokens.weight, embed)  # embeddings and norms untouched


def test_wanda_scores_weights_by_input_norms_of_the_calibration_text():
    model = tiny("llama-tiny")
    ids = samples()
    with torch.no_grad():
        x = model.layers[0].input_layernorm(model.embed_tokens(ids))  # what q_proj of block 0 reads
        norm = x.reshape(-1, x.shape[-1]).pow(2).sum(0).sqrt()
        w = model.layers[0].self_attn.q_proj.weight.clone()
    score = w.abs() * norm[None]
    expected = torch.ones_like(w, dtype=torch.bool)
    expected.scatter_(1, score.argsort(1)[:, :32], False)  # 50 % of 64 inputs per row
    S.prune_unstructured(model, "wanda", 0.5, None, ids, progress=False)
    assert torch.equal(model.layers[0].self_attn.q_proj.weight != 0, expected)
    assert not torch.equal(expected, S.keep_mask(w.abs(), 0.5, None, per_row=True))  # differs from magnitude


def test_sparsegpt_reconstructs_a_layer_better_than_wanda_and_magnitude():
    g = torch.Generator().manual_seed(0)
    # LLM-like inputs: features of very different scales (outlier features) sharing a common component
    scales = torch.rand(64, generator=g).mul(3).exp()
    X = torch.randn(512, 64, generator=g) * scales + 0.3 * torch.randn(512, 1, generator=g)
    W = torch.randn(32, 64, generator=g)
    H = 2 * X.T @ X / len(X)
    err = lambda M: float((X @ (W - M).T).pow(2).sum())  # noqa: E731  the layer's output error
    for nm in (None, (2, 4)):
        out = S.sparsegpt_prune(W, H, 0.5, nm)
        assert int((out == 0).sum()) == W.numel() // 2
        wanda = W * S.keep_mask(W.abs() * X.pow(2).sum(0).sqrt(), 0.5, nm, per_row=True)
        magnitude = W * S.keep_mask(W.abs(), 0.5, nm, per_row=False)
        assert err(out) < err(W * (out != 0))  # the OBS update lowers the error of its own mask
        assert err(out) < err(wanda) < err(magnitude)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "structured"])
def test_calibration_works_for_every_remainder_of_samples_by_batch_size(method):
    """Each batch keeps its own rope/mask: n samples in batches of 8 (a shorter last batch for most n) give what one
    batch of n gives (issue 27: the last batch's rope was reused for every batch, a size mismatch)."""
    for n in range(1, 18):
        ids = samples(n, 16)
        if method == "structured":
            got, ref = P.importance(tiny("llama-tiny"), ids, 8), P.importance(tiny("llama-tiny"), ids, n)
            for key in ref:
                torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=f"{key}, n={n}")
            continue
        got, ref = tiny("llama-tiny"), tiny("llama-tiny")
        S.prune_unstructured(got, method, 0.5, None, ids, batch_size=8, progress=False)
        S.prune_unstructured(ref, method, 0.5, None, ids, batch_size=n, progress=False)
        for (name, a), (_, b) in zip(S.block_linears(got), S.block_linears(ref)):
            assert torch.equal(a.weight != 0, b.weight != 0), f"{name}, n={n}"
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5, msg=f"{name}, n={n}")


@pytest.mark.parametrize("method,text_tokens", [("wanda", None), ("sparsegpt", 11 * 32 + 5)])
def test_prune_command_with_a_partial_last_calibration_batch(method, text_tokens, tmp_path, capsys):
    """The issue's command (10 samples of 32 tokens: batches of 8 and 2), and a text too short for the 10 asked
    (11 windows of 32 tokens asked 20: batches of 8 and 3), on a tiny model folder."""
    from helpers import make_tiny_model

    model = make_tiny_model(tmp_path / "m")
    calib = CALIB
    if text_tokens:
        tok = load_model(model).tokenizer
        calib = tmp_path / "short.txt"
        calib.write_text(tok.decode(tok.encode(CALIB.read_text(), add_special_tokens=False)[:text_tokens]))
    rc = main(["prune", "--model", str(model), "--method", method, "--sparsity", "0.5", "--calib-data", str(calib),
               "--calib-samples", "20" if text_tokens else "10", "--calib-seq-len", "32", "--no-report",
               "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    info = json.loads((tmp_path / "out" / "prune_config.json").read_text())
    assert rc == 0 and info["calib_samples"] == (11 if text_tokens else 10), err


def test_taps_give_every_module_its_own_class_back():
    """A tapped subclass of nn.Linear (a LoRALinear, say) keeps its forward while tapped and its class afterwards."""
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = tiny("llama-tiny")
    layer = model.layers[0]
    old = layer.mlp.down_proj
    layer.mlp.down_proj = Doubled(old.in_features, old.out_features, bias=False)
    layer.mlp.down_proj.load_state_dict(old.state_dict())
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = layer.mlp(x)
        seen = {}
        taps = S.Taps(layer, ["self_attn.o_proj", "mlp.down_proj"], lambda n, a: seen.__setitem__(n, a.shape))
        try:
            torch.testing.assert_close(layer.mlp(x), ref)
            layer(x, None, None, None, None)
        finally:
            taps.close()
        assert seen == {"self_attn.o_proj": (10, 64), "mlp.down_proj": (10, 128)}
        assert type(layer.mlp.down_proj) is Doubled and type(layer.self_attn.o_proj) is torch.nn.Linear
        taps = S.Taps(layer, ["mlp.down_proj"], lambda n, a: a)  # a callback's return value is not the output
        try:
            torch.testing.assert_close(layer.mlp(x), ref)
        finally:
            taps.close()


# ---------------------------------------------------------------------------------------------------------------
# structured


@pytest.mark.parametrize("name,targets,auto", [
    ("llama-tiny", ["heads", "mlp", "layers"], transformers.AutoModelForCausalLM),
    ("gpt2-tiny", ["mlp", "layers"], transformers.AutoModelForCausalLM),
    ("bert-tiny", ["mlp", "layers"], transformers.AutoModelForMaskedLM),
])
def test_structured_pruning_shrinks_the_config_and_transformers_agrees(name, targets, auto, tmp_path):
    model = tiny(name, n_layer=4) if name != "llama-tiny" else tiny(name, n_layer=4, n_head=4, n_kv_head=2)
    cfg = model.config
    plan = P.plan_structured(cfg, targets, 0.5)
    small = P.prune_structured(model, plan, samples())
    c = small.config
    assert c.n_layer == 2 and c.intermediate_size == cfg.intermediate_size // 2
    if "heads" in targets:
        assert (c.n_head, c.n_kv_head, c.head_dim) == (2, 1, cfg.head_dim)
    assert small.num_params() < model.num_params()
    save_model(tmp_path, small)
    hf = auto.from_pretrained(tmp_path).eval()
    ids = samples(2, 12)
    with torch.no_grad():
        ours = load_model(tmp_path).model(ids)
        assert (ours - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_structured_keeps_the_most_active_mlp_channels():
    model = tiny("llama-tiny")
    with torch.no_grad():  # make channel 5 of block 0 silent: it must be among the removed
        model.layers[0].mlp.up_proj.weight[5] = 0
    imp = P.importance(model, samples())
    assert imp["channels"][0, 5] == 0
    small = P.prune_structured(model, {"mlp": 64}, samples())
    kept = small.layers[0].mlp.down_proj.weight
    ref = model.layers[0].mlp.down_proj.weight
    cols = [j for j in range(128) if any(torch.equal(kept[:, i], ref[:, j]) for i in range(64))]
    assert 5 not in cols and len(cols) == 64


# ---------------------------------------------------------------------------------------------------------------
# commands


def test_prune_command_writes_model_config_and_report(llama_dir, tmp_path, capsys):
    out = tmp_path / "p24"
    rc = main(["prune", "--model", str(llama_dir), "--out", str(out), "--method", "wanda", "--pattern", "2:4",
               "--calib-data", str(CALIB), "--calib-samples", "4", "--calib-seq-len", "32", *REPORT])
    assert rc == 0
    lm = load_model(out)
    for _, lin in S.block_linears(lm.model):
        assert ((lin.weight.reshape(lin.weight.shape[0], -1, 4) != 0).sum(-1) == 2).all()
    info = json.loads((out / "prune_config.json").read_text())
    assert info["method"] == "wanda" and info["sparsity"] == 0.5 and info["calib_samples"] == 4
    rep = json.loads((out / "compress_report.json").read_text())
    before, after = rep["rows"]
    assert before["params"] == after["params"]
    linear = sum(lin.weight.numel() for _, lin in S.block_linears(lm.model))
    assert before["nonzero_params"] - after["nonzero_params"] == linear // 2
    assert abs(after["file_mb"] - before["file_mb"]) < 0.01  # stored plainly: the dense bytes
    assert after["wikitext_ppl"] > 1 and 0 <= after["hellaswag_acc_norm"] <= 1 and after["decode_tok_s"] > 0
    md = (out / "compress_report.md").read_text()
    assert "dense" in md and "CUDA" in md and "| before |" in md
    assert "| model | weights | params |" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["full", "lora"])
def test_structured_prune_with_recovery_through_the_training_loop(llama_dir, tmp_path, how):
    out = tmp_path / "s"
    flags = ["--model", str(llama_dir), "--method", "structured", "--target", "heads,mlp", "--ratio", "0.5",
             "--calib-data", str(CALIB), "--calib-samples", "4", "--calib-seq-len", "32", "--no-report",
             "--no-progress"]
    rc = main(["prune", "--out", str(out), *flags, "--recover", "3", "--recover-batch-size", "2",
               "--recover-method", how, "--recover-lr", "1e-2"])
    assert rc == 0
    cfg = load_model(out).config
    assert (cfg.n_head, cfg.n_kv_head, cfg.intermediate_size) == (2, 1, 64)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and "val_loss" in rows[-1]
    assert (out / "loss.png").is_file() and (out / "checkpoints").is_dir()
    from safetensors.torch import load_file

    recovered = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in recovered)  # lora: merged into a plain model folder
    assert main(["prune", "--out", str(tmp_path / "p"), *flags]) == 0
    plain = load_file(str(tmp_path / "p" / "model.safetensors"))
    assert set(plain) == set(recovered)
    moved = [k for k in plain if not torch.equal(plain[k], recovered[k])]
    assert any("q_proj" in k for k in moved)  # the recovery changed the block weights (LoRA: through the merge)
    if how == "lora":  # only the linears LoRA adapts moved; norms and embeddings are frozen
        assert all(k.endswith("proj.weight") for k in moved)
    assert json.loads((out / "prune_config.json").read_text())["recovery"]["method"] == how


def test_recovery_keeps_pruned_weights_at_zero(llama_dir, tmp_path):
    out = tmp_path / "m"
    rc = main(["prune", "--model", str(llama_dir), "--out", str(out), "--sparsity", "0.5", "--calib-data",
               str(CALIB), "--calib-seq-len", "32", "--recover", "3", "--recover-batch-size", "2",
               "--recover-lr", "1e-2", "--no-report", "--no-progress"])
    assert rc == 0
    pruned, base = load_model(out).model, load_model(llama_dir).model
    for (name, lin), (_, ref) in zip(S.block_linears(pruned), S.block_linears(base)):
        assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2, name
    # the recovery trained: the norms (never pruned) moved
    assert not torch.allclose(pruned.layers[0].input_layernorm.weight, base.layers[0].input_layernorm.weight)


def test_compare_prints_the_table_for_model_folders(llama_dir, tmp_path, capsys):
    rc = main(["compare", str(llama_dir), str(llama_dir), "--out", str(tmp_path / "r"), *REPORT])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"| {llama_dir.name} |" in out and f"| {llama_dir.name} (cached) |" in out  # measured once
    assert (tmp_path / "r" / "compress_report.md").is_file()


@pytest.mark.parametrize("flags,msg", [
    (["--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
    (["--sparsity", "0"], "--sparsity must be in (0, 1)"),
    (["--pattern", "3:5"], "not a multiple of 5"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "means sparsity 0.5"),
    (["--pattern", "banana"], "--pattern must be"),
    (["--method", "wanda", "--sparsity", "0.5"], "needs calibration text"),
    (["--method", "structured", "--target", "heads", "--ratio", "1.0"], "--ratio must be in (0, 1)"),
    (["--method", "structured", "--target", "heads", "--ratio", "0.9"], "remove every one of the 2"),
    (["--method", "structured", "--target", "wings"], "--target must be"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-data", "EMPTY"], "empty"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-data", "SHORT"], "too short"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-data", "missing.txt"], "not found"),
    (["--sparsity", "0.5", "--recover", "2", "--recover-method", "lora", "--calib-data", "SHORT"], "undo the sparsity"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(llama_dir, tmp_path, capsys, flags, msg):
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "SHORT").write_text("To be.")
    flags = [str(tmp_path / f) if f in ("EMPTY", "SHORT") else f for f in flags]
    if "structured" in flags and "--calib-data" not in flags:
        flags += ["--calib-data", str(CALIB)]
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(llama_dir), "--out", str(out), "--no-report", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_heads_of_a_gpt2_model_and_a_full_out_folder_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="head_dim"):
        P.plan_structured(preset("gpt2-tiny"), ["heads"], 0.5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    rc = main(["prune", "--model", "default", "--out", str(tmp_path / "full"), "--sparsity", "0.5"])
    assert rc == 2 and "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
