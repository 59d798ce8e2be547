"""Tagged data (data/conll.py): CoNLL and JSONL readers, their one-line errors, first-sub-token alignment."""
import json
from pathlib import Path

import pytest

from helpers import make_tiny_bert, make_tiny_model
from llmkit.data.conll import parse_conll, read_tagged, tag_examples, tag_set
from llmkit.data.corpus import IGNORE
from llmkit.data.sft import detect_task, read_task_data
from llmkit.infer.tag import encode_words, split_words
from llmkit.model.tokenizer import Tokenizer

WIKIANN = Path(__file__).parents[1] / "data" / "wikiann_en_train_40.conll"


def test_wikiann_excerpt_reads():
    sents = read_tagged(WIKIANN)
    assert len(sents) == 40
    assert sents[0] == (["R.H.", "Saunders", "(", "St.", "Lawrence", "River", ")", "(", "968", "MW", ")"],
                        ["B-ORG", "I-ORG", "O", "B-ORG", "I-ORG", "I-ORG", "O", "O", "O", "O", "O"])
    assert list(tag_set(t for _, t in sents).values()) == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    data, kind = read_task_data(WIKIANN)
    assert detect_task(data, kind) == "tag"


def test_conll_tolerates_spaces_docstart_and_extra_columns():
    text = "-DOCSTART- -X- O O\n\nEU NNP B-NP S-ORG\nrejects VBZ B-VP O\n\n\nPeter B-PER\nBlackburn\tE-PER\n"
    assert parse_conll(text) == [(["EU", "rejects"], ["S-ORG", "O"]), (["Peter", "Blackburn"], ["B-PER", "E-PER"])]


def test_jsonl_records(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"tokens": ["Ann", "met", "Bob"], "tags": ["B-PER", "O", "S-PER"]}) + "\n\n")
    assert read_tagged(f) == [(["Ann", "met", "Bob"], ["B-PER", "O", "S-PER"])]
    data, kind = read_task_data(f)
    assert detect_task(data, kind) == "tag"


@pytest.mark.parametrize("name,text,needle", [
    ("a.conll", "Paris\tB-LOC\nis\n", "a.conll line 2: expected 'token<TAB>tag'"),
    ("b.conll", "Paris\tLOC\n", "b.conll line 1: tag 'LOC' is not IOB2/IOBES"),
    ("c.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
     "c.jsonl line 2: 2 tokens but 1 tags"),
    ("d.jsonl", '{"tokens": ["a"]}\n', "d.jsonl line 1: a record needs 'tokens' and 'tags' lists"),
    ("e.jsonl", '{"tokens": ["a b"], "tags": ["O"]}\n', "e.jsonl line 1: every token must be a non-empty string"),
    ("f.conll", "-DOCSTART- O\n\n", "f.conll holds no tagged sentence"),
])
def test_errors_name_file_and_line(tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        read_tagged(f)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    return {"bpe": Tokenizer.from_dir(make_tiny_model(d / "llama")), "wordpiece": Tokenizer.from_dir(
        make_tiny_bert(d / "bert"))}


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_first_sub_token_carries_the_tag(toks, kind):
    tok = toks[kind]
    words = ["Karl", "Ove", "Knausgård", "(", "born", "1968", ")"]
    ids, first = encode_words(tok, words, 512)
    assert ids == tok.encode(" ".join(words))
    assert all(t >= 0 for t in first) and first == sorted(first) and len(set(first)) == len(first)
    text = " ".join(words)
    offsets = tok.hf.encode(text).offsets
    for w, t in zip(words, first):  # the word's first sub-token covers its first character
        s, e = offsets[t]
        assert text[s:e].strip() and w.startswith(text[s:e].strip()[:1])
    tags = ["B-PER", "I-PER", "I-PER", "O", "O", "O", "O"]
    ex, id2label, ws, ts, cut = tag_examples(tok, [(words, tags)], 512)
    labels = ex[0]["labels"]
    assert len(labels) == len(ids) and cut == 0 and ws == [words] and ts == [tags]
    label2id = {v: int(k) for k, v in id2label.items()}
    assert [labels[t] for t in first] == [label2id[x] for x in tags]
    assert sum(lab != IGNORE for lab in labels) == len(words)  # every other sub-token is ignored
    ids, first = encode_words(tok, words, 3)  # truncated: words without a token are -1
    assert len(ids) == 3 and first[-1] == -1


def test_unknown_validation_tag(toks):
    with pytest.raises(ValueError, match="tag 'B-MISC' is not among the training tags"):
        tag_examples(toks["bpe"], [(["x"], ["B-MISC"])], 64, {"0": "O", "1": "B-PER"}, "dev.conll")


def test_split_words_offsets():
    text = "Karl Ove Knausgård (born 1968) visited O'Hare, Chicago."
    ws = split_words(text)
    assert [w for w, _, _ in ws] == ["Karl", "Ove", "Knausgård", "(", "born", "1968", ")", "visited", "O'Hare", ",",
                                      "Chicago", "."]
    assert all(text[s:e] == w for w, s, e in ws)
