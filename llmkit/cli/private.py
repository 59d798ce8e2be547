"""`llmkit federate` and `llmkit eval bias`: the privacy and fairness commands (thin; the work is in federate.py and
bias.py). cli.py's `eval` group registers `bias` through add_eval_bias; `federate` comes in through register()."""
from __future__ import annotations

import sys


# ---------------------------------------------------------------------------------------------------------------
# eval bias


def add_eval_bias(esub):
    """The `llmkit eval bias` parser, inside cli.py's eval group."""
    from llmkit.cli import _model_flags

    q = esub.add_parser("bias", help="social-bias probes: CrowS-Pairs-style sentence pairs or occupation templates")
    _model_flags(q, dtype="float32")  # scores in float32 (lm-eval parity), as the other eval commands
    q.add_argument("--probe", choices=["pairs", "templates"], default="pairs",
                   help="pairs: {sent_more, sent_less, bias_type} scored as lm-eval crows_pairs; templates: "
                   "occupation x pronoun / name log-likelihood gaps (default pairs)")
    q.add_argument("--data", default=None, help="pairs: JSONL/JSON/CSV (default: the built-in illustrative set); "
                   "templates: JSON with occupations/pronoun_templates/names/name_templates/name_gaps to override")
    q.add_argument("--out", default=None, help="write the results JSON here (the PNG goes beside it)")
    q.add_argument("--limit", type=int, default=None, help="pairs: the first N pairs")
    q.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    q.set_defaults(handler=cmd_eval_bias)


def cmd_eval_bias(args):
    from llmkit.eval import bias
    from llmkit.cli import _load, _plot_path
    from llmkit.eval.evaluate import write_results

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    # bad files fail before the model loads
    bias.load_pairs(args.data, args.limit) if args.probe == "pairs" else bias.load_templates(args.data)
    lm = _load(args)
    plot = _plot_path(args, args.probe)
    if args.probe == "pairs":
        res = bias.evaluate_pairs(lm, args.data, args.limit, args.batch_size, args.progress, plot)
    else:
        res = bias.evaluate_templates(lm, args.data, args.batch_size, args.progress, plot)
    if args.out:
        write_results(args.out, res)
        print(f"[wrote {args.out}" + (f" and {plot}]" if plot else "]"), file=sys.stderr)
    print(f"{res['task']} on {res['data']} ({res['n']} {'pairs' if args.probe == 'pairs' else 'occupations'}, "
          f"{res['seconds']:.1f} s)")
    print(bias.format_report(res))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# federate


def register(sub):
    """The `llmkit federate` parser."""
    from llmkit.cli import _Parser

    p = sub.add_parser("federate", help="federated LoRA fine-tuning on Flower (only adapter weights travel)")
    assert isinstance(p, _Parser)
    a = p.add_argument
    a("--role", choices=["local", "server", "client"], default="local",
      help="local: server + --clients client processes on loopback (default); server: wait for remote clients on "
      "--listen; client: connect to --server and train on --data (or its --shard of it)")
    a("--model", default="default", help="base model folder, .gguf or 'default'")
    a("--data", required=True, help="training data (classification CSV/TSV/JSONL, chat/instruct JSONL or .txt); "
      "the server holds out --val-fraction of it for its evaluation")
    a("--out", help="output folder (server, local): final adapter, metrics.jsonl, federate.png")
    a("--clients", type=int, default=4, help="number of clients (default 4)")
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
    a("--round-timeout", type=float, default=1800.0, help="seconds a round waits for its clients")
    a("--connect-timeout", type=float, default=300.0, help="seconds to wait for clients to connect (or the server)")
    a("--dp-epsilon", type=float, default=None, help="server: client-level differential privacy (DP-FedAvg): clip "
      "each client's update, add calibrated Gaussian noise to their mean; the epsilon to spend over --rounds")
    a("--dp-delta", type=float, default=1e-5, help="server: delta of --dp-epsilon (default 1e-5)")
    a("--dp-clip", type=float, default=1.0, help="server: L2 bound on one client's adapter update (default 1.0)")
    a("--listen", default="0.0.0.0:8080", help="server: address to listen on (default 0.0.0.0:8080)")
    a("--server", help="client: the server's HOST:PORT")
    a("--shard", help="client: I/K trains on shard I of --data split K ways with --split (default: all of --data)")
    p.set_defaults(handler=cmd_federate)


def cmd_federate(args):
    from llmkit.train.federated import FederateConfig, federate, run_client

    fc = FederateConfig(model=args.model, data=args.data, out=args.out or "", clients=args.clients,
                        rounds=args.rounds, split=args.split, strategy=args.strategy, mu=args.mu,
                        fraction_fit=args.fraction_fit, local_steps=args.local_steps, batch_size=args.batch_size,
                        lr=args.lr, max_length=args.max_length, val_fraction=args.val_fraction, task=args.task,
                        lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_targets=[t for t in args.lora_targets.split(",") if t.strip()],
                        lora_layers=args.lora_layers, seed=args.seed, round_timeout=args.round_timeout,
                        connect_timeout=args.connect_timeout, dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta,
                        dp_clip=args.dp_clip)
    if args.role == "client":
        if not args.server:
            raise ValueError("--role client needs --server HOST:PORT")
        if args.shard:
            try:
                i, k = (int(x) for x in args.shard.split("/"))
            except ValueError:
                raise ValueError(f"--shard must be I/K (e.g. 0/4), not {args.shard!r}") from None
            if not 0 <= i < k:
                raise ValueError(f"--shard {args.shard}: I must be in 0..K-1")
            fc.clients = k
        fc.check()
        run_client(fc, args.server, None if not args.shard else i)
        return 0
    if not args.out:
        raise ValueError(f"--role {args.role} needs --out")
    res = federate(fc, role=args.role, listen=args.listen if args.role == "server" else None)
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
