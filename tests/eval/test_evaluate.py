"""Evaluation: parity with lm-evaluation-harness's HF backend, metrics against sacrebleu / rouge-score, bad input.

The parity tests build a tiny random Llama with transformers, save it with a tiny BPE tokenizer trained here, and
score the same requests with llmkit (which loads that HF folder) and with lm-eval's HFLM methods called directly.
"""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # lm-eval / transformers must never reach a hub here
os.environ["HF_DATASETS_OFFLINE"] = "1"

from llmkit import cli  # noqa: E402

from llmkit.eval import evaluate

from llmkit.eval import metrics

DATA = Path(__file__).parents[1] / "data"
HELLASWAG = DATA / "hellaswag_val_8.jsonl"
WIKITEXT = DATA / "wikitext2_test_excerpt.txt"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A transformers LlamaForCausalLM folder with a 1000-token byte-level BPE trained on the WikiText excerpt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_hf")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([WIKITEXT.read_text()], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    hf_tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # large weights: peaked distributions, so no near-ties between choices
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hflm(tiny_hf):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_hf), dtype="float32", batch_size=8, device="cpu", max_length=128)


@pytest.fixture(scope="module")
def ours(tiny_hf):
    from llmkit.model.checkpoint import load_model

    return load_model(str(tiny_hf), dtype="float32")


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _run_cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------------------------
# parity with lm-eval's HF backend


