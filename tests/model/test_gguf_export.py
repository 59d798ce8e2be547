"""GGUF export: gguf.GGUFReader reads the file back, and llmkit's GGUF import gives the same logits and tokenizer."""
import gguf
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.model.checkpoint import load_gguf, load_model, save_model
from llmkit.cli import main
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer
from llmkit.model.tokenizer import Tokenizer

TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = "The 3 quick brown foxes jumped over 12 lazy dogs.\nA journey of 1000 miles begins with one step."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama folder with a SmolLM-style tokenizer (digits split one by one, then byte-level BPE)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([TEXT] * 5, trainer)
    tok = Tokenizer(hf, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                    unk_token="<|endoftext|>", chat_template=TEMPLATE, add_bos_token=False)
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    out = tmp_path_factory.mktemp("tiny")
    save_model(out, model, tok)
    return out


@pytest.mark.parametrize("quant,tol", [("f16", 2e-3), ("q8_0", 5e-2)])
def test_export_reads_back_with_same_logits_and_tokenizer(folder, tmp_path, quant, tol):
    path = tmp_path / f"tiny.{quant}.gguf"
    assert main(["convert", str(folder), str(path), "--to", "gguf", "--quant", quant]) == 0
    reader = gguf.GGUFReader(str(path))
    names = {t.name: t for t in reader.tensors}
    assert names["blk.0.attn_q.weight"].tensor_type.name == quant.upper()
    assert names["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.chat_template"].contents() == TEMPLATE

    ref, back = load_model(folder), load_gguf(path)
    for text in (TEXT, "<|im_start|>user\n42<|im_end|>"):
        assert back.tokenizer.encode(text) == ref.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert back.tokenizer.apply_chat_template(msgs, add_generation_prompt=True) == \
        ref.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    ids = torch.tensor([ref.tokenizer.encode(TEXT)])
    with torch.no_grad():
        a, b = ref.model(ids), back.model(ids)
    assert (a - b).abs().max() <= tol * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant", ["q4_0", "q4_1"])
def test_a_q4_token_embedding_loads_as_int4(folder, tmp_path, quant, tied):
    """A --pure Q4_0/Q4_1 file (token embedding in Q4 too, the tied head's table or its own) loads with dtype int4,
    close to the float32 load of the same file (issue 20: TypeError, make_layer("int4") without a group size)."""
    from llmkit.model.gguf_export import export_gguf
    from llmkit.model.quant import Int8Embedding, is_quantized

    lm = load_model(folder)
    if tied:
        torch.manual_seed(1)
        model = Transformer(preset("llama-tiny", vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                   tie_word_embeddings=True))
        lm.model = model.eval()
    path = export_gguf(lm, tmp_path / f"tiny.{quant}.gguf", quant=quant, pure=True)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert kinds["token_embd.weight"] == quant.upper() and ("output.weight" in kinds) != tied

    q, f = load_model(path, dtype="int4"), load_model(path, dtype="float32")
    assert is_quantized(q.model) and isinstance(q.model.embed_tokens, Int8Embedding)
    assert not is_quantized(f.model)
    # the layers keep their Q4 blocks exactly; the embedding table is int8 rows of the dequantized Q4 values:
    # within half an int8 step of them (a row's largest weight / 254; measured: 0.0039 of the largest weight)
    w, t = f.model.embed_tokens.weight, q.model.embed_tokens.table
    assert ((t.dequantize() - w).abs().amax(1) <= w.abs().amax(1) / 254 * (1 + 1e-5) + 1e-7).all()
    ids = torch.tensor([lm.tokenizer.encode(TEXT)])
    with torch.no_grad():
        a, b = f.model(ids).float(), q.model(ids).float()
    # that rounding is the whole difference (with the float32 embedding put back, an untied model's logits match to
    # 1e-5 with float32 kernel input): max |diff| / max |logit| measured 0.0064 (q4_0) and 0.0098 (q4_1) untied,
    # 0.0042 / 0.0045 tied, with either kernel input dtype (0.0042-0.0098 over three seeds); top-1 agreement
    # 0.979-1.0 (0.958 at worst)
    assert (a - b).abs().max() <= 0.015 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


def test_export_refuses_what_the_llama_architecture_cannot_hold(tmp_path, capsys):
    save_model(tmp_path / "gpt2", Transformer(preset("gpt2-tiny")))
    assert main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "x.gguf"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "Llama-family" in err and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf*"))
