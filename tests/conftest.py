"""Shared fixtures: the real default model is loaded once per test session."""
import os

import pytest

# CLI runs in tests (and the processes they start) decode eagerly unless a test says otherwise: `--compile auto`
# would start background builds of the compiled decode step (tests/infer/test_compiled.py tests it directly)
os.environ.setdefault("LLMKIT_COMPILE", "off")


@pytest.fixture(scope="session")
def default_lm():
    """SmolLM2-135M-Instruct (the embedded default model) as a LoadedModel, float32."""
    from llmkit.model.checkpoint import load_model

    return load_model("default", dtype="float32")


@pytest.fixture(scope="session")
def sst_llama_base(tmp_path_factory):
    """A tiny 2-block Llama with a byte-level BPE tokenizer trained on tests/data/sst_train_30.tsv, saved as a model
    folder (the base model of the DP and federated fine-tuning tests)."""
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llmkit.model.checkpoint import save_model
    from llmkit.model.config import preset
    from llmkit.model.transformer import Transformer
    from llmkit.model.tokenizer import Tokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator((Path(__file__).parent / "data" / "sst_train_30.tsv").read_text().splitlines(), trainer)
    tok = Tokenizer(hf, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                    unk_token="<|endoftext|>", add_bos_token=False)
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                               n_layer=2))
    out = tmp_path_factory.mktemp("sst_base")
    save_model(out, model, tok)
    return out
