"""Resume checkpoints are read with torch.load(weights_only=True): a normal run resumes, a trainer_state.pt that
holds a pickled object (code that would run on load) is refused in one line, and the object never runs."""
import numpy as np
import pytest
import torch

from llmkit.data.corpus import BlockLoader
from llmkit.model.config import preset
from llmkit.model.transformer import Transformer
from llmkit.train.loop import TrainConfig, train
from llmkit.train.losses import clm_loss


class _Evil:  # what an attacker pickles: unpickling calls os.system (here: touches a marker file)
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def _run(out, max_steps, resume=False):
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=64, n_layer=1))
    tokens = np.random.default_rng(0).integers(0, 64, 2000).astype(np.uint16)
    cfg = TrainConfig(max_steps=max_steps, lr=3e-3, warmup_steps=1, save_every=2, eval_every=0, eval_steps=1,
                      log_every=1, out=str(out), resume=resume, progress=False, device="cpu", dtype="float32")
    return train(model, BlockLoader(tokens, 16, 2, seed=1), clm_loss, cfg)


def test_resume_reads_the_trainer_state_with_weights_only(tmp_path):
    from llmkit.train.loop import load_trainer_state

    _run(tmp_path / "r", 2)
    state_file = next((tmp_path / "r" / "checkpoints").glob("step-*/trainer_state.pt"))
    state = load_trainer_state(state_file)  # the optimizer, data, RNG state: all plain, no allow-list needed
    assert {"model", "optimizer", "rng", "data", "train_config"} <= set(state)
    _run(tmp_path / "r", 4, resume=True)


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path, capsys):
    _run(tmp_path / "r", 2)
    state_file = next((tmp_path / "r" / "checkpoints").glob("step-*/trainer_state.pt"))
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "pwned"
    state["data"] = {"epoch": _Evil(marker), "cursor": 0}
    torch.save(state, state_file)
    with pytest.raises(ValueError) as err:
        _run(tmp_path / "r", 4, resume=True)
    assert not marker.exists(), "the pickled object ran"
    msg = str(err.value)
    assert "\n" not in msg and "refused" in msg and "weights_only" in msg
    from llmkit.train.loop import load_trainer_state

    with pytest.raises(ValueError, match="refused"):
        load_trainer_state(state_file)
    assert not marker.exists()
