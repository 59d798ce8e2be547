"""llmkit finetune --task tag, llmkit tag and llmkit eval tag, end to end on a tiny model: the JSON's figures equal
seqeval's on the written predictions; bad input is one line on stderr and exit 2."""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_tiny_model
from llmkit.cli import main

WIKIANN = Path(__file__).parents[1] / "data" / "wikiann_en_train_40.conll"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_tag")
    base = make_tiny_model(d / "base")
    assert main(["finetune", "--model", str(base), "--data", str(WIKIANN), "--val-data", str(WIKIANN), "--out",
                 str(d / "run"), "--task", "tag", "--max-steps", "6", "--batch-size", "8", "--lr", "5e-3",
                 "--max-length", "64", "--no-progress"]) == 0
    return d / "run"


def test_tag_prints_entities(tagger, capsys, monkeypatch):
    text = "Karl Ove Knausgård lives in Oslo ."
    assert main(["tag", "--model", str(tagger), "--json", text]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    r = json.loads(line)
    assert r["text"] == text and isinstance(r["entities"], list)
    for e in r["entities"]:
        assert set(e) == {"start", "end", "type", "text", "score"} and text[e["start"]:e["end"]] == e["text"]
        assert e["type"] in ("PER", "LOC", "ORG")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{text}\n\nOslo\n"))
    assert main(["tag", "--model", str(tagger)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # one line per text, blank lines skipped


def test_eval_tag_equals_seqeval_on_its_predictions(tagger, tmp_path, capsys):
    seqeval = pytest.importorskip("seqeval.metrics")
    out, pred = tmp_path / "r.json", tmp_path / "p.conll"
    assert main(["eval", "tag", "--model", str(tagger), "--data", str(WIKIANN), "--out", str(out), "--predictions",
                 str(pred), "--no-progress"]) == 0
    assert "micro" in capsys.readouterr().out
    res = json.loads(out.read_text())
    golds, preds = [], []
    for block in pred.read_text().strip("\n").split("\n\n"):
        rows = [line.split("\t") for line in block.splitlines()]
        golds.append([g for _, g, _ in rows])
        preds.append([p for _, _, p in rows])
    assert len(golds) == res["n"] == 40
    assert res["n_pred"] > 0  # the model predicts entities: the comparison is not vacuous
    assert res["precision"] == pytest.approx(seqeval.precision_score(golds, preds), abs=1e-12)
    assert res["recall"] == pytest.approx(seqeval.recall_score(golds, preds), abs=1e-12)
    assert res["f1"] == pytest.approx(seqeval.f1_score(golds, preds), abs=1e-12)
    rep = seqeval.classification_report(golds, preds, output_dict=True, zero_division=0)
    for t, v in res["per_type"].items():
        assert v["f1"] == pytest.approx(rep[t]["f1-score"], abs=1e-12) and v["support"] == rep[t]["support"]


def test_bad_input_is_one_line_exit_2(tagger, tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("Paris\tB-LOC\nis\tO\nnice\tPOSITIVE\n")
    cmd = [sys.executable, "-m", "llmkit", "eval", "tag", "--model", str(tagger), "--data", str(bad)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"llmkit eval: error: {bad} line 3: tag 'POSITIVE' is not IOB2/IOBES "
                                             "(O, B-TYPE, I-TYPE, E-TYPE or S-TYPE)"]


def test_other_errors(tagger, tmp_path, capsys):
    base = tagger.parent / "base"
    assert main(["tag", "--model", str(base), "x"]) == 2
    assert "not a token tagger" in capsys.readouterr().err
    assert main(["classify", "--model", str(tagger), "x"]) == 2
    assert "is a token tagger" in capsys.readouterr().err
    assert main(["generate", "--model", str(tagger), "x"]) == 2
    assert "is a token tagger (7 labels), not a language model; use `llmkit tag`" in capsys.readouterr().err
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"tokens": ["a", "b"], "tags": ["O"]}\n')
    assert main(["finetune", "--model", str(base), "--data", str(bad), "--task", "tag", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"llmkit finetune: error: {bad} line 1: 2 tokens but 1 tags" and not (tmp_path / "o").exists()