def test_choice_equals_lm_eval_hf_backend(tiny_hf, hflm, tmp_path, capsys):
    records = [json.loads(line) for line in HELLASWAG.read_text().splitlines()]
    requests = [(r["query"], " " + c) for r in records for c in r["choices"]]  # lm-eval's target_delimiter
    theirs = [ll for ll, _ in hflm.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)]
    # lm-eval multiple_choice: acc = argmax ll, acc_norm = argmax ll / len(choice), acc_bytes by UTF-8 bytes
    acc, acc_norm, acc_bytes = [], [], []
    for i, r in enumerate(records):
        ll = np.array(theirs[4 * i:4 * i + 4])
        acc.append(np.argmax(ll) == r["label"])
        acc_norm.append(np.argmax(ll / np.array([len(c) for c in r["choices"]])) == r["label"])
        acc_bytes.append(np.argmax(ll / np.array([len(c.encode()) for c in r["choices"]])) == r["label"])

    out = tmp_path / "choice.json"
    rc, stdout, _ = _run_cli(["eval", "choice", "--model", str(tiny_hf), "--data", str(HELLASWAG),
                              "--out", str(out), "--batch-size", "5", "--no-progress"], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n"] == 8
    assert res["acc"] == np.mean(acc) and res["acc_norm"] == np.mean(acc_norm)
    assert res["acc_bytes"] == np.mean(acc_bytes)
    assert res["acc_ci"][0] <= res["acc"] <= res["acc_ci"][1]
    assert 0 <= res["ece"] <= res["mce"] <= 1 and 0 <= res["brier"] <= 2
    assert (tmp_path / "choice.reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "| acc_norm |" in stdout


def test_loglikelihoods_equal_hf_backend(ours, hflm):
    records = [json.loads(line) for line in HELLASWAG.read_text().splitlines()][:4]
    requests = [(r["query"], " " + c) for r in records for c in r["choices"]]
    requests += [("", "The end."), ("Trailing space ", "moves"), (records[0]["query"], " x")]  # HFLM edge cases
    theirs = hflm.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    mine = evaluate.loglikelihood(ours.model, ours.tokenizer, requests, batch_size=3)
    for (a, ga), (b, gb) in zip(theirs, mine):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-4)
        assert ga == gb


def test_perplexity_equals_lm_eval_rolling(tiny_hf, ours, capsys, tmp_path):
    from lm_eval.models.huggingface import HFLM

    text = WIKITEXT.read_text()
    hf48 = HFLM(pretrained=str(tiny_hf), dtype="float32", batch_size=8, device="cpu", max_length=48)
    (ll,) = hf48.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    out = tmp_path / "ppl.json"
    rc, _, _ = _run_cli(["eval", "perplexity", "--model", str(tiny_hf), "--data", str(WIKITEXT), "--context", "48",
                         "--out", str(out), "--no-progress"], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    n_bytes = len(text.encode("utf-8"))
    assert res["n_bytes"] == n_bytes and res["n_words"] == len(__import__("re").split(r"\s+", text))
    assert res["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-4)
    assert res["word_perplexity"] == pytest.approx(math.exp(-ll / res["n_words"]), rel=1e-4)
    assert res["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-4)
    assert 0 < res["mean_top1_prob"] <= 1 and res["mean_token_entropy"] > 0
    # overlapping windows (more context per token) still score every token exactly once
    strided = evaluate.evaluate_perplexity(ours, WIKITEXT, context=48, stride=16)
    assert strided["n_tokens"] == res["n_tokens"]


@pytest.mark.parametrize("n,ctx", [(1, 4), (4, 4), (5, 4), (9, 4), (37, 8), (100, 7)])
def test_rolling_windows_match_lm_eval(n, ctx):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, -1, ctx, 1)]
    seq = [-1] + tokens
    mine = []
    for a, e, k in evaluate.rolling_windows(n, ctx, ctx):
        inp = seq[a:e]
        mine.append((inp[:len(inp) - (k - 1)], seq[e - k + 1:e + 1]))  # (context, continuation) as lm-eval
    assert mine == theirs


def test_lm_eval_adapter_registered(tiny_hf, hflm):
    from lm_eval.api.registry import get_model

    from llmkit.eval.lm_eval import LlmkitLM

    assert get_model("llmkit") is LlmkitLM
    lm = LlmkitLM.create_from_arg_string(f"pretrained={tiny_hf},dtype=float32,batch_size=4,max_length=128")
    requests = [("Robert is an", " English actor"), ("He had a", " guest role")]
    for (a, _), (b, _) in zip(hflm.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True),
                              lm.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-4)
    text = WIKITEXT.read_text()[:1500]
    (a,) = hflm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    (b,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert b == pytest.approx(a, rel=1e-5)
    gens = lm.generate_until(_instances("generate_until", [("Robert", {"until": ["\n"], "max_gen_toks": 6})]))
    assert isinstance(gens[0], str) and "\n" not in gens[0]


# ---------------------------------------------------------------------------------------------------------------
# text metrics, generation, classification


def test_text_metrics_equal_sacrebleu_and_rouge_score():
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = ["the cat sat on the mat", "a quick brown fox", "hello there world"]
    refs = [["the cat is on the mat", "a cat sat on the mat"], ["the quick brown fox jumps"], ["hello there world"]]
    res = metrics.text_metrics(hyps, refs)
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert res["bleu"] == sacrebleu.corpus_bleu(hyps, streams).score
    assert res["chrf"] == sacrebleu.corpus_chrf(hyps, streams).score
    assert res["bleu_signature"].startswith("nrefs:var|")  # references per item vary
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = np.mean([max(scorer.score(r, h)[key].fmeasure for r in rr) for h, rr in zip(hyps, refs)])
        assert res[key] == pytest.approx(want, abs=1e-12)
    assert res["exact_match"] == pytest.approx(1 / 3)


def test_generate_eval_end_to_end(tiny_hf, tmp_path, capsys):
    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Robert is", "reference": "an English actor"},
        {"prompt": "He had a", "references": ["guest role", "starring role"]},
    ]))
    out = tmp_path / "gen.json"
    rc, stdout, _ = _run_cli(["eval", "generate", "--model", str(tiny_hf), "--data", str(data), "--out", str(out),
                              "--max-new-tokens", "5", "--no-progress"], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["generations"]) == 2
    assert res == {**res, **{k: v for k, v in metrics.text_metrics(
        res["generations"], [["an English actor"], ["guest role", "starring role"]]).items()}}
    assert "bleu: nrefs:var|" in stdout


@pytest.fixture(scope="module")
def tiny_classifier(tiny_hf, tmp_path_factory):
    from llmkit.model.checkpoint import save_model
    from llmkit.model.config import preset
    from llmkit.model.transformer import Transformer
    from llmkit.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_hf)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, num_labels=3, pad_token_id=1,
                 id2label={"0": "neg", "1": "neu", "2": "pos"})
    out = tmp_path_factory.mktemp("clf")
    save_model(out, Transformer(cfg), tok)
    return out


