"""Evaluation commands: `llmkit eval perplexity|choice|generate|classify|bias|mlm|tag`, `llmkit lm-eval` and
`llmkit classify` (label texts with a fine-tuned classifier)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import llmkit.cli.checks as checks
import llmkit.cli.common as common
from llmkit.cli.flags import Parser, model_flags, sampling_flags

# ---------------------------------------------------------------------------------------------------------------
# eval


def add_eval(sub):
    p = sub.add_parser("eval", help="evaluate a model: perplexity, choice, generate, classify, bias, mlm, tag "
                       "(JSON + tables)")
    esub = p.add_subparsers(dest="eval_command", required=True, parser_class=Parser)

    def eval_flags(q, batch_size, limit_help="first N records (perplexity: first N lines)"):
        model_flags(q, dtype="float32")  # scores in float32 (lm-eval parity) unless --dtype says otherwise
        q.add_argument("--data", required=True, help="data file")
        q.add_argument("--out", default=None, help="write the results JSON here (plots go beside it)")
        q.add_argument("--limit", type=int, default=None, help=limit_help)
        q.add_argument("--batch-size", type=int, default=batch_size, help="rows per forward pass")
        q.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    q = esub.add_parser("perplexity", help="rolling-window perplexity, bits per byte (lm-eval wikitext semantics)")
    eval_flags(q, 8)
    q.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's)")
    q.add_argument("--stride", type=int, default=None, help="tokens scored per window after the first (default: "
                   "--context, i.e. disjoint windows exactly as lm-eval)")
    q.set_defaults(handler=cmd_eval_perplexity)

    q = esub.add_parser("choice", help="multiple choice over {query, choices, label} JSONL (lm-eval multiple_choice)")
    eval_flags(q, 32)
    q.add_argument("--num-fewshot", type=int, default=0, help="solved examples drawn from the same file")
    q.add_argument("--query-field", default="query")
    q.add_argument("--choices-field", default="choices")
    q.add_argument("--label-field", default="label", help="0-based index of the right choice")
    q.set_defaults(handler=cmd_eval_choice)

    q = esub.add_parser("generate", help="generate for prompts and score BLEU, chrF, ROUGE, exact match")
    eval_flags(q, 16)
    sampling_flags(q)
    q.set_defaults(max_new_tokens=128)
    q.add_argument("--prompt-field", default="prompt")
    q.add_argument("--reference-field", default="reference", help="a string or a list of strings "
                   "('references' is also accepted)")
    q.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    q.set_defaults(handler=cmd_eval_generate)

    q = esub.add_parser("classify", help="accuracy, P/R/F1, confusion matrix, calibration of a classifier")
    eval_flags(q, 32)
    q.add_argument("--text-field", default="text")
    q.add_argument("--label-field", default="label", help="label index or label name")
    q.set_defaults(handler=cmd_eval_classify)
    add_eval_bias(esub)

    q = esub.add_parser("mlm", help="masked LM: masked-token accuracy and loss (pretraining masking), "
                        "pseudo-perplexity")
    eval_flags(q, 8, "first N windows of each part (masked-accuracy windows, sentence windows)")
    q.add_argument("--context", type=int, default=None, help="window length in tokens (default: min(256, the "
                   "model's positions), pretraining's default --block-size)")
    q.add_argument("--seed", type=int, default=0, help="seed of the masks (as pretraining's --seed; default 0)")
    q.set_defaults(handler=cmd_eval_mlm)

    q = esub.add_parser("tag", help="a tagger's entity-level precision, recall, F1 (micro and per type; seqeval's "
                        "default mode) on CoNLL or JSONL {tokens, tags}")
    eval_flags(q, 32, "first N sentences")
    q.add_argument("--max-length", type=int, default=512, help="tokens per sentence (words beyond are tagged O)")
    q.add_argument("--predictions", default=None, help="write token<TAB>gold<TAB>predicted here (conlleval layout)")
    q.set_defaults(handler=cmd_eval_tag)


def _eval_finish(args, res):
    from llmkit.eval.evaluate import markdown_table
    from llmkit.utils.io import write_results

    if args.out:
        write_results(args.out, res)
        print(f"[wrote {args.out}]", file=sys.stderr)
    for key in ("bleu_signature", "chrf_signature"):
        if key in res:
            print(f"{key.split('_')[0]}: {res[key]}")
    size = f"{res['n_tokens']} tokens" if "n_tokens" in res else f"{res['n']} items"
    print(f"{res['task']} on {res['data']} ({size}, {res['seconds']:.1f} s)")
    print(markdown_table(res))
    return 0


def _plot_path(args, name):
    if not args.out:
        return None
    out = Path(args.out)
    return out.with_name(f"{out.stem}.{name}.png")


def _eval_checks(args):
    checks.limit(args)
    checks.at_least(args, 1, "--batch-size", "--context", "--stride", "--max-new-tokens")
    checks.at_least(args, 0, "--num-fewshot")
    checks.output_file(args.out)


def cmd_eval_perplexity(args):
    from llmkit.eval.evaluate import evaluate_perplexity
    from llmkit.utils.io import read_utf8

    _eval_checks(args)
    read_utf8(args.data)  # bad data fails before the model loads
    lm = common.load(args, lambda lm: checks.generative(lm, "perplexity"))
    res = evaluate_perplexity(lm, args.data, context=args.context, stride=args.stride,
                              batch_size=args.batch_size, limit=args.limit, progress=args.progress)
    return _eval_finish(args, res)


def cmd_eval_choice(args):
    from llmkit.eval.evaluate import evaluate_choice, load_choice_records

    _eval_checks(args)
    load_choice_records(args.data, args.query_field, args.choices_field, args.label_field)  # fail before loading
    lm = common.load(args, lambda lm: checks.generative(lm, "multiple-choice scoring"))
    res = evaluate_choice(lm, args.data, args.query_field, args.choices_field, args.label_field,
                          num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                          progress=args.progress, plot=_plot_path(args, "reliability"))
    return _eval_finish(args, res)


def cmd_eval_generate(args):
    from llmkit.eval.evaluate import evaluate_generate, load_generate_records

    _eval_checks(args)
    params = common.params(args)
    load_generate_records(args.data, args.prompt_field, args.reference_field)  # fail before loading
    lm = common.load(args, lambda lm: checks.generative(lm, "eval generate"))
    res = evaluate_generate(lm, args.data, params, args.prompt_field, args.reference_field,
                            chat=args.chat, limit=args.limit, batch_size=args.batch_size, progress=args.progress)
    return _eval_finish(args, res)


def cmd_eval_classify(args):
    from llmkit.eval.evaluate import evaluate_classify, load_classify_records

    _eval_checks(args)
    load_classify_records(args.data, args.text_field, args.label_field)  # bad data fails before loading
    plots = None
    if args.out:
        plots = str(Path(args.out).with_suffix("")) + "_plots"
    lm = common.load(args, checks.classifier)
    res = evaluate_classify(lm, args.data, args.text_field, args.label_field, limit=args.limit,
                            batch_size=args.batch_size, progress=args.progress, plots=plots)
    return _eval_finish(args, res)


def cmd_eval_mlm(args):
    from llmkit.data.corpus import read_texts
    from llmkit.eval.mlm import evaluate_mlm, need_masked_lm

    _eval_checks(args)
    checks.input_file(args.data, "--data")
    read_texts(args.data)  # bad data fails before the model loads
    lm = common.load(args, need_masked_lm)
    res = evaluate_mlm(lm, args.data, context=args.context, seed=args.seed, batch_size=args.batch_size,
                       limit=args.limit, progress=args.progress)
    return _eval_finish(args, res)


def cmd_eval_tag(args):
    from llmkit.data.conll import read_tagged
    from llmkit.eval.tag import evaluate_tag, format_scores
    from llmkit.infer.tag import check_tagger
    from llmkit.utils.io import write_results

    _eval_checks(args)
    checks.at_least(args, 1, "--max-length")
    checks.input_file(args.data, "--data")
    checks.output_file(args.predictions, "--predictions")
    read_tagged(args.data)  # bad data fails before the model loads
    lm = common.load(args, check_tagger)
    res = evaluate_tag(lm, args.data, max_length=args.max_length, batch_size=args.batch_size, limit=args.limit,
                       progress=args.progress, predictions=args.predictions)
    if args.out:
        write_results(args.out, res)
        print(f"[wrote {args.out}]", file=sys.stderr)
    print(f"tag on {res['data']} ({res['n']} sentences, {res['n_tokens']} tokens, {res['seconds']:.1f} s)")
    print(format_scores(res))
    return 0


def add_eval_bias(esub):
    """The `llmkit eval bias` parser, inside the eval group."""
    q = esub.add_parser("bias", help="social-bias probes: CrowS-Pairs-style sentence pairs or occupation templates")
    model_flags(q, dtype="float32")  # scores in float32 (lm-eval parity), as the other eval commands
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
    from llmkit.utils.io import write_results

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    # bad files fail before the model loads
    bias.load_pairs(args.data, args.limit) if args.probe == "pairs" else bias.load_templates(args.data)
    lm = common.load(args)
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
# lm-eval / classify


def add_lm_eval(sub):
    # prefix_chars that never occur: every argument, --help included, goes through untouched to lm-eval
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness with llmkit registered as `--model llmkit`",
                       add_help=False, prefix_chars="\x00")
    p.add_argument("args", nargs=argparse.REMAINDER, help="lm-eval's own arguments")
    p.set_defaults(handler=cmd_lm_eval)


def cmd_lm_eval(args):
    from llmkit.eval.lm_eval import main as lm_eval_main

    return lm_eval_main(args.args)


def add_classify(sub):
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier (label and probability per line)")
    p.add_argument("texts", nargs="*", help="texts to classify")
    model_flags(p, dtype="float32")
    p.add_argument("--input", help="file with one text per line ('-' reads stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object per line: text, label, probability, probs")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--max-length", type=int, default=512, help="tokens per text (longer ones are cut)")
    p.set_defaults(handler=cmd_classify)


def cmd_classify(args):
    from llmkit.utils.io import read_utf8

    checks.at_least(args, 1, "--batch-size", "--max-length")
    texts = list(args.texts)
    if args.input:
        checks.input_file(args.input, "--input")
        src = sys.stdin.read() if args.input == "-" else read_utf8(args.input)
        texts += [line for line in src.splitlines() if line.strip()]
    if not texts:
        raise ValueError("nothing to classify: give texts as arguments or --input FILE")
    lm = common.load(args, checks.classifier)
    from llmkit.infer.classify import predict_proba

    probs = predict_proba(lm.model, lm.tokenizer, texts, args.max_length, args.batch_size)
    names = [lm.config.id2label.get(str(i), str(i)) for i in range(lm.config.num_labels)]
    for text, p in zip(texts, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        if args.json:
            print(json.dumps({"text": text, "label": names[best], "probability": round(p[best], 6),
                              "probs": {n: round(x, 6) for n, x in zip(names, p)}}, ensure_ascii=False))
        else:
            print(f"{names[best]}\t{p[best]:.4f}")
    return 0
