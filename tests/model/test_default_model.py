"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF): parity with transformers' GGUF loader."""
import os

import torch

from llmkit.model.checkpoint import default_gguf_path, default_model_dir, load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_gguf_logits_match_transformers_gguf_loader(default_lm):
    import transformers

    gguf = default_gguf_path()
    lm = load_model(gguf, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    msgs = [{"role": "system", "content": "You are concise."},
            {"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)])
    with torch.inference_mode():
        ours, ref = lm.model(ids), hf(ids).logits
    assert (ours - ref).abs().max() <= 1e-4
    # --model default --dtype float32 (the int4/int8 load dequantized) is the same GGUF, exactly
    with torch.inference_mode():
        cached = default_lm.model(ids)
    assert (cached - ref).abs().max() <= 1e-4
    # the cached bf16 folder (--dtype bfloat16) agrees up to bf16 rounding of the weights
    with torch.inference_mode():
        bf16 = load_model("default", dtype="bfloat16").model(ids)
    assert torch.equal(bf16[0, -1].argmax(), ref[0, -1].argmax())
    assert (bf16 - ref).abs().max() < 1.0


def test_default_folder_is_a_bf16_hf_folder():
    import json

    folder = default_model_dir()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    gen = json.loads((folder / "generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    lm = load_model("default", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
