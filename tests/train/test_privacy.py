"""DP-SGD fine-tuning: per-sample gradients against Opacus' functorch fallback and a per-example loop, the epsilon
the run spends (against Opacus' accountant), and the options DP refuses."""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from llmkit.train import dp as privacy
from llmkit.model.checkpoint import load_model
from llmkit.cli import main
from llmkit.model.config import preset
from llmkit.data.corpus import IGNORE
from llmkit.model.lora import LoRAConfig, LoRALinear, add_classifier, inject_lora
from llmkit.model.transformer import Transformer

DATA = Path(__file__).parents[1] / "data"


def _lora_model(classify: bool):
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2))
    extra = ()
    if classify:
        add_classifier(model, {"0": "neg", "1": "pos"})
        extra = ("score",)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q", "v", "o", "up"]), trainable=extra)
    for m in model.modules():  # B = 0 at init would make every A-gradient zero: test with a non-trivial adapter
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.2)
    return model.float().train()


def _batch(classify: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (5, 9), generator=g)
    lengths = torch.tensor([9, 4, 7, 2, 6])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    ids = ids * mask + 2 * (1 - mask)
    if classify:
        labels = torch.tensor([0, 1, 1, 0, 1])
    else:
        labels = torch.cat([ids[:, 1:], torch.full((5, 1), IGNORE)], 1).masked_fill(mask == 0, IGNORE)
        labels[:, -1] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _per_sample(model, batch, loss_fn, force_functorch):
    from opacus import GradSampleModule

    privacy._register_rules()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=force_functorch)
    out = loss_fn(gsm, batch)
    (out[0] if isinstance(out, tuple) else out).backward()
    grads = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    return grads


@pytest.mark.parametrize("classify", [True, False], ids=["classify", "clm"])
def test_per_sample_gradients_match_functorch_and_a_per_example_loop(classify):
    loss_fn = privacy.per_example_classify_loss if classify else privacy.per_example_clm_loss
    batch = _batch(classify)
    plain = _lora_model(classify)
    with torch.no_grad():
        before = plain(batch["input_ids"], attention_mask=batch["attention_mask"],
                       head="classify" if classify else "lm")
    model = privacy.make_dp_ready(copy.deepcopy(plain))
    assert any(type(m) is privacy.DPLoRALinear for m in model.modules())
    with torch.no_grad():  # the DP classes compute the same function
        after = model(batch["input_ids"], attention_mask=batch["attention_mask"], head="classify" if classify else "lm")
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    hooks = _per_sample(copy.deepcopy(model), batch, loss_fn, force_functorch=False)
    functorch = _per_sample(copy.deepcopy(model), batch, loss_fn, force_functorch=True)
    assert set(hooks) == set(functorch) and any(n.startswith("score.") for n in hooks) == classify
    for n in hooks:
        assert hooks[n].shape[0] == 5
        torch.testing.assert_close(hooks[n], functorch[n], rtol=1e-4, atol=1e-6)
    # each example's gradient of its own loss, computed alone
    for i in range(5):
        ref = copy.deepcopy(model)
        one = {k: v[i:i + 1] for k, v in batch.items()}
        out = loss_fn(ref, one)
        (out[0] if isinstance(out, tuple) else out).backward()
        for n, p in ref.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(hooks[n][i], p.grad, rtol=1e-4, atol=1e-6)


def test_only_lora_and_head_may_train_under_dp():
    model = _lora_model(True)
    model.layers[0].input_layernorm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="LoRA adapters and the classification head only"):
        privacy.make_dp_ready(model)


def test_unreachable_epsilon_says_what_is_reachable():
    dp = privacy.DPConfig(1e-9, 1e-5, 1.0, "rdp")
    with pytest.raises(ValueError, match=r"out of reach.*ask for epsilon above"):
        privacy.noise_multiplier(dp, 0.1, 100)
    sigma = privacy.noise_multiplier(privacy.DPConfig(2.0, 1e-5, 1.0, "rdp"), 0.1, 100)
    spent = privacy.spent_epsilon(sigma, 0.1, 100, 1e-5, "rdp")
    assert 1.95 <= spent <= 2.0


# ---------------------------------------------------------------------------------------------------------------
# end to end through the CLI


@pytest.fixture
def base(sst_llama_base):
    return sst_llama_base


def _finetune(capsys, base, out, *extra):
    rc = main(["finetune", "--model", str(base), "--data", str(DATA / "sst_train_30.tsv"), "--task", "classify",
               "--out", str(out), "--batch-size", "4", "--no-progress", *extra])
    r = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=r.out, stderr=r.err)


