"""The training loop and `llmkit pretrain`: schedule, optimizer groups, CLM/MLM runs, exact resume (kill -9 too),
bad input, YAML flags, and DDP on 2 CPU processes matching 1 process."""
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.cli import main
from llmkit.model.config import preset
from llmkit.data.corpus import BlockLoader
from llmkit.model.transformer import Transformer
from llmkit.train.losses import clm_loss
from llmkit.train.loop import TrainConfig, lr_at, make_optimizer, train

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = Path(__file__).parents[1] / "data" / "tinyshakespeare_head.txt"
# a tiny character-level run: ~2 s of training on one CPU core
TINY = ["--char", "--block-size", "32", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "4",
        "--eval-steps", "2", "--log-every", "1", "--no-progress", "--n-layer", "1"]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["train_loss"]) for r in metrics(out)]


def pretrain(out, *extra) -> int:
    return main(["pretrain", "--data", str(SHAKESPEARE), "--out", str(out), *TINY, *extra])


# ---------------------------------------------------------------------------------------------------------------
# pieces


def test_lr_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(111)]
    assert lrs[0] < lrs[5] < lrs[9] < 1e-3 and max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[60] == pytest.approx(5.5e-4) and lrs[110] == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    model = Transformer(preset("gpt2-tiny"))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # tied embedding/lm_head counted once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# end to end


def test_pretrain_clm_makes_a_model_folder_that_generates(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(out, "--max-steps", "24", "--eval-every", "12", "--save-every", "8", "--keep-last", "1") == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all({"step", "tokens", "lr", "train_loss"} <= set(r) for r in rows)
    assert rows[-1]["tokens"] == 24 * 8 * 32
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[1]["val_loss"] < evals[0]["val_loss"] < 4.2
    assert "sample" in evals[0] and evals[0]["val_ppl"] == pytest.approx(np.exp(evals[0]["val_loss"]), rel=1e-4)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.8
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "run_config.json"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run_config.json").read_text())
    assert run["train"]["max_steps"] == 24 and run["model"]["n_layer"] == 1 and run["pretrain"]["char"] is True
    # keep-last 1 plus the best (step 24 is both)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000024"]
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "ROMEO:", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()  # the text itself is the model's choice


def test_pretrain_mlm_reports_masked_accuracy(tmp_path):
    out = tmp_path / "mlm"
    assert main(["pretrain", "--data", str(SHAKESPEARE), "--out", str(out), "--objective", "mlm", "--vocab-size", "300",
                 "--block-size", "32", "--batch-size", "8", "--max-steps", "8", "--eval-every", "4", "--eval-steps",
                 "2", "--lr", "2e-3", "--warmup-steps", "2", "--no-progress", "--log-every", "4"]) == 0
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert len(evals) == 2 and 0 <= evals[-1]["val_accuracy"] <= 1 and "sample" not in evals[-1]
    hf = json.loads((out / "config.json").read_text())
    assert hf["llmkit"]["causal"] is False and hf["vocab_size"] == 300


def test_yaml_config_with_flags_winning(tmp_path):
    out = tmp_path / "y"
    (tmp_path / "run.yaml").write_text(f"data: {SHAKESPEARE}\nout: {out}\nmax-steps: 50\nbatch_size: 4\n")
    flags = [*TINY, "--max-steps", "3", "--eval-every", "0"]
    assert main(["pretrain", "--config", str(tmp_path / "run.yaml"), *flags]) == 0
    run = json.loads((out / "run_config.json").read_text())
    assert run["train"]["max_steps"] == 3 and run["pretrain"]["batch_size"] == 8  # TINY's --batch-size 8 wins too
    (tmp_path / "bad.yaml").write_text("data: x.txt\nout: o\nlearning_rate: 1\n")
    assert main(["pretrain", "--config", str(tmp_path / "bad.yaml")]) == 2


# ---------------------------------------------------------------------------------------------------------------
# resuming


def _tiny_run(out, max_steps, resume=False, crash_at=None, seed_model=0):
    torch.manual_seed(seed_model)
    model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=1, dropout=0.1))  # dropout: RNG must resume too
    tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += m.training  # training batches only (evaluation calls it too)
        if crash_at and calls["n"] == crash_at:
            raise RuntimeError("simulated crash")
        return clm_loss(m, batch)

    cfg = TrainConfig(max_steps=max_steps, lr=3e-3, warmup_steps=3, save_every=4, eval_every=4, eval_steps=2,
                      log_every=1, out=str(out), resume=resume, progress=False, keep_last=2)
    val = BlockLoader(tokens[:600], 16, 4, shuffle=False)
    return train(model, BlockLoader(tokens, 16, 4, seed=1), loss_fn, cfg, val_data=val)


