"""Entity-level scores (eval/tag.py) equal seqeval's default mode: chunks, micro and per-type P/R/F1, on random
IOB2/IOBES sequences (well-formed or not) and on a real tagger's written predictions; seqeval is the reference only."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit.eval.tag import entity_scores, write_predictions
from llmkit.infer.tag import entity_spans

seqeval = pytest.importorskip("seqeval")
pytestmark = pytest.mark.filterwarnings("ignore")  # seqeval warns on empty classes and divisions by 0
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score  # noqa: E402
from seqeval.metrics.sequence_labeling import get_entities  # noqa: E402

IOB2 = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
IOBES = IOB2 + ["E-PER", "S-PER", "E-LOC", "S-LOC", "E-ORG", "S-ORG"]
sentence = st.lists(st.sampled_from(IOBES), min_size=0, max_size=12)
iob2 = st.lists(st.sampled_from(IOB2), min_size=1, max_size=12)


def _pairs(tagset):
    return st.lists(st.integers(1, 12).flatmap(lambda n: st.tuples(
        st.lists(st.sampled_from(tagset), min_size=n, max_size=n),
        st.lists(st.sampled_from(tagset), min_size=n, max_size=n))), min_size=1, max_size=8)


@settings(max_examples=500, deadline=None)
@given(sentence)
def test_chunks_equal_seqeval(tags):
    assert entity_spans(tags) == get_entities(tags)


def _check(pairs):
    golds, preds = [list(g) for g, _ in pairs], [list(p) for _, p in pairs]
    ours = entity_scores(golds, preds)
    assert ours["precision"] == pytest.approx(precision_score(golds, preds), abs=1e-12)
    assert ours["recall"] == pytest.approx(recall_score(golds, preds), abs=1e-12)
    assert ours["f1"] == pytest.approx(f1_score(golds, preds), abs=1e-12)
    assert ours["accuracy"] == pytest.approx(accuracy_score(golds, preds), abs=1e-12)
    rep = classification_report(golds, preds, output_dict=True, zero_division=0)
    types = {k: v for k, v in rep.items() if not k.endswith(" avg")}
    assert set(types) == set(ours["per_type"])
    for t, v in types.items():
        o = ours["per_type"][t]
        assert (o["precision"], o["recall"], o["f1"], o["support"]) == pytest.approx(
            (v["precision"], v["recall"], v["f1-score"], v["support"]), abs=1e-12)
    if types:
        for avg in ("macro", "weighted"):
            for m, k in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
                assert ours[f"{avg}_{m}"] == pytest.approx(rep[f"{avg} avg"][k], abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(_pairs(IOB2))
def test_scores_equal_seqeval_iob2(pairs):
    _check(pairs)


@settings(max_examples=300, deadline=None)
@given(_pairs(IOBES))
def test_scores_equal_seqeval_iobes(pairs):
    _check(pairs)


def test_known_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    m = entity_scores(gold, pred)
    assert (m["precision"], m["recall"], m["n_correct"]) == (2 / 3, 2 / 3, 2)
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    with pytest.raises(ValueError, match="differ in number"):
        entity_scores(gold, pred[:1])


def test_predictions_file_layout(tmp_path):
    f = tmp_path / "p.conll"
    write_predictions(f, [["Ann", "sat"], ["Rome"]], [["B-PER", "O"], ["B-LOC"]], [["B-PER", "O"], ["O"]])
    assert f.read_text() == "Ann\tB-PER\tB-PER\nsat\tO\tO\n\nRome\tB-LOC\tO\n\n"
