"""The model format: config, the Transformer, tokenizer, KV cache layout, LoRA, quantized layers, checkpoints and GGUF."""
