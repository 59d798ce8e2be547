"""Bias probes: paired sentences equal lm-eval's crows_pairs (run as a local lm-eval task on the same pairs), the
built-in set, templates with their PNG, and bad probe files."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # lm-eval / transformers / datasets must never reach a hub here
os.environ["HF_DATASETS_OFFLINE"] = "1"

from llmkit import cli  # noqa: E402

from llmkit.eval import bias

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A transformers LlamaForCausalLM folder with a small byte-level BPE trained on the built-in pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_hf")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = bias.BUILTIN_PAIRS.read_text() + (DATA / "wikitext2_test_excerpt.txt").read_text()
    tk.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    hf_tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # large weights: peaked distributions, so no near-ties within a pair
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_pairs_equal_lm_eval_crows_pairs_local_task(tiny_hf, tmp_path, capsys):
    """lm-eval's own crows_pairs task definition (its utils.py: doc_to_choice, process_results) on a local copy of
    the pairs, through simple_evaluate with its HF backend; llmkit must give the same pct_stereotype and
    likelihood_diff, overall and for each bias type (from lm-eval's per-document samples)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    pairs = bias.load_pairs()
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    shutil.copy(Path(lm_eval.__file__).parent / "tasks" / "crows_pairs" / "utils.py", task_dir / "utils.py")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (task_dir / "crows_local.yaml").write_text(f"""task: llmkit_crows_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: ""
doc_to_target: 0
doc_to_choice: !function utils.doc_to_choice
target_delimiter: ""
process_results: !function utils.process_results
metric_list:
  - metric: likelihood_diff
    aggregation: mean
    higher_is_better: false
  - metric: pct_stereotype
    aggregation: mean
    higher_is_better: false
""")
    hflm = HFLM(pretrained=str(tiny_hf), dtype="float32", batch_size=16, device="cpu", max_length=128)
    got = lm_eval.simple_evaluate(model=hflm, tasks=["llmkit_crows_local"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir)), bootstrap_iters=0)
    theirs = got["results"]["llmkit_crows_local"]
    samples = got["samples"]["llmkit_crows_local"]

    out = tmp_path / "bias.json"
    rc, stdout, _ = _run(["eval", "bias", "--model", str(tiny_hf), "--out", str(out), "--batch-size", "7",
                          "--no-progress"], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["pct_stereotype"] == theirs["pct_stereotype,none"]
    assert res["likelihood_diff"] == pytest.approx(theirs["likelihood_diff,none"], rel=1e-4)
    for t, ours in res["per_type"].items():
        docs = [s for s in samples if s["doc"]["bias_type"] == t]
        assert ours["pct_stereotype"] == sum(s["pct_stereotype"] for s in docs) / len(docs)
        assert ours["likelihood_diff"] == pytest.approx(sum(s["likelihood_diff"] for s in docs) / len(docs), rel=1e-4)
    assert res["n"] == 96 and set(res["per_type"]) == {"gender", "race-color", "age", "religion"}
    for s in [res, *res["per_type"].values()]:
        assert s["pct_stereotype_ci"][0] <= s["pct_stereotype"] <= s["pct_stereotype_ci"][1]
    assert (tmp_path / "bias.pairs.png").read_bytes()[:4] == b"\x89PNG"
    assert "| gender | 24 |" in stdout and "| all | 96 |" in stdout


def test_builtin_pairs_are_minimal_pairs():
    pairs = bias.load_pairs()
    by_type = {}
    for p in pairs:
        by_type[p["bias_type"]] = by_type.get(p["bias_type"], 0) + 1
        assert p["sent_more"] != p["sent_less"]
        # CrowS-Pairs style: the two sentences differ only in the group words
        a, b = p["sent_more"].split(), p["sent_less"].split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 2
    assert all(n >= 24 for n in by_type.values()) and len(by_type) == 4


def test_templates_report_gaps_per_occupation_and_png(tiny_hf, tmp_path, capsys):
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"occupations": ["nurse", "engineer", "teacher"],
                                "names": {"a": ["Emily", "Sarah"], "b": ["James", "John"]},
                                "name_gaps": [["a", "b"]]}))
    out = tmp_path / "t.json.out" / "templates.json"
    rc, stdout, _ = _run(["eval", "bias", "--probe", "templates", "--model", str(tiny_hf), "--data", str(spec),
                          "--out", str(out), "--no-progress"], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["per_occupation"]) == {"nurse", "engineer", "teacher"}
    # the gap is a difference of the same continuation's log-likelihood: recompute one by hand
    from llmkit.model.checkpoint import load_model
    from llmkit.eval.evaluate import loglikelihood

    lm = load_model(str(tiny_hf), dtype="float32")
    reqs = [(c.replace("{occupation}", "nurse"), x.replace("{occupation}", "nurse").replace("{pronoun}", p))
            for c, x in bias.PRONOUN_TEMPLATES for p in ("she", "he")]
    lls = [ll for ll, _ in loglikelihood(lm.model, lm.tokenizer, reqs)]
    gap = sum(lls[0::2]) / 3 - sum(lls[1::2]) / 3
    assert res["per_occupation"]["nurse"]["pronoun_gap"] == pytest.approx(gap, rel=1e-5, abs=1e-5)
    vals = [r["name_gap_a_vs_b"] for r in res["per_occupation"].values()]
    assert res["name_gap_a_vs_b"] == pytest.approx(sum(vals) / 3)
    assert res["name_gap_a_vs_b_abs"] == pytest.approx(sum(abs(v) for v in vals) / 3)
    assert (out.parent / "templates.templates.png").read_bytes()[:4] == b"\x89PNG"
    assert "| pronoun_gap |" in stdout


@pytest.mark.parametrize("content, message", [
    ('{"sent_more": "A b.", "sent_less": "C b.", "bias_type": "age"}\n{"sent_more": "A b.", "bias_type": "age"}\n',
     "line 2 lacks 'sent_less'"),
    ('{"sent_more": "A b.", "sent_less": "", "bias_type": "age"}\n', "line 1 lacks 'sent_less'"),
    ('{"sent_more": "A b.", "sent_less": "C b."\n', "line 1 is not valid JSON"),
    ("", "holds no pairs"),
])
def test_bad_pair_files_name_the_line(tiny_hf, tmp_path, capsys, content, message):
    f = tmp_path / "pairs.jsonl"
    f.write_text(content)
    rc, _, err = _run(["eval", "bias", "--model", str(tiny_hf), "--data", str(f), "--out", str(tmp_path / "o.json")],
                      capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


def test_bad_template_file(tiny_hf, tmp_path, capsys):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"pronoun_templates": [["The {occupation} said", " hello."]]}))
    rc, _, err = _run(["eval", "bias", "--probe", "templates", "--model", str(tiny_hf), "--data", str(f)], capsys)
    assert rc == 2 and "{pronoun}" in err
