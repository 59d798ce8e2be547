"""The model format: config, the Transformer, tokenizer, KV cache layout, LoRA, quantized layers, checkpoints and
GGUF."""


def __getattr__(name: str):
    """Names of the old flat module llmkit.model (before the wings), now in llmkit.model.transformer: forwarded with a
    DeprecationWarning for one release. New code imports them from llmkit.model.transformer."""
    from llmkit.utils import old_name

    return old_name(__name__, name, "transformer", globals())
