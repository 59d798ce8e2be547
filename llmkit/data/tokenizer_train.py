"""Tokenizer training: byte-level BPE (GPT-2 style) or a character vocabulary, with HF `tokenizers`."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmkit.model.tokenizer import Tokenizer

DEFAULT_SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                    "unk_token": "<|unk|>", "mask_token": "<|mask|>"}


def train_tokenizer(files, vocab_size: int, out_dir=None, char: bool = False,
                    special_tokens: dict[str, str] | None = None, text_field: str = "text") -> Tokenizer:
    """Train a byte-level BPE (or, with char=True, a character-level) tokenizer on files; save it to out_dir."""
    from llmkit.data.corpus import read_texts  # every data format; here, not above: corpus imports torch

    specials = dict(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
    texts = [t for f in files for t in read_texts(f, text_field=text_field)]
    if not any(texts):
        raise ValueError(f"no text in {', '.join(map(str, files))}: pass non-empty training files")
    names = list(dict.fromkeys(specials.values()))  # special tokens take ids 0..k-1, in this order
    if char:
        chars = sorted(set("".join(texts)))
        if vocab_size and len(chars) + len(names) > vocab_size:
            # keep the most frequent characters; the rest become unk
            from collections import Counter
            counts = Counter("".join(texts))
            chars = sorted(c for c, _ in counts.most_common(max(vocab_size - len(names), 1)))
        vocab = {t: i for i, t in enumerate(names + [c for c in chars if c not in names])}
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=specials.get("unk_token")))
        # every character (newlines included) is its own "word"
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()  # join characters back without spaces
    else:
        if vocab_size < 256 + len(names):
            raise ValueError(f"--vocab-size {vocab_size} is too small for byte-level BPE: use at least "
                             f"{256 + len(names)} (256 bytes + {len(names)} special tokens), or --char")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=names, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # add_bos_token=False: data.py separates documents with eos itself, and generation needs no bos either
    tok = Tokenizer(hf, **specials, add_bos_token=False, add_eos_token=False, padding_side="left")
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def compression(tok: Tokenizer, files, text_field: str = "text") -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of the files under tok: bytes per token measures how well the vocabulary compresses."""
    from llmkit.data.corpus import read_texts  # here, not above: corpus imports torch

    n_bytes = n_tokens = 0
    for f in files:
        for text in read_texts(f, text_field=text_field):
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(tok.encode(text, add_special_tokens=False))
    return n_bytes, n_tokens


def describe(tok: Tokenizer, files, out_dir, text_field: str = "text") -> str:
    """One line for the CLI: vocabulary size, compression, where it went."""
    n_bytes, n_tokens = compression(tok, files, text_field)
    ratio = n_bytes / max(n_tokens, 1)
    return (f"tokenizer: {tok.vocab_size} tokens, {n_tokens:,} tokens for {n_bytes:,} bytes "
            f"({ratio:.2f} bytes/token) -> {Path(out_dir)}")