def test_resume_after_crash_reproduces_the_uninterrupted_run(tmp_path):
    _tiny_run(tmp_path / "a", 14)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _tiny_run(tmp_path / "b", 14, crash_at=11)  # dies during step 11, after the step-8 checkpoint
    assert [r["step"] for r in metrics(tmp_path / "b")][-1] == 10
    _tiny_run(tmp_path / "b", 14, resume=True, seed_model=123)  # weights come from the checkpoint, not the seed
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert [r.get("val_loss") for r in metrics(tmp_path / "b")] == [r.get("val_loss") for r in metrics(tmp_path / "a")]


def test_kill_9_then_resume_matches(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--max-steps", "40", "--save-every", "5", "--eval-every", "0", "--dropout", "0.1"]
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", "pretrain", "--data", str(SHAKESPEARE), "--out",
                             str(killed), *TINY, *args], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / "checkpoints" / "step-000005").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_done = [r["step"] for r in metrics(killed)][-1]
    assert steps_done < 40, "the run finished before it could be killed"
    assert pretrain(killed, *args, "--resume") == 0
    assert pretrain(full, *args) == 0
    assert losses(killed) == losses(full)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, earlier checkpoints untouched


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    def fails(*args, expect):
        assert main(["pretrain", *args]) == 2
        err = capsys.readouterr().err.strip()  # progress lines may come first; the error is one last line
        assert expect in err.splitlines()[-1] and "Traceback" not in err, err

    out = tmp_path / "o"
    fails("--data", str(tmp_path / "nope.txt"), "--out", str(out), expect="not found")
    (tmp_path / "empty.txt").write_text("")
    fails("--data", str(tmp_path / "empty.txt"), "--out", str(out), expect="is empty")
    (tmp_path / "short.txt").write_text("too short")
    fails("--data", str(tmp_path / "short.txt"), "--out", str(out), "--char", "--block-size", "64",
          expect="fewer than one block")
    (tmp_path / "cfg.json").write_text(json.dumps({**preset("llama-tiny").to_dict(), "vocab_size": 16}))
    fails("--data", str(SHAKESPEARE), "--out", str(out), "--char", "--model-config", str(tmp_path / "cfg.json"),
          expect="vocab_size 16")
    fails("--data", str(SHAKESPEARE), "--out", str(tmp_path / "fresh"), "--resume", expect="no checkpoint")

    run = tmp_path / "run"
    assert pretrain(run, "--max-steps", "2", "--eval-every", "0") == 0
    before = _digest(run / "checkpoints")
    capsys.readouterr()
    fails("--data", str(SHAKESPEARE), "--out", str(run), *TINY, "--max-steps", "4", expect="--resume")
    fails("--data", str(SHAKESPEARE), "--out", str(run), *TINY, "--n-layer", "2", "--max-steps", "4", "--resume",
          expect="different model config (n_layer)")
    assert _digest(run / "checkpoints") == before
    # resuming a finished run says so and reports its step, not "step None"
    assert pretrain(run, "--max-steps", "2", "--eval-every", "0", "--resume") == 0
    err = capsys.readouterr().err
    assert "nothing to train" in err and "done: step 2, val_loss" in err and "None" not in err, err


# ---------------------------------------------------------------------------------------------------------------
# distributed


