"""Every user-error path of the CLI, run as a careless user would: a real `python -m llmkit` subprocess, exit code 2,
exactly one line on stderr naming the problem and the fix, no traceback, nothing left at --out.

The commands start together (a few at a time) in one fixture, so the ~30 interpreter start-ups overlap."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from llmkit.model.checkpoint import save_model
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer

DATA = Path(__file__).parents[1] / "data"
SHAKESPEARE = DATA / "tinyshakespeare_head.txt"
HELLASWAG = DATA / "hellaswag_val_8.jsonl"
CHAT = DATA / "seed_tasks_chat_6.jsonl"
ROOT = Path(__file__).resolve().parents[2]


def _env():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def llmkit(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "llmkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=cwd)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """A folder of careless inputs: tiny models (llama, bert, classifier, mismatched, headless) and bad files."""
    from safetensors.torch import load_file, save_file

    from llmkit.data.tokenizer_train import train_tokenizer

    d = tmp_path_factory.mktemp("careless")
    tok = train_tokenizer([SHAKESPEARE], 300, d / "tok")
    torch.manual_seed(0)
    save_model(d / "llama", Transformer(preset("llama-tiny", vocab_size=tok.vocab_size)), tok)
    save_model(d / "bert", Transformer(preset("bert-tiny", vocab_size=tok.vocab_size)), tok)
    save_model(d / "cls", Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, num_labels=2,
                                             id2label={"0": "neg", "1": "pos"})), tok)
    save_model(d / "mismatch", Transformer(preset("llama-tiny", vocab_size=tok.vocab_size)), tok)
    cfg = json.loads((d / "mismatch" / "config.json").read_text())
    cfg["hidden_size"] = cfg["llmkit"]["n_embd"] = 96  # config.json no longer matches model.safetensors
    (d / "mismatch" / "config.json").write_text(json.dumps(cfg))
    save_model(d / "nohead", Transformer(preset("llama-tiny", vocab_size=tok.vocab_size)), tok)
    sd = load_file(d / "nohead" / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, d / "nohead" / "model.safetensors")
    (d / "a_folder").mkdir()
    (d / "a_file").write_text("x")
    (d / "bad.yaml").write_text("max_steps: [1, 2\n")
    (d / "bad_flags.json").write_text('{"max_steps": 1,')
    (d / "bad_model.json").write_text('{"n_layer": ')
    (d / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (d / "header_only.tsv").write_text("text\tlabel\n")
    (d / "not_empty").mkdir()
    (d / "not_empty" / "keep.txt").write_text("mine")
    (d / "tiny.txt").write_text("too short to hold a validation block\n" * 3)
    return d


def _taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


TAKEN = {}
# (id, arguments (w = the fixture folder), words the one stderr line must hold, the --out path that must not exist)
CASES = [
    ("classify-input-folder", lambda w: ["classify", "--model", w / "cls", "--input", w / "a_folder"],
     ["--input", "is a folder", "give a file"], None),
    ("tokenizer-out-file", lambda w: ["tokenizer", "train", SHAKESPEARE, "--vocab-size", "300", "--out", w / "a_file"],
     ["--out", "is a file", "give a folder"], None),
    ("pretrain-out-file", lambda w: ["pretrain", "--data", SHAKESPEARE, "--out", w / "a_file", "--char"],
     ["--out", "is a file", "give a folder"], None),
    ("pretrain-bad-yaml", lambda w: ["pretrain", "--config", w / "bad.yaml"],
     ["bad.yaml", "not valid YAML/JSON", "line"], None),
    ("pretrain-bad-json-config", lambda w: ["pretrain", "--config", w / "bad_flags.json"],
     ["bad_flags.json", "not valid YAML/JSON"], None),
    ("pretrain-bad-model-config", lambda w: ["pretrain", "--data", SHAKESPEARE, "--out", w / "pt1", "--char",
                                             "--model-config", w / "bad_model.json"],
     ["bad_model.json", "not valid JSON"], "pt1"),
    ("pretrain-data-folder", lambda w: ["pretrain", "--data", w / "a_folder", "--out", w / "pt2"],
     ["a_folder", "is a folder", "give a file"], "pt2"),
    ("pretrain-zero-batch", lambda w: ["pretrain", "--data", SHAKESPEARE, "--out", w / "pt3", "--batch-size", "0"],
     ["--batch-size 0", ">= 1"], "pt3"),
    ("eval-out-folder", lambda w: ["eval", "choice", "--model", w / "llama", "--data", HELLASWAG,
                                   "--out", w / "a_folder"],
     ["--out", "is a folder", "results.json"], None),
    ("eval-choice-limit-0", lambda w: ["eval", "choice", "--model", w / "llama", "--data", HELLASWAG, "--limit", "0"],
     ["--limit 0", "omit --limit"], None),
    ("eval-data-folder", lambda w: ["eval", "perplexity", "--model", w / "llama", "--data", w / "a_folder"],
     ["a_folder", "is a folder"], None),
    ("eval-perplexity-encoder", lambda w: ["eval", "perplexity", "--model", w / "bert", "--data", SHAKESPEARE],
     ["masked", "perplexity", "causal"], None),
    ("eval-choice-classifier", lambda w: ["eval", "choice", "--model", w / "cls", "--data", HELLASWAG],
     ["classifier", "eval classify"], None),
    ("eval-classify-header-only", lambda w: ["eval", "classify", "--model", w / "cls", "--data",
                                             w / "header_only.tsv", "--out", w / "ec.json"],
     ["header_only.tsv", "no records"], "ec.json"),
    ("serve-port-range", lambda w: ["serve", "--model", w / "llama", "--port", "99999"],
     ["--port 99999", "1-65535"], None),
    ("serve-missing-model", lambda w: ["serve", "--model", w / "missing", "--port", "0"],
     ["model not found", "missing"], None),
    ("serve-classifier", lambda w: ["serve", "--model", w / "cls", "--port", "0"], ["is a classifier", "classify"],
     None),  # an encoder serves embeddings now (tests/serve/test_encoder_server.py)
    ("serve-port-taken", lambda w: ["serve", "--model", w / "llama", "--port", str(TAKEN["port"])],
     ["cannot listen on 127.0.0.1:", "choose another --port"], None),
    ("serve-key-file-folder", lambda w: ["serve", "--api-key-file", w / "a_folder"],
     ["--api-key-file", "is a folder"], None),
    ("finetune-lora-r-0", lambda w: ["finetune", "--model", w / "llama", "--data", CHAT, "--out", w / "ft1",
                                     "--lora-r", "0"], ["--lora-r 0", ">= 1"], "ft1"),
    ("finetune-epochs-and-steps", lambda w: ["finetune", "--model", w / "llama", "--data", CHAT, "--out", w / "ft2",
                                             "--epochs", "1", "--max-steps", "5"], ["--epochs", "--max-steps",
                                                                                     "not both"], "ft2"),
    ("finetune-not-utf8", lambda w: ["finetune", "--model", w / "llama", "--data", w / "latin1.jsonl",
                                     "--out", w / "ft3"], ["latin1.jsonl", "line 1", "not UTF-8"], "ft3"),
    ("finetune-out-file", lambda w: ["finetune", "--model", w / "llama", "--data", CHAT, "--out", w / "a_file"],
     ["--out", "is a file"], None),
    ("generate-config-mismatch", lambda w: ["generate", "hi", "--model", w / "mismatch"],
     ["config.json does not match the weights", "(300, 64)", "(300, 96)"], None),
    ("generate-missing-head", lambda w: ["generate", "hi", "--model", w / "nohead"],
     ["missing its language-model head", "lm_head.weight"], None),
    ("generate-encoder", lambda w: ["generate", "hi", "--model", w / "bert"], ["masked", "causal"], None),
    ("generate-classifier", lambda w: ["generate", "hi", "--model", w / "cls"], ["classifier", "llmkit classify"],
     None),
    ("generate-bad-top-p", lambda w: ["generate", "hi", "--model", w / "missing", "--top-p", "2"], ["top_p"], None),
    ("generate-no-cuda", lambda w: ["generate", "hi", "--model", w / "llama", "--device", "cuda:7"],
     ["--device cuda:7", "--device cpu"], None),
    ("pretrain-bad-device", lambda w: ["pretrain", "--data", SHAKESPEARE, "--out", w / "pt4", "--device", "gpu"],
     ["--device 'gpu'", "cpu, cuda"], "pt4"),
    ("classify-language-model", lambda w: ["classify", "hi", "--model", w / "llama"],
     ["no classification head", "finetune --task classify"], None),
    ("convert-out-not-empty", lambda w: ["convert", w / "llama", w / "not_empty"], ["not empty", "new output"], None),
    ("merge-out-file", lambda w: ["merge", w / "llama", "--out", w / "a_file"], ["--out", "is a file"], None),
]


@pytest.fixture(scope="module")
def results(w):
    taken = _taken_port()
    TAKEN["port"] = taken.getsockname()[1]  # a port another program holds
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            runs = {cid: pool.submit(llmkit, *make(w), cwd=w) for cid, make, _, _ in CASES}
            return {cid: run.result() for cid, run in runs.items()}
    finally:
        taken.close()


@pytest.mark.parametrize("cid,words,out", [(c, words, out) for c, _, words, out in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2_nothing_written(results, w, cid, words, out):
    r = results[cid]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("llmkit "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert r.stdout == ""
    if out is not None:
        assert not (w / out).exists()
    assert (w / "a_file").read_text() == "x" and (w / "not_empty" / "keep.txt").read_text() == "mine"


def test_a_failure_after_output_began_leaves_no_folder(w):
    # the validation split is known only after the tokenizer is trained into --out and the text tokenized
    r = llmkit("pretrain", "--data", w / "tiny.txt", "--out", w / "late", "--char", "--block-size", "64")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fewer than one block" in r.stderr.strip().splitlines()[-1]
    assert not (w / "late").exists()


def test_serve_says_serving_once_the_port_listens(w):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", "--model", f"tiny={w / 'llama'}", "--port",
                          str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = p.stdout.readline()
        assert f"serving tiny on http://127.0.0.1:{port}" in line, (line, p.stderr.read() if p.poll() else "")
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening when the line appears
        deadline = time.time() + 30
        while True:  # the model was loaded before the line: ready at once, or after building its engine
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    assert resp.status == 200
                    break
            except urllib.error.HTTPError as e:
                assert e.code == 503 and time.time() < deadline
                time.sleep(0.1)
    finally:
        p.terminate()
        p.wait(timeout=30)
