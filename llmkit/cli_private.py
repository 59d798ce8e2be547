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
    _model_flags(q)
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
    from llmkit import bias
    from llmkit.cli import _load, _plot_path
    from llmkit.evaluate import write_results

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
