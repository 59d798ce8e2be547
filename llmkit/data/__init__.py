"""Data: corpora, supervised fine-tuning examples, cleaning, tokenizer training."""