def _public_val(tmp_path):
    """A validation file that is not the private --data (three SST lines, standing in for public data)."""
    lines = (DATA / "sst_train_30.tsv").read_text().splitlines()
    path = tmp_path / "public_val.tsv"
    path.write_text("\n".join([lines[0], *lines[-3:]]) + "\n")
    return path


def test_dp_finetune_logs_and_records_the_epsilon_spent(capsys, base, tmp_path):
    out = tmp_path / "dp"
    r = _finetune(capsys, base, out, "--max-steps", "6", "--eval-every", "3", "--dp-epsilon", "4", "--dp-delta", "1e-3",
                  "--max-grad-norm", "0.5", "--dp-accountant", "rdp", "--val-data", str(_public_val(tmp_path)))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in evals] == [3, 6]
    assert 0 < evals[0]["epsilon"] < evals[1]["epsilon"] <= 4.0
    dp = json.loads((out / "run_config.json").read_text())["dp"]
    assert dp["steps"] == dp["planned_steps"] == 6 and dp["max_grad_norm"] == 0.5 and dp["accountant"] == "rdp"
    # the run spends what Opacus' accountant says these steps cost, and that is (just under) the target
    again = privacy.spent_epsilon(dp["noise_multiplier"], dp["sample_rate"], 6, 1e-3, "rdp")
    assert dp["epsilon_spent"] == pytest.approx(again, rel=1e-6)
    assert 3.9 <= dp["epsilon_spent"] <= 4.0
    assert dp["sample_rate"] == pytest.approx(1 / 8)  # 1 / batches: all 30 examples of --data train, batch 4
    assert f"epsilon {dp['epsilon_spent']:.4g}" in r.stdout and "spent epsilon" in r.stderr
    lm = load_model(out)  # an ordinary adapter folder
    assert lm.config.num_labels == 2


@pytest.mark.parametrize("flags, message", [
    (["--dp-epsilon", "1e-9", "--max-steps", "50"], "out of reach"),
    (["--dp-epsilon", "8", "--grad-accum", "2"], "--grad-accum"),
    (["--dp-epsilon", "8", "--method", "full"], "--method lora"),
    (["--dp-epsilon", "8", "--resume"], "cannot --resume"),
    (["--dp-epsilon", "8", "--dp-delta", "1.5"], "--dp-delta"),
    (["--dp-epsilon", "-1"], "--dp-epsilon"),
])
def test_dp_refusals_are_one_line_and_write_nothing(capsys, base, tmp_path, flags, message):
    out = tmp_path / "refused"
    r = _finetune(capsys, base, out, "--dp-accountant", "rdp", *flags)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("llmkit finetune: error:") and "Traceback" not in r.stderr
    assert not out.exists()


def test_dp_finetune_never_scores_a_split_of_the_private_data(capsys, base, tmp_path):
    """Without --val-data, DP-SGD validates nothing: no held-out part of the private file is scored, logged, or used
    to pick a checkpoint or stop early (none of that would be covered by epsilon)."""
    out = tmp_path / "dp"
    r = _finetune(capsys, base, out, "--max-steps", "4", "--eval-every", "2", "--dp-epsilon", "8", "--dp-delta", "1e-3",
                  "--dp-accountant", "rdp")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any(k.startswith("val_") or k.startswith("best") for row in rows for k in row)
    assert 0 < rows[-1]["epsilon"] <= 8.0  # the last row still says what the run spent
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["finetune"]["n_val"] == 0 and cfg["finetune"]["n_train"] == 30 and cfg["dp"]["validation"] == "off"
    assert not (out / "val_metrics.json").exists() and not (out / "confusion_matrix.png").exists()
    assert "validation is off" in r.stderr and "val_" not in r.stdout
    # early stopping needs a validation score: under DP only a public --val-data can give one
    refused = tmp_path / "refused"
    r = _finetune(capsys, base, refused, "--max-steps", "4", "--dp-epsilon", "8", "--early-stopping", "2")
    assert r.returncode == 2 and "public --val-data" in r.stderr.strip().splitlines()[-1] and not refused.exists()
    # with a public --val-data, validation runs and is marked as outside epsilon
    pub = tmp_path / "pub"
    r = _finetune(capsys, base, pub, "--max-steps", "2", "--eval-every", "2", "--dp-epsilon", "8", "--dp-delta",
                  "1e-3", "--val-data", str(_public_val(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "val_loss" in json.loads((pub / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads((pub / "run_config.json").read_text())["dp"]["validation"].startswith("public --val-data")
