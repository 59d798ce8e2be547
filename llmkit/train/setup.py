"""What the fine-tuning recipes share: FinetuneConfig, and `prepare`, which loads the base model, tokenizes the data
and adds the classification (or tagging) head and LoRA adapters (used by finetune and federated; distill builds on
its data half).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from llmkit.data.sft import TASKS, build_examples, detect_task, read_task_data, split_train_val
from llmkit.model import lora as lora_lib
from llmkit.model.checkpoint import load_model


@dataclass
class FinetuneConfig:
    data: str
    out: str
    model: str = "default"
    task: str | None = None  # detected from the file when None
    method: str = "lora"  # lora | full
    val_data: str | None = None
    val_fraction: float = 0.1
    max_length: int = 512
    batch_size: int = 8
    text_column: str | None = None
    label_column: str | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_rslora: bool = False  # rank-stabilized scaling alpha / sqrt(r)
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    lora_layers: int | list[int] | None = None  # top N blocks, or these block indices; None: all (faster if fewer)
    seed: int = 0
    device: str = "cpu"


def prepare(fc: FinetuneConfig):
    """Load the base model and tokenize the data, checking everything before anything is written."""
    if fc.method not in ("lora", "full"):
        raise ValueError(f"--method must be lora or full, not {fc.method!r}")
    if fc.task is not None and fc.task not in TASKS:
        raise ValueError(f"unknown task {fc.task!r}; choose one of {', '.join(TASKS)}")
    data, kind = read_task_data(fc.data)
    task = fc.task or detect_task(data, kind)
    lm = load_model(fc.model, dtype="float32", device=fc.device)
    fc.max_length = min(fc.max_length, lm.config.max_position_embeddings)  # capped at the model's context
    tok = lm.tokenizer
    if tok is None:
        raise ValueError(f"{fc.model} has no tokenizer; fine-tuning needs one")
    if task in ("chat", "instruct") and not tok.chat_template:
        raise ValueError(f"{fc.model} has no chat template, so {task} data cannot be rendered; use --task text")
    train_ex, id2label, texts, golds, cut = build_examples(tok, data, kind, task, fc, path=fc.data)
    if fc.val_data:
        vdata, vkind = read_task_data(fc.val_data)
        val_ex, _, vtexts, vgolds, vcut = build_examples(tok, vdata, vkind, task, fc, id2label, path=fc.val_data)
        cut += vcut
    elif not fc.val_fraction:  # no validation (DP-SGD without a public --val-data): every example trains
        val_ex, vtexts, vgolds = [], [], []
    else:
        (train_ex, texts, golds), (val_ex, vtexts, vgolds) = split_train_val(train_ex, fc.val_fraction, fc.seed,
                                                                             texts, golds)
    if cut:
        print(f"truncated {cut} example(s) longer than --max-length {fc.max_length} tokens", file=sys.stderr)
    model = lm.model
    extra = ()
    # the new head and adapters draw from torch's global generator: seeded, so --seed gives the same start every run
    torch.manual_seed(fc.seed)
    if task in ("classify", "tag"):  # a sequence or a token classification head
        lora_lib.add_classifier(model, id2label, tagger=task == "tag")
        extra = ("score",)
    layers = fc.lora_layers
    if isinstance(layers, int):  # the top N blocks: the backward pass stops below them
        n = model.config.n_layer
        if not 0 < layers <= n:
            raise ValueError(f"--lora-layers {layers} must be between 1 and the model's {n} layers")
        layers = list(range(n - layers, n))
    lcfg = lora_lib.LoRAConfig(fc.lora_r, fc.lora_alpha, fc.lora_dropout, list(fc.lora_targets), layers,
                               use_rslora=fc.lora_rslora)
    if fc.method == "lora":
        lora_lib.inject_lora(model, lcfg, trainable=extra)
    return dict(lm=lm, task=task, train=train_ex, val=val_ex, val_texts=vtexts, val_golds=vgolds, lora=lcfg,
                extra=extra, truncated=cut)
