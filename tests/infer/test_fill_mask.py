"""llmkit fill-mask and llmkit.infer.fill_mask: the same candidates and scores as transformers' fill-mask pipeline,
on a BertForMaskedLM written by transformers and on a folder from `llmkit pretrain --objective mlm`."""
import json
import os
from pathlib import Path

import pytest

from helpers import make_tiny_bert, make_tiny_model
from llmkit.cli import main
from llmkit.infer.fill_mask import fill_mask
from llmkit.model.checkpoint import load_model

SHAKESPEARE = Path(__file__).parents[1] / "data" / "tinyshakespeare_head.txt"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlm") / "run"
    assert main(["pretrain", "--data", str(SHAKESPEARE), "--out", str(out), "--objective", "mlm", "--vocab-size", "300",
                 "--block-size", "32", "--batch-size", "8", "--max-steps", "6", "--eval-every", "0", "--lr", "2e-3",
                 "--warmup-steps", "2", "--no-progress", "--log-every", "3"]) == 0
    return out


def reference(folder, texts, top_k):
    """transformers' fill-mask pipeline on the folder: a list (per text) of lists (per mask) of candidates."""
    import transformers

    os.environ["HF_HUB_OFFLINE"] = "1"
    pipe = transformers.pipeline("fill-mask", model=str(folder), tokenizer=str(folder), top_k=top_k, device="cpu")
    out = []
    for t in texts:
        r = pipe(t)
        out.append([r] if r and isinstance(r[0], dict) else r)
    return out


def assert_same(ours, ref, texts):
    assert [r["text"] for r in ours] == texts
    for o, r in zip(ours, ref):
        assert len(o["predictions"]) == len(r)
        for om, rm in zip(o["predictions"], r):
            assert [c["token"] for c in om] == [c["token"] for c in rm]
            assert [c["token_str"] for c in om] == [c["token_str"] for c in rm]
            assert [c["sequence"] for c in om] == [c["sequence"] for c in rm]
            assert max(abs(a["score"] - b["score"]) for a, b in zip(om, rm)) < 1e-4


@pytest.mark.parametrize("which", ["bert_dir", "mlm_dir"])
def test_same_as_transformers_pipeline(which, request):
    folder = request.getfixturevalue(which)
    lm = load_model(folder, dtype="float32")
    mask = lm.tokenizer.special_tokens["mask_token"]
    texts = [f"The king is {mask} of the land.", f"Good {mask}, my lord.",
             f"{mask} shall I {mask} thee to a summer's day?",  # two masks: each its own top-k from one forward
             f"What say you, my {mask}? I have heard it said that you are a man of the {mask} sort."]
    ours = fill_mask(lm.model, lm.tokenizer, texts, top_k=7, batch_size=3)  # padded batches of unequal lengths
    assert_same(ours, reference(folder, texts, 7), texts)
    assert [len(r["predictions"]) for r in ours] == [1, 1, 2, 2]
    assert all(len(m) == 7 for r in ours for m in r["predictions"])


def test_aliases_mean_the_mask_token(bert_dir, mlm_dir):
    for folder in (bert_dir, mlm_dir):
        lm = load_model(folder, dtype="float32")
        mask = lm.tokenizer.special_tokens["mask_token"]
        a, b, c = (fill_mask(lm.model, lm.tokenizer, [f"Good {m}, my lord."], top_k=3)[0]["predictions"]
                   for m in (mask, "[MASK]", "<mask>"))
        assert a == b == c


def test_cli_json_and_table(bert_dir, capsys, monkeypatch):
    texts = ["Good [MASK], my lord.", "[MASK] shall I <mask> thee?"]
    assert main(["fill-mask", "--model", str(bert_dir), "--top-k", "3", "--json", *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts and [len(r["predictions"]) for r in rows] == [1, 2]
    for r in rows:
        for m in r["predictions"]:
            assert len(m) == 3 and all(set(c) == {"token", "token_str", "score", "sequence"} for c in m)
            assert [c["score"] for c in m] == sorted((c["score"] for c in m), reverse=True)
    ref = reference(bert_dir, ["Good [MASK], my lord."], 3)[0][0]
    assert [c["token"] for c in rows[0]["predictions"][0]] == [c["token"] for c in ref]

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Good [MASK], my lord.\n\n[MASK] shall I go?\n"))
    assert main(["fill-mask", "--model", str(bert_dir), "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Good [MASK], my lord." and "[MASK] shall I go?" in out and len(out) == 2 * (1 + 1 + 2)


def test_errors_are_one_line(bert_dir, tmp_path, capsys):
    causal = make_tiny_model(tmp_path / "causal")
    cases = [(["--model", str(bert_dir), "no mask here"], "no mask token"),
             (["--model", str(causal), "Good [MASK]."], "causal"),
             (["--model", str(bert_dir), "--top-k", "0", "Good [MASK]."], "--top-k")]
    for argv, words in cases:
        assert main(["fill-mask", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("llmkit fill-mask: error:") and words in err[-1] and "Traceback" not in "".join(err)


def test_tokenizer_without_mask_token(tmp_path, capsys):
    from llmkit.model.checkpoint import save_model
    from llmkit.model.config import preset
    from llmkit.model.transformer import Transformer

    tok = load_model(make_tiny_model(tmp_path / "c"), dtype="float32").tokenizer  # byte-level BPE, no mask token
    save_model(tmp_path / "enc", Transformer(preset("bert-tiny", vocab_size=tok.vocab_size)), tok)
    assert main(["fill-mask", "--model", str(tmp_path / "enc"), "Good [MASK]."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no mask token" in err[0]
