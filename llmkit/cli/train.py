"""Training commands: `llmkit pretrain`, `llmkit finetune` (with --clean and DP-SGD) and `llmkit federate`
(federated LoRA on Flower)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import CLEAN_FLAGS, Parser, add_clean_flags, model_flags

# ---------------------------------------------------------------------------------------------------------------
# pretrain


def add_pretrain(sub):
    # defaults live in PretrainConfig/TrainConfig: None here means "not given", so --config YAML can fill it
    p = sub.add_parser("pretrain", help="pretrain a causal (GPT-style) or masked (BERT-style) LM from text")
    a = p.add_argument
    a("--data", nargs="+", help="training text files (.txt/.jsonl/.json/.csv/.tsv/.parquet)")
    a("--out", help="output model folder (checkpoints/, metrics.jsonl, loss.png inside)")
    a("--config", help="YAML file of flags (keys as flag names); command-line flags win")
    a("--model-config", help="preset name or config.json (default: llama-tiny for clm, bert-tiny for mlm)")
    a("--tokenizer", help="tokenizer folder (default: train one on --data, saved in --out)")
    a("--vocab-size", type=int, help="vocabulary of a tokenizer trained here (default 4096)")
    a("--char", action="store_true", default=None, help="train a character-level tokenizer here")
    a("--objective", choices=["clm", "mlm"], help="clm: next-token prediction (default); mlm: BERT masking")
    a("--val-data", nargs="+", help="validation files (default: the last --val-fraction of --data)")
    a("--val-fraction", type=float, help="validation share of the token stream (default 0.1)")
    a("--text-field", help="field/column holding the text (default: text)")
    a("--lines", action="store_true", default=None, help=".txt files hold one document per line")
    a("--block-size", type=int, help="tokens per sequence (default min(256, max positions))")
    a("--batch-size", type=int, help="sequences per process per micro-step (default 16)")
    a("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    a("--max-steps", type=int, help="optimizer steps, also the cosine schedule length (default 1000)")
    a("--max-tokens", type=int, help="train on this many tokens (sets --max-steps)")
    a("--max-time", type=float, help="stop after this many seconds")
    a("--lr", type=float, help="peak learning rate (default 3e-4)")
    a("--min-lr", type=float, help="final learning rate of the cosine decay (default lr/10)")
    a("--warmup-steps", type=int, help="linear warmup steps (default 100)")
    a("--weight-decay", type=float, help="AdamW weight decay on >= 2-D weights (default 0.1)")
    a("--beta2", type=float, help="AdamW beta2 (default 0.95)")
    a("--grad-clip", type=float, help="gradient norm clip, 0 = off (default 1.0)")
    a("--dropout", type=float, help="dropout (default: the model config's)")
    a("--n-layer", type=int, help="override the config's number of layers")
    a("--n-head", type=int, help="override the number of attention heads")
    a("--n-kv-head", type=int, help="override the number of key/value heads")
    a("--n-embd", type=int, help="override the width")
    a("--eval-every", type=int, help="evaluate every N steps (default 250)")
    a("--eval-steps", type=int, help="validation batches per evaluation (default 20)")
    a("--log-every", type=int, help="log train loss every N steps (default 10)")
    a("--save-every", type=int, help="checkpoint every N steps (default: only at the end)")
    a("--keep-last", type=int, help="checkpoints to keep besides the best (default 2)")
    a("--seed", type=int, help="random seed (default 0)")
    a("--device", help="cpu, cuda ... (default: cuda when available)")
    a("--dtype", choices=["auto", "float32", "bfloat16"], help="autocast dtype (auto: bf16 only on GPUs with it)")
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--fsdp", action="store_true", default=None, help="shard with FSDP2 (under torchrun) instead of DDP")
    a("--resume", action="store_true", default=None, help="continue from the newest checkpoint in --out")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("--clean", action="store_true", help="clean --data first with `llmkit data clean`'s pipeline (its flags "
      "below; cleaned files and reports go to OUT/clean/)")
    add_clean_flags(p.add_argument_group("cleaning (with --clean)"), with_io=False)
    p.set_defaults(clean_flags=CLEAN_FLAGS, handler=cmd_pretrain)


def cmd_pretrain(args):
    from llmkit.train.pretrain import config_from_flags, pretrain

    checks.device(args.device)
    skip = {"command", "handler", "clean", "clean_flags", *args.clean_flags}
    pc = config_from_flags({k: v for k, v in vars(args).items() if k not in skip})
    if args.clean:
        from llmkit.data.pipeline import clean_for_training

        pc.data = [clean_for_training(pc.data, pc.out, common.clean_config(args), common.run_config(args),
                                      text_field=pc.text_field, unit="line" if pc.lines else "doc")]
    pretrain(pc)


# ---------------------------------------------------------------------------------------------------------------
# finetune


def add_finetune(sub):
    p = sub.add_parser("finetune", help="fine-tune a model (full or LoRA) for chat, instruct, classify, tag or text")
    a = p.add_argument
    model_flags(p)
    a("--data", required=True, help="chat JSONL ({messages}), Alpaca JSON/JSONL, CSV/TSV/JSONL (text, label), "
      "CoNLL (token<TAB>tag) or JSONL {tokens, tags} for tag, or .txt")
    a("--out", required=True, help="output folder (adapter or model, checkpoints/, metrics.jsonl, loss.png)")
    a("--val-data", help="validation file (default: hold out --val-fraction of --data; under --dp-epsilon it must be "
      "public data, and without it validation is off)")
    a("--val-fraction", type=float, default=0.1, help="share of --data held out for validation (default 0.1)")
    a("--task", choices=["chat", "instruct", "classify", "tag", "text"], help="default: detected from the file "
      "(tag: token classification, IOB2/IOBES tags on each word's first sub-token)")
    a("--method", choices=["lora", "full"], default="lora", help="LoRA adapters (default) or all weights")
    a("--text-column", help="classify: column with the text (default: text/sentence/...)")
    a("--label-column", help="classify: column with the label (default: label/labels/...)")
    a("--lora-r", type=int, default=8, help="LoRA rank")
    a("--lora-alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha / r)")
    a("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    a("--lora-rslora", action="store_true", help="rank-stabilized LoRA: scale the update by alpha / sqrt(r)")
    a("--lora-targets", default="q,k,v,o", help="comma-separated: q,k,v,o,gate,up,down or all")
    a("--lora-layers", type=int, default=None, help="adapters on the top N blocks only (faster backward)")
    a("--epochs", type=float, default=None, help="passes over the training data (sets --max-steps)")
    a("--max-steps", type=int, default=None, help="optimizer steps (default: 1 epoch)")
    a("--max-time", type=float, default=None, help="stop after this many seconds")
    a("--batch-size", type=int, default=8, help="examples per micro-step")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a("--lr", type=float, default=None, help="peak learning rate (default 2e-4 for LoRA, 2e-5 for full)")
    a("--warmup-steps", type=int, default=None, help="linear warmup steps (default: 3%% of the steps)")
    a("--max-length", type=int, default=512,
      help="tokens per example, at most the model's context; longer ones are truncated (counted)")
    a("--eval-every", type=int, default=100, help="validate every N steps")
    a("--early-stopping", type=int, default=0, metavar="PATIENCE",
      help="stop after PATIENCE evaluations without a better validation loss (0: off)")
    a("--save-every", type=int, default=0, help="checkpoint every N steps (default: only at the end)")
    a("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    a("--seed", type=int, default=0, help="random seed")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--clean", action="store_true", help="clean --data first with `llmkit data clean`'s pipeline (flags below; "
      "the cleaned file and its report go to OUT/clean/)")
    add_clean_flags(p.add_argument_group("cleaning (with --clean)"), with_io=False)
    a("--dp-epsilon", type=float, default=None, help="train with DP-SGD (Opacus) to this epsilon (LoRA only)")
    a("--dp-delta", type=float, default=1e-5, help="DP delta (default 1e-5; keep it below 1 / examples)")
    a("--max-grad-norm", type=float, default=1.0, help="DP: per-example gradient clipping norm (default 1.0)")
    a("--dp-accountant", choices=["prv", "rdp"], default="prv", help="DP: privacy accountant (default prv)")
    p.set_defaults(handler=cmd_finetune)


def cmd_finetune(args):
    if args.clean:
        args.data = clean_finetune_data(args)
    from llmkit.train.finetune import FinetuneConfig, finetune
    from llmkit.train.loop import TrainConfig

    if args.epochs is not None and args.max_steps is not None:
        raise ValueError("give --epochs or --max-steps, not both (--epochs sets the number of steps)")
    checks.at_least(args, 1, "--lora-r", "--lora-layers", "--max-steps", "--batch-size", "--grad-accum",
                    "--max-length")
    checks.at_least(args, 0, "--warmup-steps", "--early-stopping", "--save-every", "--eval-every")
    checks.in_range(args, "--val-fraction", 0, 1, lo_open=True, hi_open=True)
    checks.in_range(args, "--lora-dropout", 0, 1, hi_open=True)
    for flag in ("--lora-alpha", "--lr", "--epochs", "--max-time"):
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None and not v > 0:
            raise ValueError(f"{flag} {v} must be > 0")
    for flag, path in (("--data", args.data), ("--val-data", args.val_data)):
        checks.input_file(path, flag)
    checks.output_dir(args.out)
    targets = [t for t in args.lora_targets.split(",") if t.strip()]
    fc = FinetuneConfig(data=args.data, out=args.out, model=args.model, task=args.task, method=args.method,
                        val_data=args.val_data, val_fraction=args.val_fraction, max_length=args.max_length,
                        batch_size=args.batch_size, text_column=args.text_column, label_column=args.label_column,
                        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        lora_rslora=args.lora_rslora, lora_targets=targets, lora_layers=args.lora_layers,
                        seed=args.seed, device=common.device(args))
    lr = args.lr if args.lr is not None else (2e-4 if args.method == "lora" else 2e-5)
    tc = TrainConfig(max_steps=args.max_steps or 0, max_time=args.max_time, lr=lr,
                     warmup_steps=args.warmup_steps if args.warmup_steps is not None else -1, weight_decay=0.0,
                     grad_accum=args.grad_accum, eval_every=args.eval_every, save_every=args.save_every,
                     early_stopping=args.early_stopping,
                     seed=args.seed, device=common.device(args), dtype=args.dtype or "auto", out=args.out,
                     resume=args.resume, progress=args.progress)
    dp = None
    if args.dp_epsilon is not None:
        from llmkit.train.dp import DPConfig

        dp = DPConfig(args.dp_epsilon, args.dp_delta, args.max_grad_norm, args.dp_accountant)
    res = finetune(fc, tc, epochs=args.epochs, dp=dp)
    keys = ("step", "train_loss", "val_loss", "val_acc", "val_accuracy", "val_macro_f1", "val_precision", "val_recall",
            "val_f1", "epsilon")
    print(" ".join(f"{k} {res[k]:.4g}" if isinstance(res[k], float) else f"{k} {res[k]}" for k in keys if k in res))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def clean_finetune_data(args) -> str:
    """finetune --clean: the cleaned copy of --data in OUT/clean/ (JSONL records, or .txt), with a report."""
    import tempfile

    from llmkit.data.pipeline import clean_for_training
    from llmkit.data.sft import read_task_data
    from llmkit.utils.io import write_atomic

    cfg, run = common.clean_config(args), common.run_config(args)
    data, kind = read_task_data(args.data)
    if kind == "text":
        return clean_for_training([args.data], args.out, cfg, run)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:  # records as JSONL, whatever file they came from
        src = Path(tmp) / (Path(args.data).stem + ".jsonl")
        write_atomic(src, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
        return clean_for_training([src], args.out, cfg, run, records=True)


# ---------------------------------------------------------------------------------------------------------------
# federate


def add_federate(sub):
    """The `llmkit federate` parser."""
    p = sub.add_parser("federate", help="federated LoRA fine-tuning on Flower (only adapter weights travel)")
    assert isinstance(p, Parser)
    a = p.add_argument
    a("--model", default="default", help="base model folder, .gguf or 'default'")
    a("--data", required=True, help="training data (classification CSV/TSV/JSONL, chat/instruct JSONL or .txt); "
      "the server holds out --val-fraction of it for its evaluation")
    a("--out", required=True, help="output folder (written by the ServerApp): final adapter, metrics.jsonl, "
      "federate.png")
    a("--clients", type=int, default=4, help="number of clients: simulated SuperNodes, or the SuperNodes round 1 "
      "waits for (default 4)")
    a("--rounds", type=int, default=5, help="federated rounds (default 5)")
    a("--split", default="iid", help="how --data is shared out: iid or dirichlet:ALPHA over labels (default iid)")
    a("--strategy", choices=["fedavg", "fedprox"], default="fedavg", help="aggregation (default fedavg)")
    a("--mu", type=float, default=0.01, help="FedProx proximal weight (default 0.01)")
    a("--fraction-fit", type=float, default=1.0, help="share of connected clients trained each round (default 1)")
    a("--local-steps", type=int, default=10, help="optimizer steps per client per round (default 10)")
    a("--batch-size", type=int, default=8, help="examples per local step (default 8)")
    a("--lr", type=float, default=1e-3, help="client learning rate, constant (default 1e-3)")
    a("--max-length", type=int, default=128, help="tokens per example (default 128)")
    a("--val-fraction", type=float, default=0.1, help="share of --data the server evaluates on (default 0.1)")
    a("--task", choices=["chat", "instruct", "classify", "text"], help="default: detected from the file")
    a("--lora-r", type=int, default=8, help="LoRA rank")
    a("--lora-alpha", type=float, default=16.0, help="LoRA alpha")
    a("--lora-targets", default="q,k,v,o", help="comma-separated: q,k,v,o,gate,up,down or all")
    a("--lora-layers", type=int, default=None, help="adapters on the top N blocks only")
    a("--seed", type=int, default=0, help="seed (splits, adapter initialisation); the same on every party")
    a("--round-timeout", type=float, default=1800.0, help="seconds a round waits for its clients' replies")
    a("--connect-timeout", type=float, default=300.0, help="seconds round 1 waits for --clients SuperNodes")
    a("--client-cpus", type=float, default=1.0, help="simulation: CPUs per virtual client (Ray actor; default 1)")
    a("--dp-epsilon", type=float, default=None, help="server: client-level differential privacy (DP-FedAvg): clip "
      "each client's update, add calibrated Gaussian noise to their mean; the epsilon to spend over --rounds")
    a("--dp-delta", type=float, default=1e-5, help="server: delta of --dp-epsilon (default 1e-5)")
    a("--dp-clip", type=float, default=1.0, help="server: L2 bound on one client's adapter update (default 1.0)")
    a("--write-app", metavar="DIR", help="do not run: write the Flower App (DIR/pyproject.toml, these flags as its "
      "run config) for `flwr run DIR SUPERLINK` against SuperNodes started apart (docs/federated.md)")
    a("-v", "--verbose", action="store_true", help="show Flower's and the clients' log lines too")
    p.set_defaults(handler=cmd_federate)


def cmd_federate(args):
    from llmkit.train.federated import FederateConfig, federate, write_app

    fc = FederateConfig(model=args.model, data=args.data, out=args.out, clients=args.clients,
                        rounds=args.rounds, split=args.split, strategy=args.strategy, mu=args.mu,
                        fraction_fit=args.fraction_fit, local_steps=args.local_steps, batch_size=args.batch_size,
                        lr=args.lr, max_length=args.max_length, val_fraction=args.val_fraction, task=args.task,
                        lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_targets=[t for t in args.lora_targets.split(",") if t.strip()],
                        lora_layers=args.lora_layers, seed=args.seed, round_timeout=args.round_timeout,
                        connect_timeout=args.connect_timeout, dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta,
                        dp_clip=args.dp_clip, client_cpus=args.client_cpus)
    if args.write_app:
        fc.check()
        app = write_app(args.write_app, fc)
        print(f"wrote {app / 'pyproject.toml'}: run it with `flwr run {app} SUPERLINK --stream`", file=sys.stderr)
        return 0
    try:
        res = federate(fc, verbose=args.verbose)
    except RuntimeError as e:  # Flower's run failed (its logs are in OUT/flower-logs): one line, exit 1
        print(f"llmkit federate: {e}", file=sys.stderr)
        return 1
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
