"""The CLI as a user runs it: real subprocesses, real stdout/stderr, exit codes."""
import os
import subprocess
import sys

import pytest
import torch

from llmkit.model.checkpoint import save_model
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer


def llmkit(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "llmkit", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_chat_from_a_pipe_answers_paris():
    # what `printf 'What is the capital of France?\n' | llmkit chat` does (the entry point of `make chat`)
    r = llmkit("chat", stdin="What is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Traceback" not in r.stderr


def test_generate_streams_only_the_text_to_stdout():
    r = llmkit("generate", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "loaded" in r.stderr and "loaded" not in r.stdout  # logs go to stderr


def test_generate_chat_flag_and_stop_string():
    args = ("generate", "What is the capital of France?", "--chat", "--max-new-tokens", "20")
    plain = llmkit(*args)
    assert plain.returncode == 0, plain.stderr
    assert "Paris" in plain.stdout  # the chat template is applied: the model answers
    r = llmkit(*args, "--stop", "Paris")
    assert r.returncode == 0, r.stderr
    assert "Paris" not in r.stdout and r.stdout.strip() == plain.stdout.split("Paris")[0].strip()


def test_info_on_the_default_model():
    r = llmkit("info")
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "134,515,008" in r.stdout and "8192" in r.stdout


def test_info_tells_the_stored_dtype_from_the_one_it_runs_in(tmp_path):
    save_model(tmp_path / "bf", Transformer(preset("llama-tiny", vocab_size=128)), dtype="bfloat16")
    r = llmkit("info", "--model", str(tmp_path / "bf"), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "stored as        bfloat16" in r.stdout and "runs as          float32" in r.stdout


def test_convert_gguf_to_hf_folder_loads_in_transformers(tmp_path):
    import transformers

    from llmkit.model.checkpoint import default_gguf_path

    r = llmkit("convert", str(default_gguf_path()), str(tmp_path / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("args,needle", [
    (("generate", "hi", "--model", "/no/such/model"), "model not found"),
    (("generate", "hi", "--top-p", "1.5", "--max-new-tokens", "2"), "top_p"),
    (("generate", "hi", "--max-new-tokens", "many"), "invalid int value"),
    (("info", "--model", "README.md"), "not a GGUF file or a model folder"),
    (("nosuchcommand",), "invalid choice"),
])
def test_user_errors_are_one_line_without_traceback(args, needle):
    r = llmkit(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1


def test_corrupt_safetensors_and_long_prompt(tmp_path):
    torch.manual_seed(0)
    save_model(tmp_path / "m", Transformer(preset("llama-tiny")))
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    r = llmkit("info", "--model", str(tmp_path / "m"))
    assert r.returncode == 2 and "truncated or corrupt" in r.stderr and "Traceback" not in r.stderr
    r = llmkit("generate", "word " * 9000, "--max-new-tokens", "1")
    assert r.returncode == 2 and "context" in r.stderr and "Traceback" not in r.stderr
