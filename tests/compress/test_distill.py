"""Distillation: KD losses against direct torch computations, top-k cache, students, the distill command moving a tiny
student toward its teacher through the shared loop (metrics, resume), classifiers, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.compress import distill as D
from llmkit.model import lora
from llmkit.model.checkpoint import load_model, save_model
from llmkit.cli import main
from llmkit.model.config import preset
from llmkit.data.corpus import IGNORE
from llmkit.model.transformer import Transformer
from llmkit.model.tokenizer import Tokenizer

DATA = Path(__file__).parents[1] / "data"
TEXT = DATA / "tinyshakespeare_head.txt"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FAST = ["--no-report", "--no-progress", "--max-length", "48", "--batch-size", "4"]


def make_tok(extra=""):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator((extra + TEXT.read_text() + (DATA / "sst_train_30.tsv").read_text()).splitlines(), trainer)
    return Tokenizer(hf, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                     unk_token="<|endoftext|>", chat_template=CHATML, add_bos_token=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread (a busy 2-core machine makes torch's thread hand-offs cost more than the math)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tok()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """The first 6,000 characters of the Shakespeare excerpt: enough for a few batches, quick to validate on."""
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT.read_text()[:6000])
    return p


@pytest.fixture(scope="module")
def teacher_dir(tok, tmp_path_factory):
    """A tiny 4-block Llama with a peaked (far from uniform) output distribution."""
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=320, n_layer=4, bos_token_id=1, eos_token_id=2,
                               pad_token_id=2))
    with torch.no_grad():
        model.lm_head.weight.mul_(60)
    out = tmp_path_factory.mktemp("teacher")
    save_model(out, model, tok)
    return out


def logits(n=6, v=11, seed=0, scale=3.0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_kd_losses_match_a_direct_torch_computation(T):
    s, t = logits(seed=1), logits(seed=2)
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    p, q = lt.exp(), ls.exp()
    fwd = F.kl_div(ls, lt, log_target=True, reduction="batchmean") * T * T
    rev = F.kl_div(lt, ls, log_target=True, reduction="batchmean") * T * T
    m = (p + q) / 2
    jsd = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean() * T * T
    got = {k: D.kd_loss(s, t, temperature=T, kind=k) for k in D.LOSSES}
    torch.testing.assert_close(got["forward_kl"], fwd)
    torch.testing.assert_close(got["reverse_kl"], rev)
    torch.testing.assert_close(got["symmetric_kl"], (fwd + rev) / 2)
    torch.testing.assert_close(got["jsd"], jsd)
    assert all(float(D.kd_loss(t, t, temperature=T, kind=k)) < 1e-6 for k in D.LOSSES)  # zero at the teacher


def test_top_k_cache_form_equals_the_full_teacher_when_k_is_the_vocabulary():
    s, t = logits(seed=3), logits(seed=4)
    ids, lps, tail = D.teacher_top_k(t, 11, 2.0)
    for kind in D.LOSSES:
        full = D.kd_loss(s, t, temperature=2.0, kind=kind)
        cached = D.kd_loss(s, temperature=2.0, kind=kind, teacher_ids=ids, teacher_logprobs=lps, teacher_tail=tail)
        torch.testing.assert_close(cached, full)
    # k < V: the divergence between the bucketed distributions at T (3 tokens + "the rest"), computed here by hand
    for T in (1.0, 2.0, 4.0):
        ids, lps, tail = D.teacher_top_k(t, 3, T)
        pt, qs = F.softmax(t / T, -1).gather(-1, ids), F.softmax(s / T, -1).gather(-1, ids)
        pt, qs = (torch.cat([x, 1 - x.sum(-1, keepdim=True)], -1) for x in (pt, qs))
        ref = (pt * (pt.log() - qs.log())).sum(-1).mean() * T * T
        torch.testing.assert_close(D.kd_loss(s, temperature=T, teacher_ids=ids, teacher_logprobs=lps,
                                             teacher_tail=tail), ref)
    # at T = 1 the tail may be left out (1 - the k probabilities); at T != 1 it cannot
    ids, lps, tail = D.teacher_top_k(t, 3, 1.0)
    torch.testing.assert_close(D.kd_loss(s, temperature=1.0, teacher_ids=ids, teacher_logprobs=lps),
                               D.kd_loss(s, temperature=1.0, teacher_ids=ids, teacher_logprobs=lps, teacher_tail=tail))
    with pytest.raises(ValueError, match="tail mass"):
        D.kd_loss(s, temperature=2.0, teacher_ids=ids, teacher_logprobs=lps)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", D.LOSSES)
def test_a_student_equal_to_its_teacher_has_zero_loss_and_gradient_at_any_temperature(T, kind):
    """Issue 27: the cache softened the teacher's tail as one logit, so at T=2 a student equal to its teacher had a
    loss of 0.8 here (2.9 in the issue's run) and a gradient pushing its tail mass to 0. The cached (top-k + tail)
    loss equals the divergence of the full distributions lumped into the same k + 1 buckets."""
    t = logits(n=8, v=50, seed=4)
    ids, lps, tail = D.teacher_top_k(t, 5, T)
    for cached in (False, True):
        s = t.clone().requires_grad_(True)
        kw = dict(teacher_ids=ids, teacher_logprobs=lps, teacher_tail=tail) if cached else dict(teacher_logits=t)
        loss = D.kd_loss(s, temperature=T, kind=kind, **kw)
        loss.backward()
        tol = 1e-6 * T * T  # float32 rounding, scaled by the loss's T^2
        assert abs(float(loss)) < tol and float(s.grad.abs().max()) < tol, (cached, float(loss))
    s = logits(n=8, v=50, seed=5)
    bucket = lambda x: D._student_with_tail(F.log_softmax(x / T, -1), ids)  # noqa: E731  (N, 6): 5 tokens + rest
    ref = D.divergence(bucket(s), bucket(t), kind).mean() * T * T
    torch.testing.assert_close(D.kd_loss(s, temperature=T, kind=kind, teacher_ids=ids, teacher_logprobs=lps,
                                         teacher_tail=tail), ref)


def test_cache_rows_are_the_teachers_top_k_for_examples_of_any_length(teacher_dir, tmp_path):
    import numpy as np

    lm = load_model(teacher_dir)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(3, 320, (n,), generator=g).tolist()} for n in (5, 17, 9, 1, 12)]
    meta, ready = D.check_cache(tmp_path / "c", lm, 4, examples, 2.0)
    assert not ready
    D.build_cache(tmp_path / "c", lm.model, examples, 4, meta, batch_size=3, progress=False)
    ids, lps = np.load(tmp_path / "c" / "ids.npy"), np.load(tmp_path / "c" / "logprobs.npy")
    tails = np.load(tmp_path / "c" / "tail.npy")
    a = 0
    for e in examples:
        with torch.no_grad():
            logits = lm.model(torch.tensor([e["input_ids"]]))[0]
        top = F.log_softmax(logits, -1).topk(4, -1)
        rest = F.softmax(logits / 2, -1).scatter(-1, top.indices, 0).sum(-1)  # the others' mass at T = 2
        n = len(e["input_ids"])
        assert (ids[a:a + n] == top.indices.numpy()).all()
        assert np.allclose(lps[a:a + n], top.values.numpy(), atol=2e-2)  # float16 storage
        assert np.allclose(np.exp(tails[a:a + n]), rest.numpy(), rtol=1e-4, atol=1e-7)
        a += n
    assert D.check_cache(tmp_path / "c", lm, 4, examples, 2.0)[1]
    with pytest.raises(ValueError, match="another teacher"):
        D.check_cache(tmp_path / "c", lm, 4, examples[:2], 2.0)
    with pytest.raises(ValueError, match="temperature"):
        D.check_cache(tmp_path / "c", lm, 4, examples, 1.0)
    # the teacher through its own cache at T = 2: loss ~0 (float16 log-probabilities), not the 2.9
    D.attach_cache(tmp_path / "c", examples)
    batch = D.kd_collate([dict(e, labels=e["input_ids"]) for e in examples], 0)
    assert batch["teacher_tail"].shape == batch["input_ids"].shape
    with torch.no_grad():
        kd = D.make_loss(temperature=2.0, alpha=1.0)(lm.model, batch)[1]["kd"]
    assert abs(float(kd)) < 1e-3
    # a cache of the format before the tail (issue 27) is rebuilt, not reused
    meta_file = tmp_path / "c" / "meta.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "format"}))
    assert D.check_cache(tmp_path / "c", lm, 4, examples, 2.0) == (meta, False)
    D.build_cache(tmp_path / "c", lm.model, examples, 4, meta, batch_size=3, progress=False)
    assert D.check_cache(tmp_path / "c", lm, 4, examples, 2.0)[1]


def test_hinton_mix_and_assistant_only_positions():
    torch.manual_seed(0)
    student = Transformer(preset("llama-tiny", vocab_size=64)).eval()
    teacher = Transformer(preset("llama-tiny", vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 7))
    labels = torch.full((2, 7), IGNORE)
    labels[0, 2:5] = ids[0, 3:6]  # only some positions are scored (e.g. assistant tokens)
    labels[1, :3] = ids[1, 1:4]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    keep = labels != IGNORE
    with torch.no_grad():
        s, t = student(ids)[keep], teacher(ids)[keep]
    ce = F.cross_entropy(s, labels[keep])
    kd = D.kd_loss(s, t, temperature=2.0, kind="jsd")
    for alpha in (0.0, 0.3, 1.0):
        loss, parts = D.make_loss(teacher, temperature=2.0, alpha=alpha, kind="jsd")(student, batch)
        torch.testing.assert_close(loss, alpha * kd + (1 - alpha) * ce)
        torch.testing.assert_close(parts["ce"], ce)


def test_keep_layers_copies_the_chosen_teacher_blocks(teacher_dir):
    teacher = load_model(teacher_dir).model
    student = D.keep_layers(teacher, [0, 3])
    assert student.config.n_layer == 2
    sd_t, sd_s = teacher.state_dict(), student.state_dict()
    assert torch.equal(sd_s["layers.1.mlp.up_proj.weight"], sd_t["layers.3.mlp.up_proj.weight"])
    assert torch.equal(sd_s["embed_tokens.weight"], sd_t["embed_tokens.weight"])
    with pytest.raises(ValueError, match="--keep-layers"):
        D.keep_layers(teacher, [0, 4])


# ---------------------------------------------------------------------------------------------------------------
# the command


def kl_to_teacher(teacher_dir, student_dir, tok) -> float:
    t, s = load_model(teacher_dir).model, load_model(student_dir).model
    ids = torch.tensor([tok.encode(TEXT.read_text()[-3000:], add_special_tokens=False)[:200]])
    with torch.no_grad():
        return float(D.kd_loss(s(ids)[0], t(ids)[0], temperature=1.0))


def test_kd_student_moves_toward_the_teacher_more_than_ce_only(teacher_dir, tok, text, tmp_path):
    common = ["--teacher", str(teacher_dir), "--init-from-teacher", "--keep-layers", "0,2", "--data", str(text),
              "--max-steps", "25", "--lr", "3e-3", "--eval-every", "25", *FAST]
    assert main(["distill", *common, "--out", str(tmp_path / "kd"), "--alpha", "1.0", "--temperature", "1"]) == 0
    assert main(["distill", *common, "--out", str(tmp_path / "ce"), "--alpha", "0.0"]) == 0
    before = D.keep_layers(load_model(teacher_dir).model, [0, 2])
    save_model(tmp_path / "init", before, tok)
    kl0 = kl_to_teacher(teacher_dir, tmp_path / "init", tok)
    kl_kd, kl_ce = kl_to_teacher(teacher_dir, tmp_path / "kd", tok), kl_to_teacher(teacher_dir, tmp_path / "ce", tok)
    assert kl_kd < 0.85 * kl0 and kl_kd < kl_ce, (kl0, kl_kd, kl_ce)
    rows = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 25 and "val_kd" in rows[-1] and "val_ce" in rows[-1]
    assert (tmp_path / "kd" / "loss.png").is_file() and load_model(tmp_path / "kd").config.n_layer == 2
    run = json.loads((tmp_path / "kd" / "run_config.json").read_text())
    assert run["distill"]["loss"] == "forward_kl" and run["distill"]["student_init"] == "teacher blocks"


def test_teacher_cache_is_built_once_reused_and_resume_works(teacher_dir, text, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["distill", "--teacher", str(teacher_dir), "--student", "llama-tiny", "--data", str(text),
            "--teacher-cache", str(cache), "--top-k", "16", "--loss", "reverse_kl", "--eval-every", "2", *FAST]
    assert main([*args, "--out", str(tmp_path / "a"), "--max-steps", "2", "--save-every", "2"]) == 0
    meta = json.loads((cache / "meta.json").read_text())
    ids = __import__("numpy").load(cache / "ids.npy", mmap_mode="r")
    assert meta["k"] == 16 and ids.shape == (meta["n_tokens"], 16)
    stamp = (cache / "ids.npy").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "a"), "--max-steps", "4", "--resume"]) == 0
    assert "reusing the teacher cache" in capsys.readouterr().err
    assert (cache / "ids.npy").stat().st_mtime_ns == stamp
    steps = [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4 and steps == sorted(steps)
    rc = main([*args[:-len(FAST)], *FAST, "--out", str(tmp_path / "b"), "--max-steps", "1", "--top-k", "8"])
    assert rc == 2 and "another teacher, data, --top-k or --temperature (k differ)" in capsys.readouterr().err
    rc = main([*args, "--out", str(tmp_path / "b"), "--max-steps", "1", "--temperature", "4"])
    assert rc == 2 and "(temperature differ)" in capsys.readouterr().err


def test_chat_data_and_a_classifier_teacher(tok, teacher_dir, tmp_path):
    out = tmp_path / "chat"
    assert main(["distill", "--teacher", str(teacher_dir), "--init-from-teacher", "--data",
                 str(DATA / "seed_tasks_chat_6.jsonl"), "--out", str(out), "--max-steps", "2", "--no-report",
                 "--no-progress", "--batch-size", "2", "--val-fraction", "0.34"]) == 0
    assert json.loads((out / "run_config.json").read_text())["distill"]["task"] == "chat"
    torch.manual_seed(0)
    clf = Transformer(preset("llama-tiny", vocab_size=320, n_layer=2, pad_token_id=2))
    lora.add_classifier(clf, {"0": "0", "1": "1"})
    save_model(tmp_path / "clf", clf, tok)
    out = tmp_path / "clf_student"
    assert main(["distill", "--teacher", str(tmp_path / "clf"), "--init-from-teacher", "--keep-layers", "1",
                 "--data", str(DATA / "sst_train_30.tsv"), "--out", str(out), "--max-steps", "2", *FAST]) == 0
    cfg = load_model(out).config
    assert cfg.num_labels == 2 and cfg.n_layer == 1


def test_student_larger_than_teacher_warns(teacher_dir, text, tmp_path, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps(preset("llama-tiny", vocab_size=320, n_layer=6).to_dict()))
    rc = main(["distill", "--teacher", str(teacher_dir), "--student", str(tmp_path / "cfg.json"), "--data", str(text),
               "--out", str(tmp_path / "bigger"), "--max-steps", "1", *FAST])
    assert rc == 0 and "warning: the student" in capsys.readouterr().err


@pytest.mark.parametrize("flags,msg", [
    (["--student", "OTHER_TOK"], "tokenizers differ"),
    (["--student", "VOCAB_CFG"], "tokenizers differ"),
    (["--init-from-teacher", "--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--init-from-teacher", "--temperature", "0"], "--temperature must be > 0"),
    (["--init-from-teacher", "--keep-layers", "0,9"], "--keep-layers must list"),
    (["--init-from-teacher", "--keep-layers", "a,b"], "comma-separated integers"),
    (["--init-from-teacher", "--top-k", "0", "--teacher-cache", "C"], "--top-k must be >= 1"),
    (["--student", "no-such-preset"], "neither a model folder"),
    ([], "no student"),
    (["--init-from-teacher", "--data", "EMPTY"], "empty"),
    (["--init-from-teacher", "--data", "missing.txt"], "not found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(teacher_dir, text, tmp_path, capsys, flags, msg):
    (tmp_path / "EMPTY").write_text("")
    if "OTHER_TOK" in flags:
        torch.manual_seed(0)
        other = make_tok("zzz qqq xyz " * 50)
        save_model(tmp_path / "OTHER_TOK", Transformer(preset("llama-tiny", vocab_size=320)), other)
    if "VOCAB_CFG" in flags:
        (tmp_path / "VOCAB_CFG").mkdir()
        (tmp_path / "VOCAB_CFG.json").write_text(json.dumps(preset("llama-tiny").to_dict()))  # 256 tokens
        flags = ["--student", str(tmp_path / "VOCAB_CFG.json")]
    flags = [str(tmp_path / f) if f in ("EMPTY", "OTHER_TOK", "C") else f for f in flags]
    data = [] if "--data" in flags else ["--data", str(text)]
    out = tmp_path / "out"
    rc = main(["distill", "--teacher", str(teacher_dir), *data, "--out", str(out), "--max-steps", "1", *FAST, *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "C").exists()


def test_distill_runs_under_torchrun_with_two_processes(teacher_dir, text, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    r = subprocess.run([*launcher, "-m", "llmkit", "distill", "--teacher", str(teacher_dir), "--init-from-teacher",
                        "--data", str(text), "--out", str(tmp_path / "ddp"), "--teacher-cache", str(tmp_path / "c"),
                        "--top-k", "8", "--max-steps", "2", *FAST], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "ddp" / "run_config.json").read_text())["world_size"] == 2
    assert (tmp_path / "c" / "meta.json").is_file() and load_model(tmp_path / "ddp").config.n_layer == 2


def test_prune_then_distill_a_structurally_pruned_student(teacher_dir, text, tmp_path):
    """The Minitron recipe: shrink the teacher with llmkit prune, then distill into the smaller folder."""
    assert main(["prune", "--model", str(teacher_dir), "--out", str(tmp_path / "small"), "--method", "structured",
                 "--target", "mlp,layers", "--ratio", "0.5", "--calib-data", str(text), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--no-report", "--no-progress"]) == 0
    out = tmp_path / "kd"
    assert main(["distill", "--teacher", str(teacher_dir), "--student", str(tmp_path / "small"), "--data", str(text),
                 "--out", str(out), "--max-steps", "2", *FAST]) == 0
    cfg = load_model(out).config
    assert (cfg.n_layer, cfg.intermediate_size) == (2, 64)
    assert json.loads((out / "run_config.json").read_text())["distill"]["student_init"] == "model folder"