def test_ddp_two_cpu_processes_match_one(tmp_path):
    common = ["--max-steps", "6", "--eval-every", "0", "--grad-clip", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # free port
    r = subprocess.run([*launcher,
                        "-m", "llmkit", "pretrain", "--data", str(SHAKESPEARE), "--out", str(tmp_path / "ddp"),
                        *TINY, *common, "--batch-size", "4"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert pretrain(tmp_path / "one", *common) == 0  # batch 8 in one process = 2 x 4
    one, two = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert [s for s, _ in one] == [s for s, _ in two]
    assert np.allclose([l for _, l in one], [l for _, l in two], atol=2e-5)
    run = json.loads((tmp_path / "ddp" / "run_config.json").read_text())
    assert run["world_size"] == 2


def test_early_stopping_stops_after_patience_evaluations(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=1))
    tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
    val_losses = iter([3.0, 2.0, 2.5, 2.4, 2.6, 2.7, 2.8, 2.9])  # best at the 2nd evaluation (step 4)

    def loss_fn(m, batch):
        loss = clm_loss(m, batch)
        return loss if m.training else loss * 0 + next(val_losses)

    cfg = TrainConfig(max_steps=40, lr=1e-3, warmup_steps=2, eval_every=2, eval_steps=1, log_every=1,
                      early_stopping=2, progress=False)
    res = train(model, BlockLoader(tokens, 16, 4, seed=1), loss_fn, cfg,
                val_data=BlockLoader(tokens[:600], 16, 4, shuffle=False))
    assert res["step"] == 8 and res["best_step"] == 4  # evaluations at 6 and 8 were no better: stop


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation weighted by scored tokens


class _Batches:
    """Fixed batches, cycled: enough of a loader for train() without an output folder."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


def _chat_like_rows(n=8, T=12, vocab=64, seed=0):
    """Rows whose scored (assistant) tokens vary from 1 to T - 1, as in chat SFT; the rest are IGNORE."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T + 1), generator=g)
    labels = ids[:, 1:].clone()
    for i, k in enumerate([11, 1, 2, 10, 3, 9, 1, 6][:n]):
        labels[i, :T - k] = -100  # only the last k positions are scored
    return ids[:, :-1], labels


def _grads_of_training(batches, grad_accum, steps=2):
    """The gradient train() hands the optimizer at each step (a global step pre-hook sees it)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=1))
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, *a: seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    try:
        cfg = TrainConfig(max_steps=steps, grad_accum=grad_accum, warmup_steps=0, grad_clip=0, eval_every=0,
                          progress=False, device="cpu", dtype="float32")
        res = train(model, _Batches(batches), clm_loss, cfg)
    finally:
        handle.remove()
    return seen, res


def test_grad_accumulation_of_4_equals_one_batch_of_4x():
    ids, labels = _chat_like_rows()
    big = [{"input_ids": ids, "labels": labels}]
    micro = [{"input_ids": ids[i:i + 2], "labels": labels[i:i + 2]} for i in range(0, 8, 2)]
    g_big, r_big = _grads_of_training(big, grad_accum=1)
    g_acc, r_acc = _grads_of_training(micro, grad_accum=4)
    for step_big, step_acc in zip(g_big, g_acc):
        for a, b in zip(step_big, step_acc):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(r_big["train_loss"] - r_acc["train_loss"]) < 1e-5  # the logged loss is the big batch's too
    # a micro-batch with nothing scored adds no gradient and no NaN
    empty = {"input_ids": ids[:2], "labels": torch.full_like(labels[:2], -100)}
    g_nan, r_nan = _grads_of_training([micro[0], empty], grad_accum=2, steps=1)
    g_one, _ = _grads_of_training([micro[0]], grad_accum=1, steps=1)
    for a, b in zip(g_nan[0], g_one[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert math.isfinite(r_nan["train_loss"])


DDP_SCRIPT = '''
import sys, torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_train import _Batches, _chat_like_rows, _grads_of_training
ids, labels = _chat_like_rows()
rank = int(__import__("os").environ["RANK"])
rows = slice(4 * rank, 4 * rank + 4)  # rank 0 holds the rows with many scored tokens, rank 1 ... differs
mine = [{"input_ids": ids[rows][i:i + 2], "labels": labels[rows][i:i + 2]} for i in (0, 2)]
grads, res = _grads_of_training(mine, grad_accum=2)
if rank == 0:
    torch.save({"grads": grads, "loss": res["train_loss"]}, sys.argv[1])
'''


def test_ddp_weights_processes_by_their_scored_tokens(tmp_path):
    # 2 processes x 2 micro-batches of 2 rows = one batch of 8, although each holds a different number of scored tokens
    script = tmp_path / "ddp_tokens.py"
    script.write_text(DDP_SCRIPT)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    r = subprocess.run([*launcher, str(script), str(tmp_path / "g.pt"), str(Path(__file__).parent)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = torch.load(tmp_path / "g.pt")
    ids, labels = _chat_like_rows()
    one, res = _grads_of_training([{"input_ids": ids, "labels": labels}], grad_accum=1)
    for step_one, step_ddp in zip(one, ddp["grads"]):
        for a, b in zip(step_one, step_ddp):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(res["train_loss"] - ddp["loss"]) < 1e-5


def test_validation_loss_is_the_mean_over_scored_tokens():
    from llmkit.train.loop import evaluate

    ids, labels = _chat_like_rows()
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=1))
    micro = [{"input_ids": ids[i:i + 2], "labels": labels[i:i + 2]} for i in range(0, 8, 2)]
    empty = {"input_ids": ids[:2], "labels": torch.full_like(labels[:2], -100)}
    dev = torch.device("cpu")
    whole = evaluate(model, [{"input_ids": ids, "labels": labels}], clm_loss, 1, None, dev)["val_loss"]
    parts = evaluate(model, [*micro, empty], clm_loss, 10, None, dev)["val_loss"]
    assert abs(whole - parts) < 1e-5
