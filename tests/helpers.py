"""Helpers the tests of several wings share (tests/ is on sys.path through conftest.py)."""
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from llmkit.model.checkpoint import save_model
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer
from llmkit.model.tokenizer import Tokenizer


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MSG = [{"role": "user", "content": "Hello there"}]


def make_tiny_model(out):
    """A llama-tiny Transformer with a ChatML byte-level BPE tokenizer, saved as a model folder."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    text = ["The capital of France is Paris. Hello world! {\"a\": 1, \"b\": [true, null]} ```python\nx = 1\n```"] * 10
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(text, trainer)
    tok = Tokenizer(hf, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                    chat_template=CHATML)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", max_position_embeddings=1024, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                 bos_token_id=tok.bos_id)
    save_model(out, Transformer(cfg), tok, {"eos_token_id": tok.eos_id})
    return out
