"""LoRA: injection, merge, PEFT-layout adapters that peft loads with the same logits, adapter folders as --model."""
import json

import pytest
import torch
import transformers

from llmkit.model import checkpoint

from llmkit.model import lora
from llmkit.model.checkpoint import load_model, save_model
from llmkit.cli import main
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer


def _tiny(name="llama-tiny", seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(preset(name, **kw)).eval()


def _randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith("score."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, :3] = 0  # left padding


def test_inject_starts_at_base_trains_only_adapters_and_merges_exactly():
    model = _tiny()
    ref = model(IDS, attention_mask=MASK)
    names = lora.inject_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q", "v", "down"]))
    assert len(names) == 2 * 3 and all(n.endswith(("q_proj", "v_proj", "down_proj")) for n in names)
    assert torch.allclose(model(IDS, attention_mask=MASK), ref)  # B = 0 at init: same function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _randomize_adapters(model)
    adapted = model(IDS, attention_mask=MASK)
    assert not torch.allclose(adapted, ref)
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert torch.allclose(model(IDS, attention_mask=MASK), adapted, atol=1e-5)


def test_targets_that_name_no_layer_are_refused():
    with pytest.raises(ValueError, match="names no layer"):
        lora.inject_lora(_tiny("gpt2-tiny"), lora.LoRAConfig(targets=["gate"]))
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.inject_lora(_tiny(), lora.LoRAConfig(targets=["qq"]))


def _adapter(tmp_path, name="llama-tiny", num_labels=0, targets=("q", "k", "v", "o", "gate", "up", "down"),
             layers=None, **lora_kw):
    """A base folder plus a trained-looking adapter folder; returns (base_dir, adapter_dir, model with adapter)."""
    base = _tiny(name, pad_token_id=0)
    save_model(tmp_path / "base", base)
    model = load_model(tmp_path / "base").model
    extra = ()
    if num_labels:
        lora.add_classifier(model, {str(i): f"class{i}" for i in range(num_labels)})
        extra = ("score",)
    lcfg = lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets=list(targets), layers=layers, **lora_kw)
    lora.inject_lora(model, lcfg, trainable=extra)
    _randomize_adapters(model)
    lora.save_adapter(tmp_path / "adapter", model, lcfg, base=str(tmp_path / "base"), extra=extra)
    return tmp_path / "base", tmp_path / "adapter", model.eval()


PATTERNS = dict(use_rslora=True, rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
                alpha_pattern={"o_proj": 3.0, "down_proj": 12.0})


@pytest.mark.parametrize("name,num_labels,layers,kw", [("llama-tiny", 0, None, {}), ("llama-tiny", 3, [1], {}),
                                                       ("bert-tiny", 2, None, {}), ("llama-tiny", 0, None, PATTERNS)],
                         ids=["llama", "llama-cls-layer1", "bert-cls", "llama-rslora-patterns"])
