"""Training: the loop every recipe shares, losses, DP-SGD, and the pretrain, finetune and federated recipes."""


def __getattr__(name: str):
    """Names of the old flat module llmkit.train (before the wings), now in llmkit.train.loop: forwarded with a
    DeprecationWarning for one release. New code imports them from llmkit.train.loop."""
    from llmkit.utils import old_name

    return old_name(__name__, name, "loop", globals())
