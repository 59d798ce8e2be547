"""The compression report: parameter counts of quantized models, the row cache (a hit reads, a change or a corrupt
file measures again), plain progress lines on a pipe, the same default sizes on every command."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model

from llmkit.cli import build_parser, main
from llmkit.cli import flags
from llmkit.compress import report as R
from llmkit.compress.probe import probe
from llmkit.model import quant as Q
from llmkit.model.checkpoint import load_model, save_model

ROOT = Path(__file__).parents[2]
DATA = Path(__file__).parents[1] / "data"
SMALL = dict(wikitext=str(DATA / "wikitext2_test_excerpt.txt"), hellaswag=str(DATA / "hellaswag_val_8.jsonl"),
             eval_limit=2, ppl_chars=300, decode_tokens=4)
SMALL_FLAGS = ["--wikitext", SMALL["wikitext"], "--hellaswag", SMALL["hellaswag"], "--eval-limit", "2",
               "--ppl-chars", "300", "--decode-tokens", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def probes(monkeypatch):
    """The probe replaced by a counter (its subprocess is tested end to end below): the paths it was asked about."""
    calls = []

    def fake(path, decode_tokens, dtype=None, threads=None):
        calls.append(str(path))
        return {"decode_tok_s": 100.0, "peak_rss_mb": 300.0, "probe_threads": threads, "probe_repeats": 3,
                "load_avg": 0.0}

    monkeypatch.setattr(R, "probe", fake)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_models_count_their_logical_weights(tiny, tmp_path, method):
    base = load_model(tiny, dtype="float32").model
    total, nonzero = R.count_params(base)
    assert total == sum(p.numel() for p in base.parameters()) and nonzero == total
    model = load_model(tiny, dtype="float32").model
    zeroed = 0
    with torch.no_grad():  # half of every block weight pruned: int8 keeps exact zeros (q = 0)
        for name, p in model.named_parameters():
            if name.startswith("layers.") and p.dim() == 2:
                p.view(-1)[::2] = 0
                zeroed += p.numel() - p.numel() // 2
        Q.quantize_model(model, method, 32)
    assert R.count_params(model)[0] == total
    save_model(tmp_path / "q", model, None)  # as `llmkit quantize` writes it, loaded back with its fused layers
    loaded = load_model(tmp_path / "q").model
    assert Q.is_quantized(loaded)
    counted, nz = R.count_params(loaded)
    assert counted == total
    if method == "int8":
        assert total - nz >= zeroed  # the pruned weights are still counted as zeros
    else:  # w = s (q - 8) + z: a zero survives only where it was a group's minimum, but nothing is lost from the count
        assert 0 < nz <= total


# ---------------------------------------------------------------------------------------------------------------
# the row cache


def test_a_second_report_reads_the_base_row_from_the_cache(tiny, tmp_path, probes, report_home):
    first = R.measure(tiny, name="before", **SMALL)
    files = list((report_home / "compress_report").glob("*.json"))
    assert len(files) == 1 and probes == [str(tiny)] and first["cached"] is False
    again = R.measure(tiny, name="base", run_seconds=5.0, **SMALL)
    assert probes == [str(tiny)]  # not measured again
    assert again["cached"] is True and again["name"] == "base" and again["run_seconds"] == 5.0
    for k in ("params", "nonzero_params", "weights", "wikitext_ppl", "hellaswag_acc_norm", "decode_tok_s"):
        assert again[k] == first[k], k
    table = R.render([first, again])
    assert "| base (cached) |" in table and "read from the cache" in table and "| before |" in table
    copy = shutil.copytree(tiny, tmp_path / "copy")  # the same bytes elsewhere: keyed by content, not path
    assert R.measure(copy, **SMALL)["cached"] is True and len(probes) == 1
    R.measure(tiny, **{**SMALL, "eval_limit": 3})  # another setting: measured
    R.measure(tiny, **SMALL, use_cache=False)  # --no-cache: measured (and the entry refreshed)
    assert len(probes) == 3
    lm = load_model(copy, dtype="float32")
    with torch.no_grad():
        lm.model.norm.weight.mul_(2)
    save_model(copy, lm.model, lm.tokenizer, lm.generation_config)  # other weights: measured
    assert R.measure(copy, **SMALL)["cached"] is False and len(probes) == 4


@pytest.mark.parametrize("junk", ["{not json", "", "[1, 2]", '{"key": "other", "row": {}}'])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(tiny, probes, report_home, junk):
    R.measure(tiny, **SMALL)
    (entry,) = (report_home / "compress_report").glob("*.json")
    entry.write_text(junk)
    row = R.measure(tiny, **SMALL)
    assert row["cached"] is False and len(probes) == 2
    assert json.loads(entry.read_text())["row"]["params"] == row["params"]
    assert R.measure(tiny, **SMALL)["cached"] is True and len(probes) == 2


def test_quantize_reports_the_same_parameter_count_before_and_after(tiny, tmp_path, probes):
    out = tmp_path / "q8"
    assert main(["quantize", "--model", str(tiny), "--out", str(out), "--method", "int8", *SMALL_FLAGS]) == 0
    before, after = json.loads((out / "compress_report.json").read_text())["rows"]
    assert before["params"] == after["params"] and after["weights"] == "int8" and before["weights"] == "float32"
    assert after["file_mb"] < before["file_mb"] and len(probes) == 2


# ---------------------------------------------------------------------------------------------------------------
# progress lines on a pipe, the real probe, the cache across processes


def test_compare_prints_progress_lines_on_a_pipe_and_reads_the_cache_next_time(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLMKIT_HOME": str(tmp_path / "home")}

    def compare():
        return subprocess.run([sys.executable, "-m", "llmkit", "compare", str(tiny), *SMALL_FLAGS],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)

    r = compare()
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[report")]
    for stage in ("loading", "perplexity", "HellaSwag", "fresh process", "done in"):
        assert any(stage in ln for ln in lines), (stage, r.stderr)
    assert "\r" not in r.stderr  # whole lines, no bar redrawn in place
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"| {tiny.name}"))
    rss, speed = (float(c.replace(",", "")) for c in [c.strip() for c in row.split("|")][6:8])
    assert rss > 100 and speed > 0
    assert "fastest of 3 runs" in r.stdout
    r = compare()
    assert r.returncode == 0, r.stderr
    assert "read from the cache" in r.stderr and "perplexity" not in r.stderr
    assert f"| {tiny.name} (cached) |" in r.stdout and row.split("|")[6:8] == \
        next(ln for ln in r.stdout.splitlines() if ln.startswith(f"| {tiny.name}")).split("|")[6:8]


def test_a_long_stage_says_it_is_still_running_off_a_terminal(capsys):
    say = R._Say(True, "before", every=0.05)
    say("HellaSwag acc_norm")
    time.sleep(0.3)
    say("done", last=True)  # ends the stage and starts none
    time.sleep(0.2)
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("before: HellaSwag acc_norm") and err[-1].endswith("before: done")
    assert len([ln for ln in err if ln.endswith("HellaSwag acc_norm: still running")]) >= 2


def test_the_probe_counts_its_own_memory_not_its_parents(tiny):
    ballast = torch.ones(256 * 2**20)  # 1 GiB held by this process while the probe runs
    row = probe(tiny, decode_tokens=4)
    assert ballast[0] == 1 and 0 < row["peak_rss_mb"] < 1024  # ru_maxrss would start at this process's RSS
    assert row["decode_tok_s"] > 0 and row["probe_repeats"] == 3 and row["probe_threads"] == torch.get_num_threads()


def test_every_command_has_the_same_report_defaults():
    assert (flags.REPORT_EVAL_LIMIT, flags.REPORT_PPL_CHARS, flags.REPORT_DECODE_TOKENS) == \
        (R.EVAL_LIMIT, R.PPL_CHARS, R.DECODE_TOKENS)
    p = build_parser()
    for argv in (["quantize", "--out", "x", "--method", "int8"], ["prune", "--out", "x"],
                 ["distill", "--data", "d", "--out", "x"], ["compare", "default"]):
        a = p.parse_args(argv)
        assert (a.eval_limit, a.ppl_chars, a.decode_tokens, a.report_cache) == \
            (R.EVAL_LIMIT, R.PPL_CHARS, R.DECODE_TOKENS, True), argv
