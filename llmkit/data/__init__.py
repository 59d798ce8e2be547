"""Data: corpora, supervised fine-tuning examples, cleaning, tokenizer training."""


def __getattr__(name: str):
    """Names of the old flat module llmkit.data (before the wings), now in llmkit.data.corpus: forwarded with a
    DeprecationWarning for one release. New code imports them from llmkit.data.corpus."""
    from llmkit.utils import old_name

    return old_name(__name__, name, "corpus", globals())
