"""finetune --task tag: LoRA on a decoder, full on a transformers BERT; the label set rides in config.json, and every
exported tagger loads in transformers' AutoModelForTokenClassification with no missing or unexpected keys and the
same logits (and a transformers tagger loads in llmkit)."""
import json
from pathlib import Path

import pytest
import torch
import transformers

from helpers import make_tiny_bert, make_tiny_model
from llmkit.infer.classify import pad_batch
from llmkit.model import lora as lora_lib
from llmkit.model.checkpoint import load_model, save_model
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer
from llmkit.train.finetune import finetune
from llmkit.train.loop import TrainConfig
from llmkit.train.setup import FinetuneConfig

WIKIANN = Path(__file__).parents[1] / "data" / "wikiann_en_train_40.conll"
TAGS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def assert_same_in_transformers(folder, ours, ids, mask):
    hf, info = transformers.AutoModelForTokenClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, attention_mask=mask).logits
        got = ours.eval()(ids, attention_mask=mask, head="tag")
    real = mask.bool()
    assert got.shape == ref.shape
    assert torch.allclose(got[real], ref[real], atol=1e-4), (got[real] - ref[real]).abs().max()
    return hf


def _run(base, out, method, steps=4):
    fc = FinetuneConfig(data=str(WIKIANN), out=str(out), model=str(base), task="tag", method=method, batch_size=8,
                        max_length=64, val_fraction=0.2)
    tc = TrainConfig(max_steps=steps, lr=1e-3 if method == "lora" else 1e-4, warmup_steps=0, weight_decay=0.0,
                     eval_every=0, log_every=1, out=str(out), device="cpu", dtype="float32", progress=False)
    return finetune(fc, tc)


def test_lora_tagger_on_a_decoder(tmp_path):
    base = make_tiny_model(tmp_path / "base")
    res = _run(base, tmp_path / "run", "lora")
    assert {"val_f1", "val_precision", "val_recall"} <= set(res) and 0 <= res["val_f1"] <= 1
    ac = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert ac["task_type"] == "TOKEN_CLS" and ac["modules_to_save"] == ["score"]
    assert json.loads((tmp_path / "run" / "val_metrics.json").read_text())["per_type"]
    lm = load_model(tmp_path / "run", dtype="float32")
    assert lm.config.tagger and list(lm.config.id2label.values()) == TAGS
    save_model(tmp_path / "merged", lm.model, lm.tokenizer)
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForTokenClassification"]
    assert cfg["label2id"] == {t: i for i, t in enumerate(TAGS)}
    ids, mask = pad_batch([lm.tokenizer.encode("Karl Ove lives in Oslo"), lm.tokenizer.encode("Paris")], 0)
    assert_same_in_transformers(tmp_path / "merged", lm.model, ids, mask)


def test_full_tagger_on_a_transformers_bert(tmp_path):
    base = make_tiny_bert(tmp_path / "bert")
    _run(base, tmp_path / "run", "full", steps=2)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForTokenClassification"] and cfg["id2label"]["5"] == "B-PER"
    lm = load_model(tmp_path / "run", dtype="float32")
    ids, mask = pad_batch([lm.tokenizer.encode("to be or not to be"), lm.tokenizer.encode("be")], 0)
    assert_same_in_transformers(tmp_path / "run", lm.model, ids, mask)


def test_gpt2_tagger_exports_and_transformers_tagger_imports(tmp_path):
    torch.manual_seed(0)
    model = lora_lib.add_classifier(Transformer(preset("gpt2-tiny")), dict(enumerate(TAGS)), tagger=True)
    save_model(tmp_path / "gpt2", model)
    ids, mask = torch.tensor([[5, 9, 2, 7, 1]]), torch.ones(1, 5, dtype=torch.long)
    assert_same_in_transformers(tmp_path / "gpt2", load_model(tmp_path / "gpt2").model, ids, mask)
    # a BertForTokenClassification written by transformers loads in llmkit as a tagger with the same logits
    hf_cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     id2label=dict(enumerate(TAGS)), label2id={t: i for i, t in enumerate(TAGS)})
    transformers.BertForTokenClassification(hf_cfg).save_pretrained(tmp_path / "hfbert")
    ours = load_model(tmp_path / "hfbert", dtype="float32")
    assert ours.config.tagger and ours.config.id2label["6"] == "I-PER"
    assert_same_in_transformers(tmp_path / "hfbert", ours.model, ids, mask)


def test_dp_refuses_tagging(tmp_path):
    from llmkit.train.dp import DPConfig

    base = make_tiny_model(tmp_path / "base")
    fc = FinetuneConfig(data=str(WIKIANN), out=str(tmp_path / "o"), model=str(base), task="tag", val_data=str(WIKIANN))
    with pytest.raises(ValueError, match="does not support --task tag"):
        finetune(fc, TrainConfig(max_steps=1, out=str(tmp_path / "o"), device="cpu"), dp=DPConfig(8.0))
