"""Helpers the tests of several wings share (tests/ is on sys.path through conftest.py)."""
from pathlib import Path

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


def make_tiny_bert(out):
    """A tiny BertForMaskedLM and a WordPiece tokenizer (trained on the Shakespeare excerpt), both saved by transformers
    into out."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    hf.train_from_iterator((Path(__file__).parent / "data" / "tinyshakespeare_head.txt").read_text().splitlines(),
                           trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", hf.token_to_id("[CLS]")), ("[SEP]", hf.token_to_id("[SEP]"))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, pad_token="[PAD]", unk_token="[UNK]",
                                               cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=hf.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  pad_token_id=hf.token_to_id("[PAD]"))
    transformers.BertForMaskedLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out
