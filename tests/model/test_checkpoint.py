"""Model folders: parity with transformers on tiny random models of all three families, both directions."""
import json
from pathlib import Path

import pytest
import torch
import transformers

from llmkit.model.checkpoint import export_hf, load_model, save_model
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def hf_models():
    torch.manual_seed(0)
    yield "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2))
    yield "llama-tied", transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True))
    yield "qwen2", transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, num_key_value_heads=2))
    yield "llama-cls", transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**TINY, num_labels=3, pad_token_id=0))
    g = dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    yield "gpt2", transformers.GPT2LMHeadModel(transformers.GPT2Config(**g))
    yield "gpt2-cls", transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**g, num_labels=2, pad_token_id=0))
    b = dict(TINY, type_vocab_size=2)
    yield "bert", transformers.BertForMaskedLM(transformers.BertConfig(**b))
    yield "bert-cls", transformers.BertForSequenceClassification(transformers.BertConfig(**b, num_labels=2))


def _hf_out(m, ids, mask):
    kw = {}
    if m.config.model_type != "bert":  # as transformers' generate does for left-padded rows
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("name,hf", list(hf_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_hf_folder_parity_both_ways(tmp_path, name, hf):
    hf.eval()
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(1, 99, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0 if "bert" not in name else 1  # left padding for decoders
    if "bert" in name:
        mask[1, -3:] = 0  # right padding for encoders
    ref = _hf_out(hf, ids, mask)

    lm = load_model(tmp_path / "hf", dtype="float32")
    head = "classify" if "cls" in name else "lm"
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask, head=head)
    keep = mask.bool() if head == "lm" else slice(None)
    assert (ours[keep] - ref[keep]).abs().max() <= 1e-4

    # llmkit -> HF folder -> transformers gives the same logits
    export_hf(lm, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == hf.config.architectures
    back = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    cls = getattr(transformers, cfg["architectures"][0])
    hf2 = cls.from_pretrained(tmp_path / "out").eval()
    assert back.model_type == hf.config.model_type
    assert (_hf_out(hf2, ids, mask)[keep] - ref[keep]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
def test_llmkit_models_export_to_transformers(tmp_path, name):
    torch.manual_seed(1)
    model = Transformer(preset(name)).eval()
    save_model(tmp_path, model)
    hf = transformers.AutoModelForMaskedLM if name.startswith("bert") else transformers.AutoModelForCausalLM
    ref = hf.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert (ref(ids).logits - model(ids)).abs().max() <= 1e-4
    again = load_model(tmp_path).model
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "empty")
    save_model(tmp_path / "m", Transformer(preset("llama-tiny")))
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(tmp_path / "m")
    g = tmp_path / "bad.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="cannot read GGUF"):
        load_model(g)


@pytest.mark.parametrize("name,drop", [("llama", "lm_head.weight"), ("bert", "cls.predictions.transform.dense.weight"),
                                       ("bert", "cls.predictions.bias"), ("bert-cls", "bert.pooler.dense.weight"),
                                       ("llama-cls", "score.weight")])
def test_a_missing_head_fails_with_its_names(tmp_path, name, drop):
    from safetensors.torch import load_file, save_file

    hf = dict(hf_models())[name]
    hf.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(f)
    assert drop in sd
    del sd[drop]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing its (language-model|classification) head \(.*(mlm_dense|lm_head|"
                                         r"pooler|score)"):
        load_model(tmp_path / "m")


def test_bert_without_pooler_still_loads_as_a_masked_lm(tmp_path):
    # BertForMaskedLM checkpoints carry no pooler: it is not part of the masked-LM task
    hf = dict(hf_models())["bert"].eval()
    assert not any(k.startswith("bert.pooler") for k in hf.state_dict())
    hf.save_pretrained(tmp_path / "m")
    lm = load_model(tmp_path / "m", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_model_files_get_the_mode_the_umask_gives(tmp_path, mask):
    import os
    import stat

    from llmkit.utils.io import write_results
    from llmkit.data.tokenizer_train import train_tokenizer

    old = os.umask(mask)
    try:
        tok = train_tokenizer([Path(__file__).parents[1] / "data" / "tinyshakespeare_head.txt"], 300)
        save_model(tmp_path / "m", Transformer(preset("llama-tiny", vocab_size=tok.vocab_size)), tok)
        write_results(tmp_path / "r" / "results.json", {"acc": 1.0})
    finally:
        os.umask(old)
    files = [*(tmp_path / "m").iterdir(), tmp_path / "r" / "results.json"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


@pytest.mark.parametrize("family", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
@pytest.mark.parametrize("labels", [0, 2])
def test_every_exported_family_loads_in_transformers_with_no_missing_or_unexpected_keys(family, labels, tmp_path):
    """Issue 25: a BERT classifier folder carried the MLM head, which transformers reports as UNEXPECTED: a folder
    holds what its architecture has. One exception, on purpose: a BERT masked LM keeps its pooler (as BERT's own
    checkpoints do) so that a classifier fine-tuned from it starts from the same pooler in llmkit and transformers."""
    torch.manual_seed(0)
    cfg = preset(family, num_labels=labels) if labels else preset(family)
    save_model(tmp_path, Transformer(cfg).eval())
    auto = (transformers.AutoModelForSequenceClassification if labels else
            transformers.AutoModelForMaskedLM if family.startswith("bert") else transformers.AutoModelForCausalLM)
    hf, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    pooler = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} if family == "bert-tiny" and not labels else set()
    assert not info["missing_keys"] and not info["mismatched_keys"] and set(info["unexpected_keys"]) == pooler, info
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    ours = load_model(tmp_path, dtype="float32").model.eval()
    with torch.no_grad():
        got = ours(ids, head="classify") if labels else ours(ids)
        assert torch.allclose(got, hf.eval()(ids).logits, atol=1e-4)
