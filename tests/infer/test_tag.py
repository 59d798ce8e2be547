"""infer/tag.py: a tagger's word tags and entities with character offsets into the raw text."""
import pytest
import torch

from helpers import make_tiny_model
from llmkit.infer.tag import predict_tags, tag_texts
from llmkit.model import lora as lora_lib
from llmkit.model.checkpoint import load_model

TAGS = ["O", "B-PER", "I-PER", "B-LOC"]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    lm = load_model(make_tiny_model(tmp_path_factory.mktemp("t") / "m"), dtype="float32")
    lora_lib.add_classifier(lm.model, dict(enumerate(TAGS)), tagger=True)
    return lm


def _force(lm, tag):
    """Make the head say `tag` for every token, whatever the input."""
    with torch.no_grad():
        lm.model.score.weight.zero_()
        lm.model.score.bias.copy_(torch.tensor([10.0 if t == tag else 0.0 for t in TAGS]))


def test_entities_and_offsets(tagger):
    texts = ["  Karl Ove Knausgård, born 1968.", "Oslo"]
    _force(tagger, "I-PER")  # I- after O opens an entity and I- continues it: one entity per text
    out = tag_texts(tagger.model, tagger.tokenizer, texts)
    assert [r["text"] for r in out] == texts
    for r, t in zip(out, texts):
        (e,) = r["entities"]
        assert (e["type"], e["start"], e["end"], e["text"]) == ("PER", len(t) - len(t.lstrip()), len(t), t.strip())
        assert 0.99 < e["score"] <= 1
    _force(tagger, "B-PER")  # B- opens a new entity at every word
    (r,) = tag_texts(tagger.model, tagger.tokenizer, ["Karl Ove, born"])
    assert [(e["start"], e["end"], e["text"]) for e in r["entities"]] == [(0, 4, "Karl"), (5, 8, "Ove"), (8, 9, ","),
                                                                        (10, 14, "born")]
    _force(tagger, "O")
    assert tag_texts(tagger.model, tagger.tokenizer, ["Karl Ove", ""])[1] == {"text": "", "entities": []}


def test_words_beyond_max_length_are_o(tagger):
    _force(tagger, "B-LOC")
    (tags,) = predict_tags(tagger.model, tagger.tokenizer, [["Oslo"] * 40], max_length=8)
    assert tags[0][0] == "B-LOC" and tags[-1] == ("O", 0.0)


def test_only_taggers(tmp_path):
    lm = load_model(make_tiny_model(tmp_path / "m"), dtype="float32")
    with pytest.raises(ValueError, match="no token-classification head"):
        predict_tags(lm.model, lm.tokenizer, [["a"]])
