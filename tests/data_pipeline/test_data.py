"""Data: file readers, bad bytes, tokenizer training, the token cache, block batches (CLM/MLM), sharding, resuming."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.cli import main
from llmkit.data.corpus import IGNORE, BlockLoader, mask_tokens, read_texts, split_tokens, tokenize_files
from llmkit.model.tokenizer import Tokenizer
from llmkit.data.tokenizer_train import train_tokenizer

SHAKESPEARE = Path(__file__).parents[1] / "data" / "tinyshakespeare_head.txt"


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("chartok")
    train_tokenizer([SHAKESPEARE], 0, out, char=True)
    return Tokenizer.from_dir(out)


# ---------------------------------------------------------------------------------------------------------------
# readers


def test_readers_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n{"text": "second", "x": 1}\n')
    (tmp_path / "a.json").write_text(json.dumps([{"body": "alpha"}, {"body": "beta"}]))
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\nbye,0\n')
    (tmp_path / "a.tsv").write_text("text\tlabel\nfoo\t1\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2", ""]}), tmp_path / "a.parquet")

    assert read_texts(tmp_path / "a.txt") == ["line one\nline two\n"]
    assert read_texts(tmp_path / "a.txt", lines=True) == ["line one", "line two"]
    assert read_texts(tmp_path / "a.jsonl") == ["first", "second"]
    assert read_texts(tmp_path / "a.json", text_field="body") == ["alpha", "beta"]
    assert read_texts(tmp_path / "a.csv") == ["hello, world", "bye"]
    assert read_texts(tmp_path / "a.tsv") == ["foo"]
    assert read_texts(tmp_path / "a.parquet") == ["p1", "p2"]
    with pytest.raises(ValueError, match="no 'text' field"):
        read_texts(tmp_path / "a.json")
    with pytest.raises(ValueError, match="no column 'content'"):
        read_texts(tmp_path / "a.csv", text_field="content")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_texts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="unsupported"):
        read_texts(tmp_path / "a.docx")


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path, capsys):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd")  # two bad sequences... plus one real U+FFFD
    (text,) = read_texts(p)
    assert text.startswith("caf\ufffd ok ") and text.endswith(" end \ufffd")
    err = capsys.readouterr().err
    assert "bad.txt" in err and "replaced 3 invalid UTF-8" in err


# ---------------------------------------------------------------------------------------------------------------
# tokenizer training


def test_train_bpe_tokenizer_roundtrip_and_cli(tmp_path, capsys):
    out = tmp_path / "bpe"
    assert main(["tokenizer", "train", str(SHAKESPEARE), "--vocab-size", "400", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "400 tokens" in line and "bytes/token" in line
    ratio = float(line.split("(")[1].split(" bytes/token")[0])
    assert ratio > 1.5  # merges compress English text
    tok = Tokenizer.from_dir(out)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    text = "First Citizen:\nBefore we proceed — any further, héllo!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: nothing is unknown
    for name in ("bos_id", "eos_id", "pad_id", "mask_id"):
        assert getattr(tok, name) is not None
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # no bos added for pretraining


def test_train_char_tokenizer(char_tok):
    text = "ROMEO:\nWhat, ho!"
    ids = char_tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and char_tok.decode(ids) == text
    assert char_tok.vocab_size < 80  # ~60 characters + 5 special tokens
    assert char_tok.encode("~", add_special_tokens=False) == [char_tok.token_to_id("<|unk|>")]


def test_tokenizer_train_reads_the_text_field(tmp_path, capsys):
    data = tmp_path / "lines.csv"  # the text is in column "body": training and the compression report both read it
    data.write_text("id,body\n" + "".join(f"{i},\"{line}\"\n" for i, line in
                                           enumerate(SHAKESPEARE.read_text().splitlines()[:400]) if line.strip()))
    args = ["tokenizer", "train", str(data), "--vocab-size", "300", "--out", str(tmp_path / "t"),
            "--text-field", "body"]
    assert main(args) == 0
    assert "300 tokens" in capsys.readouterr().out


def test_tokenizer_train_rejects_tiny_bpe_vocab(tmp_path, capsys):
    assert main(["tokenizer", "train", str(SHAKESPEARE), "--vocab-size", "100", "--out", str(tmp_path)]) == 2
    assert "too small" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# tokenizing and caching


def test_tokenize_files_caches_memmap(tmp_path, char_tok):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello there\n")
    b.write_text("general kenobi\n")
    ids = tokenize_files([a, b], char_tok, tmp_path / "cache", progress=False)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    eos = char_tok.eos_id
    enc = lambda s: char_tok.encode(s, add_special_tokens=False)  # noqa: E731
    assert list(ids) == enc("hello there\n") + [eos] + enc("general kenobi\n") + [eos]
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1
    again = tokenize_files([a, b], char_tok, tmp_path / "cache", progress=False)
    assert np.array_equal(again, ids) and len(list((tmp_path / "cache").glob("*.bin"))) == 1
    b.write_text("general kenobi!\n")  # a changed file gets a new cache entry
    assert len(tokenize_files([a, b], char_tok, tmp_path / "cache", progress=False)) == len(ids) + 1
    train, val = split_tokens(ids, 0.25)
    assert len(train) + len(val) == len(ids) and len(val) == len(ids) - int(len(ids) * 0.75)


def test_long_document_tokenizes_like_one_call(tmp_path, char_tok):
    ids = tokenize_files([SHAKESPEARE], char_tok, tmp_path, progress=False)
    assert list(ids) == char_tok.encode(SHAKESPEARE.read_text(), add_special_tokens=False)


# ---------------------------------------------------------------------------------------------------------------
# batches


def test_clm_blocks_shift_and_cover_data():
    tokens = np.arange(1000, dtype=np.uint16)
    loader = BlockLoader(tokens, block_size=16, batch_size=4, seed=1)
    b = next(iter(loader))
    assert b["input_ids"].shape == (4, 16) and b["input_ids"].dtype == torch.int64
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    assert torch.equal(b["labels"][:, -1], b["input_ids"][:, -1] + 1)


def test_loader_resumes_exactly_and_shards_by_rank():
    tokens = np.random.default_rng(0).integers(0, 50, 3000).astype(np.uint16)
    ref = BlockLoader(tokens, 8, 6, seed=3)
    it = iter(ref)
    first = [next(it) for _ in range(70)]  # several epochs (about 62 batches per epoch)
    half = BlockLoader(tokens, 8, 6, seed=3)
    it = iter(half)
    for _ in range(40):
        next(it)
    again = BlockLoader(tokens, 8, 6, seed=3)
    again.load_state_dict(half.state_dict())
    it = iter(again)
    for want in first[40:]:
        assert torch.equal(next(it)["input_ids"], want["input_ids"])
    # two ranks with batch 3 split exactly the batches one process with batch 6 sees
    r0, r1 = (iter(BlockLoader(tokens, 8, 3, seed=3, rank=r, world_size=2)) for r in (0, 1))
    for want in first[:5]:
        assert torch.equal(torch.cat([next(r0)["input_ids"], next(r1)["input_ids"]]), want["input_ids"])


def test_mlm_masking_rates_and_specials():
    g = torch.Generator().manual_seed(0)
    special = {0, 1, 2}
    ids = torch.randint(3, 1000, (200, 128), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS]-like and [SEP]-like tokens
    out, labels = mask_tokens(ids, mask_id=0, vocab_size=1000, special_ids=special, generator=g)
    picked = labels != IGNORE
    assert not picked[:, 0].any() and not picked[:, -1].any()
    assert abs(picked.float().mean().item() * 128 / 126 - 0.15) < 0.01
    assert torch.equal(labels[picked], ids[picked])
    masked = (out == 0) & picked
    unchanged = (out == ids) & picked
    assert abs(masked.sum() / picked.sum() - 0.8) < 0.02
    assert abs(unchanged.sum() / picked.sum() - 0.1) < 0.02  # (random picks of the same id are rare)
    assert torch.equal(out[~picked], ids[~picked])


def test_mlm_loader_is_deterministic_and_rank_independent():
    tokens = np.random.default_rng(0).integers(5, 60, 2000).astype(np.uint16)
    kw = dict(objective="mlm", mask_id=4, vocab_size=60, special_ids=[0, 1, 2, 3, 4], seed=7)
    one = next(iter(BlockLoader(tokens, 16, 4, **kw)))
    assert one["input_ids"].shape == one["labels"].shape == (4, 16)
    assert (one["labels"] != IGNORE).any()
    two = [next(iter(BlockLoader(tokens, 16, 2, rank=r, world_size=2, **kw))) for r in (0, 1)]
    assert torch.equal(torch.cat([b["input_ids"] for b in two]), one["input_ids"])
    assert torch.equal(torch.cat([b["labels"] for b in two]), one["labels"])


def test_too_little_data_is_one_clear_error():
    with pytest.raises(ValueError, match="fewer than one block"):
        BlockLoader(np.arange(10, dtype=np.uint16), block_size=16, batch_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(iter(BlockLoader(np.arange(40, dtype=np.uint16), block_size=16, batch_size=4)))
    with pytest.raises(ValueError, match="mask token"):
        BlockLoader(np.arange(100, dtype=np.uint16), 8, 2, objective="mlm")
