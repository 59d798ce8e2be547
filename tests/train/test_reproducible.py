"""Runs that reproduce (issue 26): --seed fixes a fine-tuning run (LoRA, head, dropout, data order), fine-tuning data
is split by rank (2 processes x batch B/2 = 1 process x batch B, tokens counted once), every rank's random state
survives a resume, and DP-SGD runs report the validation loss every other run reports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_model
from llmkit.train.finetune import FinetuneConfig, finetune
from llmkit.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parents[1] / "data"
CHAT, SST = DATA / "seed_tasks_chat_6.jsonl", DATA / "sst_train_30.tsv"
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("base"))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _env():
    path = os.pathsep.join(filter(None, [str(ROOT), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


TASKS = {"classify": dict(data=SST, batch_size=4, val_fraction=0.2),
         "chat": dict(data=CHAT, batch_size=2, val_fraction=0.34, max_length=256)}


def _finetune(base, out, task, seed, **tc_kw):
    fc = FinetuneConfig(model=str(base), out=str(out), task=task, seed=seed, lora_dropout=0.1,
                        **{k: (str(v) if k == "data" else v) for k, v in TASKS[task].items()})
    kw = dict(max_steps=3, lr=1e-2, warmup_steps=1, eval_every=0, log_every=1, seed=seed, device="cpu",
              dtype="float32", out=str(out), progress=False)
    return finetune(fc, TrainConfig(**{**kw, **tc_kw}))


# ---------------------------------------------------------------------------------------------------------------
# 1. --seed seeds the adapters, the head, dropout and the data order


@pytest.mark.parametrize("task", ["classify", "chat"])
def test_same_seed_same_run_other_seed_other_run(base, tmp_path, task):
    runs = {}
    for name, seed, global_state in (("a", 0, 1), ("b", 0, 2), ("c", 1, 1)):
        torch.manual_seed(global_state)  # separate processes start torch's generator from different seeds
        _finetune(base, tmp_path / name, task, seed)
        runs[name] = ([(r["step"], r["train_loss"], r.get("val_loss")) for r in metrics(tmp_path / name)],
                      load_file(tmp_path / name / "adapter_model.safetensors"))
    (la, wa), (lb, wb), (lc, wc) = runs["a"], runs["b"], runs["c"]
    assert la == lb, (la, lb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    if task == "classify":
        assert any("score" in k for k in wa)  # the new head is saved and compared too
    assert [x[1] for x in lc] != [x[1] for x in la]
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


# ---------------------------------------------------------------------------------------------------------------
# 2. fine-tuning data split by rank


FINETUNE_SCRIPT = r'''
import sys
from llmkit.train.finetune import FinetuneConfig, finetune
from llmkit.train.loop import TrainConfig

base, data, out, bs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
fc = FinetuneConfig(model=base, data=data, out=out, batch_size=bs, val_fraction=0.34, max_length=256,
                    lora_dropout=0.0)
finetune(fc, TrainConfig(max_steps=4, lr=1e-2, warmup_steps=1, eval_every=2, log_every=1, grad_clip=0.0,
                         device="cpu", dtype="float32", out=out, progress=False))
'''


def test_finetune_two_processes_split_the_batch(base, tmp_path):
    script = tmp_path / "ft.py"
    script.write_text(FINETUNE_SCRIPT)
    r = subprocess.run([*LAUNCH, str(script), str(base), str(CHAT), str(tmp_path / "two"), "2"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(script), str(base), str(CHAT), str(tmp_path / "one"), "4"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    assert np.allclose([m["train_loss"] for m in one], [m["train_loss"] for m in two], atol=2e-5)
    assert np.allclose([m.get("val_loss", 0) for m in one], [m.get("val_loss", 0) for m in two], atol=2e-5)
    # each real (unpadded) token counted once, whatever the number of processes
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]
    assert json.loads((tmp_path / "two" / "run_config.json").read_text())["world_size"] == 2


DISTILL_SCRIPT = r'''
import sys
from llmkit.compress.distill import DistillConfig, distill
from llmkit.train.loop import TrainConfig

base, data, out, bs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dc = DistillConfig(teacher=base, data=data, out=out, init_from_teacher=True, keep_layers=[0], task="text",
                   max_length=32, batch_size=bs, report=False, progress=False)
distill(dc, TrainConfig(max_steps=3, lr=1e-3, warmup_steps=1, eval_every=0, log_every=1, grad_clip=0.0, device="cpu",
                        dtype="float32", out=out, progress=False))
'''


def test_distill_two_processes_split_the_batch(base, tmp_path):
    script = tmp_path / "kd.py"
    script.write_text(DISTILL_SCRIPT)
    data = DATA / "tinyshakespeare_head.txt"
    r = subprocess.run([*LAUNCH, str(script), str(base), str(data), str(tmp_path / "two"), "2"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(script), str(base), str(data), str(tmp_path / "one"), "4"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    assert np.allclose([m["train_loss"] for m in one], [m["train_loss"] for m in two], atol=2e-5)
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two]


# ---------------------------------------------------------------------------------------------------------------
# 3. a killed 2-process run with dropout resumes exactly; the ranks draw different masks


DROPOUT_SCRIPT = r'''
import hashlib, sys
import numpy as np
import torch
from llmkit.data.corpus import BlockLoader
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer
from llmkit.train.losses import clm_loss
from llmkit.train.loop import TrainConfig, setup_distributed, train

out, crash_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
rank, world, _ = setup_distributed("cpu")
torch.manual_seed(0)
model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=1, dropout=0.2))
tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
calls = {"n": 0}
log = open(f"{out}.rng{rank}", "a")

def loss_fn(m, batch):
    if m.training:
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise SystemExit(3)  # both ranks die in the same step, after the step-6 checkpoint
        log.write(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest() + "\n")  # the dropout masks
        log.flush()
    return clm_loss(m, batch)

cfg = TrainConfig(max_steps=10, lr=3e-3, warmup_steps=2, save_every=3, eval_every=0, log_every=1, out=out,
                  resume=resume, progress=False, device="cpu", dtype="float32")
train(model, BlockLoader(tokens, 16, 2, seed=1, rank=rank, world_size=world), loss_fn, cfg)
'''


def test_two_process_dropout_run_resumes_exactly(tmp_path):
    script = tmp_path / "drop.py"
    script.write_text(DROPOUT_SCRIPT)

    def run(out, crash_at, resume):
        return subprocess.run([*LAUNCH, str(script), str(out), str(crash_at), "1" if resume else "0"], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=300)

    full, killed = tmp_path / "full", tmp_path / "killed"
    r = run(full, 0, False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run(killed, 8, False).returncode != 0  # dies in step 8
    assert [m["step"] for m in metrics(killed)][-1] == 7
    r = run(killed, 0, True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(m["step"], m["train_loss"]) for m in metrics(killed)] == [(m["step"], m["train_loss"])
                                                                       for m in metrics(full)]
    states = {}
    for name in ("full", "killed"):
        states[name] = [Path(f"{tmp_path / name}.rng{rank}").read_text().split() for rank in (0, 1)]
    for rank in (0, 1):
        f, k = states["full"][rank], states["killed"][rank]
        assert len(f) == 10 and len(k) == 7 + 4  # steps 1-7, then 7-10 again after the step-6 checkpoint
        assert k[:7] == f[:7] and k[7:] == f[6:]  # each rank goes on drawing its own random numbers
    assert all(a != b for a, b in zip(*states["killed"]))  # the ranks' dropout masks differ, resumed or not


# ---------------------------------------------------------------------------------------------------------------
# 4. DP-SGD reports the validation loss every run reports


def test_dp_and_plain_runs_report_the_same_validation_loss(base, tmp_path):
    pytest.importorskip("opacus")
    from llmkit.train.dp import DPConfig

    lines = CHAT.read_text().splitlines()  # under DP validation data must be public: a file of its own
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(lines[4:]) + "\n")

    def run(name, dp):
        fc = FinetuneConfig(model=str(base), out=str(tmp_path / name), data=str(tmp_path / "train.jsonl"),
                            val_data=str(tmp_path / "val.jsonl"), batch_size=2, max_length=256, lora_dropout=0.0)
        # lr 0: the model stays the base model (LoRA B starts at zero), so both runs validate the same model
        tc = TrainConfig(max_steps=1, lr=0.0, min_lr=0.0, warmup_steps=0, eval_every=1, device="cpu",
                         dtype="float32", out=str(tmp_path / name), progress=False)
        return finetune(fc, tc, dp=dp)

    plain, private = run("plain", None), run("dp", DPConfig(epsilon=50.0, delta=1e-3))
    assert "epsilon" in private
    assert private["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-6)


def test_dp_runs_with_one_seed_are_the_same_run(base, tmp_path):
    pytest.importorskip("opacus")
    from llmkit.train.dp import DPConfig

    runs = []
    for name, global_state in (("a", 1), ("b", 2)):
        torch.manual_seed(global_state)
        fc = FinetuneConfig(model=str(base), out=str(tmp_path / name), data=str(CHAT), batch_size=2,
                            val_fraction=0.34, max_length=256, lora_dropout=0.1)
        tc = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=1, eval_every=0, log_every=1, device="cpu",
                         dtype="float32", out=str(tmp_path / name), progress=False)
        finetune(fc, tc, dp=DPConfig(epsilon=50.0, delta=1e-3))  # Poisson batches and noise: seeded by --seed
        runs.append(([r["train_loss"] for r in metrics(tmp_path / name)],
                     load_file(tmp_path / name / "adapter_model.safetensors")))
    (la, wa), (lb, wb) = runs
    assert la == lb and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------------------------
# smaller things: samples in evaluation mode, a resume with other batches refused


def test_samples_are_drawn_in_evaluation_mode():
    from llmkit.data.corpus import BlockLoader
    from llmkit.model.config import preset
    from llmkit.model.transformer import Transformer
    from llmkit.train.losses import clm_loss
    from llmkit.train.loop import train

    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=1, dropout=0.2))
    tokens = np.random.default_rng(0).integers(0, 64, 3000).astype(np.uint16)
    modes = []
    cfg = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=1, eval_every=1, eval_steps=1, progress=False, device="cpu")
    train(model, BlockLoader(tokens, 16, 2, seed=1), clm_loss, cfg, val_data=BlockLoader(tokens[:400], 16, 2,
          shuffle=False), sample_fn=lambda m: modes.append(m.training) or "")
    assert modes == [False, False] and model.training


def test_finetune_resume_with_another_batch_size_is_refused(base, tmp_path):
    _finetune(base, tmp_path / "r", "chat", 0, max_steps=2, save_every=1)
    fc = FinetuneConfig(model=str(base), out=str(tmp_path / "r"), task="chat", data=str(CHAT), batch_size=1,
                        val_fraction=0.34, max_length=256)
    tc = TrainConfig(max_steps=3, device="cpu", out=str(tmp_path / "r"), resume=True, progress=False)
    with pytest.raises(ValueError, match=r"batch size \(2, now 1\)"):
        finetune(fc, tc)


# ---------------------------------------------------------------------------------------------------------------
# every recipe: one --seed, one run, whatever state torch's global generator was left in


SHAKE = DATA / "tinyshakespeare_head.txt"


@pytest.mark.parametrize("recipe", ["pretrain", "distill", "prune-recover"])
def test_every_recipe_with_one_seed_writes_the_same_weights(base, tmp_path, recipe):
    from llmkit.cli import main

    def run(name, seed, noise):
        torch.manual_seed(noise)  # another global generator state before each run: only --seed may decide
        torch.rand(noise)
        out = tmp_path / name
        args = {
            "pretrain": ["pretrain", "--data", SHAKE, "--char", "--block-size", "32", "--batch-size", "4",
                         "--max-steps", "3", "--n-layer", "1", "--dropout", "0.1", "--eval-every", "0",
                         "--no-progress"],
            "distill": ["distill", "--teacher", base, "--student", "llama-tiny", "--data", SHAKE, "--max-steps", "3",
                        "--max-length", "48", "--batch-size", "4", "--eval-every", "0", "--no-report", "--no-progress"],
            "prune-recover": ["prune", "--model", base, "--method", "structured", "--target", "mlp", "--ratio", "0.5",
                              "--calib-data", SHAKE, "--calib-samples", "4", "--calib-seq-len", "32", "--recover", "2",
                              "--recover-batch-size", "2", "--recover-method", "lora", "--no-report", "--no-progress"],
        }[recipe]
        assert main([str(a) for a in args] + ["--out", str(out), "--seed", str(seed)]) == 0
        return load_file(out / "model.safetensors")

    a, b, c = run("a", 0, 1), run("b", 0, 7), run("c", 1, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