def test_classify_metrics_and_plots(tiny_classifier, tmp_path, capsys):
    from sklearn.metrics import confusion_matrix, f1_score, precision_score

    data = tmp_path / "clf.tsv"
    rows = [("a fine film", 2), ("dull", 0), ("it was ok", 1), ("great acting", 2), ("awful plot", 0),
            ("fine", 1), ("bad", 0), ("superb", 2)]
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    out = tmp_path / "clf.json"
    rc, stdout, _ = _run_cli(["eval", "classify", "--model", str(tiny_classifier), "--data", str(data),
                              "--out", str(out), "--no-progress"], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    golds, preds = [y for _, y in rows], res["predictions"]
    assert res["macro_f1"] == pytest.approx(f1_score(golds, preds, average="macro", labels=[0, 1, 2],
                                                     zero_division=0))
    assert res["macro_precision"] == pytest.approx(precision_score(golds, preds, average="macro", labels=[0, 1, 2],
                                                                   zero_division=0))
    assert res["confusion_matrix"] == confusion_matrix(golds, preds, labels=[0, 1, 2]).tolist()
    assert set(res["per_class"]) == {"neg", "neu", "pos"}
    for png in (res["confusion_png"], res["reliability_png"]):
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    assert "| macro_f1 |" in stdout


def test_calibration_and_bootstrap_known_values():
    # two bins used (15 bins): conf 0.95 x2 (1 right), conf 0.55 x2 (both right)
    cal = metrics.calibration([0.95, 0.95, 0.55, 0.55], [1, 0, 1, 1], n_bins=15)
    assert cal["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert cal["mce"] == pytest.approx(0.45)
    assert sum(b["count"] for b in cal["bins"]) == 4 and len(cal["bins"]) == 15
    assert metrics.brier_score([[0.7, 0.3], [0.2, 0.8]], [0, 0]) == pytest.approx((0.09 + 0.09 + 0.64 + 0.64) / 2)
    ci = metrics.bootstrap_ci([0, 1] * 50)
    assert ci == metrics.bootstrap_ci([0, 1] * 50) and ci[0] < 0.5 < ci[1]


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line naming the record, exit code 2, before the model loads


@pytest.mark.parametrize("task,content,message", [
    ("choice", '{"query": "q", "choices": ["a", "b"], "label": 0}\n{"query": "q", "label": 0}\n',
     "record 2: missing field 'choices'"),
    ("choice", '{"query": "q", "choices": ["a", "b"], "label": 2}\n', "record 1: label 2 is out of range"),
    ("choice", '{"query": "q", "choices": [], "label": 0}\n', "record 1: 'choices' is empty"),
    ("choice", b'{"query": "q", "choices": ["a"], "label": 0}\n\n{"query": "\xff"}\n', "record 2 (line 3): not UTF-8"),
    ("perplexity", "", "the file is empty"),
    ("perplexity", b"good line\nbad \xff byte\n", "line 2: not UTF-8"),
    ("generate", '{"prompt": "p"}\n', "record 1: missing field 'reference'"),
])
def test_bad_input_one_line_exit_2(task, content, message, tmp_path, capsys):
    data = tmp_path / ("bad.txt" if task == "perplexity" else "bad.jsonl")
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, _, err = _run_cli(["eval", task, "--model", str(tmp_path / "no-model-needed"), "--data", str(data)], capsys)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_classify_label_out_of_range(tiny_classifier, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "ok", "label": 1}\n{"text": "x", "label": 7}\n')
    rc, _, err = _run_cli(["eval", "classify", "--model", str(tiny_classifier), "--data", str(data)], capsys)
    assert rc == 2 and "record 2: label 7 is out of range" in err.strip().splitlines()[-1]


def test_macro_f1_over_all_classes_and_over_present_ones():
    from sklearn.metrics import f1_score

    golds, preds = [0, 0, 1, 1], [0, 1, 1, 1]  # class 2 of the model is absent from both
    m = metrics.classification_metrics(golds, preds, ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(f1_score(golds, preds, average="macro", labels=[0, 1, 2], zero_division=0))
    assert m["macro_f1_present"] == pytest.approx(f1_score(golds, preds, average="macro", zero_division=0))
    assert m["macro_f1_present"] > m["macro_f1"] and "absent" in m["macro_over"]


def test_one_label_reader_for_integer_string_and_non_contiguous_labels():
    from llmkit.data.sft import label_ids, label_name

    assert [label_name(v) for v in (1, "1", " 2 ", "pos", 2.5)] == ["1", "1", "2", "pos", "2.5"]
    assert label_ids(["1", "2", "1"], ["1", "2"]) == [0, 1, 0]  # integer names are names, never indices
    assert label_ids(["7", "3", "10"], ["3", "7", "10"]) == [1, 0, 2]  # non-contiguous
    assert label_ids(["pos", "neg"], ["neg", "pos"]) == [1, 0]
    assert label_ids(["0", "2"], ["neg", "neu", "pos"]) == [0, 2]  # indices only when no class name is an integer
    with pytest.raises(ValueError, match="record 2: label '0' is not one of the model's labels"):
        label_ids(["1", "0"], ["1", "2"])
    with pytest.raises(ValueError, match="record 1: label 'bad' is not one of"):
        label_ids(["bad"], ["neg", "pos"])


def test_finetune_and_eval_read_labels_alike(tiny_hf, tmp_path, capsys):
    from llmkit.data.sft import read_classification

    words = ["good film", "bad plot", "fine acting", "dull story"]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"{w} {i}", "label": y}) + "\n"
                             for i, (w, y) in enumerate(zip(words * 3, [1, 2, 5] * 4))))
    out = tmp_path / "clf"
    assert cli.main(["finetune", "--model", str(tiny_hf), "--data", str(train), "--task", "classify", "--method",
                     "full", "--out", str(out), "--max-steps", "1", "--batch-size", "4", "--val-fraction", "0.25",
                     "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "1", "1": "2", "2": "5"}
    # the eval reader gives finetune's class ids for the same file, JSON numbers or strings alike
    _, ids, _ = read_classification(train)
    assert [r["label"] for r in evaluate.load_classify_records(train, labels=["1", "2", "5"])] == ids
    as_strings = tmp_path / "strings.jsonl"
    as_strings.write_text(train.read_text().replace('"label": 1', '"label": "1"'))
    assert [r["label"] for r in evaluate.load_classify_records(as_strings, labels=["1", "2", "5"])] == ids
    capsys.readouterr()
    res_path = tmp_path / "res.json"
    rc, _, err = _run_cli(["eval", "classify", "--model", str(out), "--data", str(train), "--out", str(res_path),
                           "--no-progress"], capsys)
    assert rc == 0, err
    res = json.loads(res_path.read_text())
    assert {k: v["support"] for k, v in res["per_class"].items()} == {"1": 4, "2": 4, "5": 4}
    only_one = tmp_path / "ones.jsonl"
    only_one.write_text(json.dumps({"text": "good film", "label": 1}) + "\n")
    rc, _, err = _run_cli(["eval", "classify", "--model", str(out), "--data", str(only_one), "--out",
                           str(res_path), "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads(res_path.read_text())["per_class"]["1"]["support"] == 1  # class "1", not the index 1 ("2")


# ---------------------------------------------------------------------------------------------------------------
# the real default model


def test_default_model_prefers_the_sensible_choice(default_lm, tmp_path):
    data = tmp_path / "easy.jsonl"
    data.write_text(json.dumps({"query": "The capital of France is", "choices": ["a purple banana.", "Paris."],
                                "label": 1}) + "\n" + json.dumps(
        {"query": "Water boils at one hundred degrees", "choices": ["Celsius.", "horses."], "label": 0}) + "\n")
    res = evaluate.evaluate_choice(default_lm, data)
    assert res["acc"] == 1.0 and res["predictions"] == [1, 0]


def test_example_task_yaml_runs_offline_with_lm_eval(tiny_hf, tmp_path, monkeypatch, capsys):
    # README's local HellaSwag task: lm-eval reads the JSONL with no Hub, and scores as `llmkit eval choice` does
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llmkit.eval.lm_eval import LlmkitLM

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)  # the YAML's data_files is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = TaskManager(include_path=str(root / "examples" / "lm_eval"), include_defaults=False)  # no task index
    lm = LlmkitLM.create_from_arg_string(f"pretrained={tiny_hf},dtype=float32,batch_size=8")
    out = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag_local"], task_manager=tasks)
    res = out["results"]["hellaswag_local"]
    rc, _, err = _run_cli(["eval", "choice", "--model", str(tiny_hf), "--data", str(HELLASWAG), "--dtype", "float32",
                           "--out", str(tmp_path / "ours.json"), "--no-progress"], capsys)
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert (res["acc,none"], res["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    assert ours["n"] == 8


@pytest.mark.parametrize("kind", ["bert", "classifier"])
def test_log_likelihood_evaluations_refuse_encoders_and_classifiers(kind, tmp_path):
    # an encoder's or a classifier's "perplexity" would be a number without meaning
    from llmkit.model.checkpoint import LoadedModel
    from llmkit.model.config import preset
    from llmkit.model.transformer import Transformer
    from llmkit.data.tokenizer_train import train_tokenizer

    tok = train_tokenizer([WIKITEXT], 300)
    cfg = preset("bert-tiny" if kind == "bert" else "llama-tiny", vocab_size=tok.vocab_size,
                 **({} if kind == "bert" else {"num_labels": 2}))
    lm = LoadedModel(Transformer(cfg), tok, {}, kind)
    match = "masked" if kind == "bert" else "classifier"
    with pytest.raises(ValueError, match=match):
        evaluate.evaluate_perplexity(lm, WIKITEXT)
    with pytest.raises(ValueError, match=match):
        evaluate.evaluate_choice(lm, HELLASWAG)
    with pytest.raises(ValueError, match="limit 0"):
        evaluate.evaluate_choice(LoadedModel(Transformer(preset("llama-tiny", vocab_size=tok.vocab_size)), tok, {},
                                             "lm"), HELLASWAG, limit=0)