def test_peft_loads_the_adapter_with_the_same_logits(tmp_path, name, num_labels, layers, kw):
    import peft

    targets = ("q", "v", "up") if name == "bert-tiny" else ("q", "k", "v", "o", "gate", "up", "down")
    base_dir, adapter_dir, model = _adapter(tmp_path, name, num_labels, targets, layers, **kw)
    if kw:  # per-module ranks as the patterns say
        assert model.layers[0].self_attn.q_proj.lora_A.weight.shape[0] == 2
        assert model.layers[1].self_attn.v_proj.lora_A.weight.shape[0] == 6
        assert model.layers[0].self_attn.v_proj.lora_A.weight.shape[0] == 4
    if layers:  # adapters only on the chosen blocks (PEFT's layers_to_transform)
        assert all(isinstance(model.layers[i].self_attn.q_proj, lora.LoRALinear) == (i in layers) for i in range(2))
    ac = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert ac["peft_type"] == "LORA" and ac["base_model_name_or_path"] == str(base_dir)
    head = "classify" if num_labels else "lm"
    with torch.no_grad():
        ours = model(IDS, attention_mask=MASK if name != "bert-tiny" else None, head=head)
    if num_labels:
        cls = transformers.AutoModelForSequenceClassification
        hf = cls.from_pretrained(base_dir, num_labels=num_labels)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    kw = {} if name == "bert-tiny" else dict(attention_mask=MASK, position_ids=(MASK.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        theirs = pm(input_ids=IDS, **kw).logits
    keep = MASK.bool() if head == "lm" else slice(None)
    assert (ours[keep] - theirs[keep]).abs().max() <= 1e-4

    # llmkit loads the adapter folder as a model (base + merged adapter)
    lm = load_model(adapter_dir)
    with torch.no_grad():
        again = lm.model(IDS, attention_mask=MASK if name != "bert-tiny" else None, head=head)
    assert (again[keep] - ours[keep]).abs().max() <= 1e-4
    if num_labels:
        assert lm.config.id2label == {str(i): f"class{i}" for i in range(num_labels)}


def test_merge_command_writes_a_plain_model_folder(tmp_path, capsys):
    _, adapter_dir, model = _adapter(tmp_path, "llama-tiny", num_labels=2)
    assert main(["merge", str(adapter_dir), "--out", str(tmp_path / "merged")]) == 0
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["id2label"] == {"0": "class0", "1": "class1"}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    pos = (MASK.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(input_ids=IDS, attention_mask=MASK, position_ids=pos).logits
        ours = model(IDS, attention_mask=MASK, head="classify")
    assert (ours - theirs).abs().max() <= 1e-4
    # an existing non-empty output folder is refused, untouched
    assert main(["merge", str(adapter_dir), "--out", str(tmp_path / "merged")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_adapter_for_a_different_base_is_refused(tmp_path, capsys):
    _, adapter_dir, _ = _adapter(tmp_path)
    other = _tiny(n_embd=32, intermediate_size=64, pad_token_id=0)
    save_model(tmp_path / "other", other)
    with pytest.raises(ValueError, match="different base model"):
        checkpoint.load_adapter_model(adapter_dir, base=str(tmp_path / "other"))
    assert main(["merge", str(adapter_dir), "--base", str(tmp_path / "other"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "different base model" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("kw", [dict(use_rslora=True), PATTERNS, dict(rank_pattern={"k_proj": 1})],
                         ids=["rslora", "rslora-patterns", "rank-pattern"])
def test_adapters_made_by_peft_load_with_peft_arithmetic(tmp_path, kw):
    # rank-stabilized scaling (alpha / sqrt(r)) and per-module rank/alpha patterns, made and run by peft itself
    import peft

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                         init_lora_weights=False, **kw)  # random B: the adapter changes the logits
    pm = peft.get_peft_model(hf, pc).eval()
    pm.save_pretrained(tmp_path / "adapter")
    kwargs = dict(attention_mask=MASK, position_ids=(MASK.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        theirs = pm(input_ids=IDS, **kwargs).logits
    lm = checkpoint.load_adapter_model(tmp_path / "adapter", base=str(tmp_path / "base"), dtype="float32")
    with torch.no_grad():
        ours = lm.model(IDS, attention_mask=MASK)
    keep = MASK.bool()
    assert (ours[keep] - theirs[keep]).abs().max() <= 1e-4


def test_dora_and_other_unsupported_variants_are_refused(tmp_path):
    import peft

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg)
    hf.save_pretrained(tmp_path / "base")
    peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(ValueError, match=r"use_dora \(DoRA\).*merge_and_unload"):
        checkpoint.load_adapter_model(tmp_path / "dora", base=str(tmp_path / "base"))
    ac = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    ac.update(use_dora=False, bias="all")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(ac))
    with pytest.raises(ValueError, match="with bias"):
        checkpoint.load_adapter_model(tmp_path / "dora", base=str(tmp_path / "base"))


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        lora.LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]"):
        lora.LoRAConfig(rank_pattern={"q_proj": 0})
