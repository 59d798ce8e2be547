"""llmkit: data -> tokenizer -> pretraining -> fine-tuning -> compression -> evaluation -> serving."""
__version__ = "0.1.0"
