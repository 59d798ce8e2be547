"""Differential privacy for fine-tuning: DP-SGD (Abadi et al. 2016) through Opacus.

`DPTraining` is the hook train.py's loop calls once before its first step: Opacus'
`PrivacyEngine.make_private_with_epsilon` wraps the model (per-sample gradients), the optimizer (per-sample clipping
to --max-grad-norm, Gaussian noise calibrated to the target epsilon over the planned steps) and the data (Poisson
sampling: each example joins each batch independently with probability batch_size / N). The accountant (PRV by
default, RDP on request) reports the epsilon spent so far at every evaluation.

Only LoRA adapters and the classification head train under DP (the frozen base needs no per-sample gradients).
llmkit's LoRALinear and the head multiply by their weights directly (fused_linear), which Opacus' module hooks never
see; `make_dp_ready` switches them to classes that call their nn.Linear submodules, so Opacus' own nn.Linear rule
computes the per-sample gradients (tests check them against Opacus' functorch fallback and a per-example loop).
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from llmkit.data.corpus import IGNORE
from llmkit.model.lora import LoRALinear

ACCOUNTANTS = ("prv", "rdp")


@dataclass
class DPConfig:
    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"

    def check(self) -> "DPConfig":
        """Raise ValueError on an out-of-range setting."""
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"--dp-epsilon must be a positive number, not {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"--dp-delta must be between 0 and 1 (typically below 1 / number of examples), "
                             f"not {self.delta!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and math.isfinite(self.max_grad_norm)
                and self.max_grad_norm > 0):
            raise ValueError(f"--max-grad-norm must be a positive number, not {self.max_grad_norm!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"--dp-accountant must be one of {', '.join(ACCOUNTANTS)}, not {self.accountant!r}")
        return self


def check_compatible(*, method: str, grad_accum: int, resume: bool, compile: bool = False,
                     fsdp: bool = False, world_size: int | None = None) -> None:
    """Refuse training options under which the DP guarantee or its accounting would not hold."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world > 1 or fsdp:
        raise ValueError("--dp-epsilon is single-process only: DDP/FSDP would need distributed Poisson sampling "
                         "and noise added once across ranks; run without torchrun")
    if grad_accum != 1:
        raise ValueError("--dp-epsilon with --grad-accum > 1 would merge several Poisson samples into one noisy "
                         "step, which the accountant does not model; raise --batch-size instead")
    if resume:
        raise ValueError("--dp-epsilon cannot --resume: the accountant's history is not in the checkpoint, so the "
                         "epsilon spent before the interruption would be forgotten; start a new run")
    if compile:
        raise ValueError("--dp-epsilon does not support --compile (Opacus' per-sample-gradient hooks run eagerly)")
    if method != "lora":
        raise ValueError("--dp-epsilon trains LoRA adapters (and a classification head) only: use --method lora")


# ---------------------------------------------------------------------------------------------------------------
# modules Opacus can see


class DPLoRALinear(LoRALinear):
    """LoRALinear whose low-rank path calls lora_A and lora_B as modules, so Opacus' nn.Linear hooks capture them."""

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)
        return base + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class DPHead(nn.Linear):
    """A classification head called as a module (llmkit's forward calls a plain nn.Linear's weight directly)."""


def _register_rules():
    from opacus.grad_sample import register_grad_sampler
    from opacus.grad_sample.linear import compute_linear_grad_sample

    # the head is an nn.Linear in all but name: Opacus' own rule applies (its rules are keyed by exact type)
    register_grad_sampler(DPHead)(compute_linear_grad_sample)


def make_dp_ready(model: nn.Module) -> nn.Module:
    """Switch LoRA layers and the head to module-calling classes (same parameters, names and outputs), in place."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    allowed = [n for n in trainable if ".lora_A." in n or ".lora_B." in n or n.startswith("score.")]
    if len(allowed) != len(trainable) or not trainable:
        other = sorted(set(trainable) - set(allowed))[:3]
        raise ValueError(f"DP training covers LoRA adapters and the classification head only; other trainable "
                         f"parameters: {other or 'none at all'}")
    for m in model.modules():
        if type(m) is LoRALinear:
            m.__class__ = DPLoRALinear
    score = getattr(model, "score", None)
    if type(score) is nn.Linear and score.weight.requires_grad:
        score.__class__ = DPHead
    return model


def undo_dp_ready(model: nn.Module) -> nn.Module:
    """Give LoRA layers and the head back their plain classes (after training)."""
    for m in model.modules():
        if type(m) is DPLoRALinear:
            m.__class__ = LoRALinear
        elif type(m) is DPHead:
            m.__class__ = nn.Linear
    return model


# ---------------------------------------------------------------------------------------------------------------
# per-example losses: DP-SGD clips each example's gradient, so each example's loss must depend on it alone


def per_example_classify_loss(model, batch):
    """Mean over the batch of each example's cross-entropy (an empty Poisson batch gives 0), and accuracy."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], head="classify")  # (B, num_labels)
    losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
    acc = (logits.argmax(-1) == batch["labels"]).float().sum() / max(1, len(losses))
    return losses.sum() / max(1, len(losses)), {"acc": acc.detach()}


def per_example_clm_loss(model, batch):
    """Mean over the batch of each example's mean next-token loss (not the mean over all tokens of the batch,
    which would weigh an example by the other examples' lengths)."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
    labels = batch["labels"]
    tok = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    tok = tok.view(labels.shape)
    per_example = tok.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)
    return per_example.sum() / max(1, len(per_example))


# ---------------------------------------------------------------------------------------------------------------
# noise and accounting


def noise_multiplier(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends dp.epsilon over `steps` steps, or a ValueError saying what is reachable."""
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta, sample_rate=sample_rate,
                                        steps=steps, accountant=dp.accountant)
        except ValueError:
            acc = create_accountant(dp.accountant)
            acc.history = [(MAX_SIGMA, sample_rate, steps)]
            floor = acc.get_epsilon(delta=dp.delta)
    raise ValueError(f"--dp-epsilon {dp.epsilon:g} is out of reach: {steps} steps at sample rate {sample_rate:.4g} "
                     f"(batch / examples) spend at least epsilon {floor:.3g} with the {dp.accountant} accountant even "
                     f"at noise multiplier {MAX_SIGMA:g}; ask for epsilon above {floor:.3g}, or train fewer steps")


def spent_epsilon(noise: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by `steps` Poisson-sampled Gaussian steps (what the run's accountant reports)."""
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(noise, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


class ClientDP:
    """DP-FedAvg on the server (McMahan et al. 2018): Poisson-sample clients, clip each update, add noise.

    Each round every connected client joins independently with probability q = m / --clients (m: the clients
    Flower's fraction would pick of all --clients), which is the Poisson-subsampled Gaussian mechanism the RDP
    accountant bounds. The sum of the clipped updates is divided by the fixed m (not by how many came), so one
    client moves the mean by at most clip / m whoever else is there; a client that fails adds a zero update. A client
    that leaves (or never connects) is simply never sampled: no one else's q grows, so the account stays valid as
    clients drop. A round with no client sampled still releases noise (else that round would tell whether anyone was
    sampled)."""

    def __init__(self, fc):
        self.clip, self.delta, self.m, self.target = fc.dp_clip, fc.dp_delta, fc.sampled_per_round(), fc.dp_epsilon
        self.sample_rate, self.rounds = self.m / fc.clients, fc.rounds
        cfg = DPConfig(fc.dp_epsilon, fc.dp_delta, fc.dp_clip, "rdp").check()
        self.noise = noise_multiplier(cfg, self.sample_rate, fc.rounds)  # or a ValueError: what's reachable
        self.rng = np.random.default_rng()  # unseeded: the noise and the sampling must not be predictable

    def sample(self, clients: list) -> list:
        """Poisson sampling: each of `clients` (those connected now) independently with probability q."""
        return [c for c in clients if self.rng.random() < self.sample_rate]

    def aggregate(self, global_arrays: list, client_arrays: list) -> tuple[list, dict]:
        """(new global arrays, {"clipped": count, "update_norms": [...]}): global + mean clipped update + noise.
        The info is per client and un-noised: for tests and the server's console, never for metrics.jsonl."""
        total = [np.zeros_like(g, dtype=np.float64) for g in global_arrays]
        norms = []
        for arrays in client_arrays:
            delta = [a.astype(np.float64) - g for a, g in zip(arrays, global_arrays)]
            norm = float(np.sqrt(sum((d * d).sum() for d in delta)))
            norms.append(round(norm, 6))
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            for t, d in zip(total, delta):
                t += d * scale
        std = self.noise * self.clip / self.m
        new = [(g + t / self.m + self.rng.normal(0.0, std, g.shape)).astype(g.dtype)
               for g, t in zip(global_arrays, total)]
        return new, {"clipped": sum(n > self.clip for n in norms), "update_norms": norms}

    def epsilon(self, rounds_done: int) -> float:
        return spent_epsilon(self.noise, self.sample_rate, rounds_done, self.delta, "rdp")

    def summary(self, rounds_done: int) -> dict:
        return {"level": "client", "target_epsilon": self.target, "delta": self.delta, "clip": self.clip,
                "noise_multiplier": self.noise, "clients_per_round": self.m, "sample_rate": self.sample_rate,
                "planned_rounds": self.rounds, "rounds": rounds_done, "accountant": "rdp", "sampling": "poisson",
                "epsilon_spent": self.epsilon(rounds_done)}


class PoissonBatches:
    """Endless Poisson-sampled batches: Opacus' DPDataLoader started again after each of its epochs."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0

    def __iter__(self):
        while True:
            yield from self.loader
            self.epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict):
        raise ValueError("a DP run cannot be resumed (the accountant would restart at zero)")


class DPTraining:
    """train.py's `wrap` hook for DP-SGD: wraps model, optimizer and data with Opacus; reports the epsilon spent.

    examples/collate_fn/batch_size describe the training set (collate_fn turns a list of examples into a batch);
    steps is the number of optimizer steps the noise is calibrated for.
    """

    def __init__(self, dp: DPConfig, examples: list, collate_fn, batch_size: int, steps: int):
        self.dp, self.examples, self.collate_fn, self.batch_size = dp.check(), examples, collate_fn, batch_size
        self.steps = steps
        if len(examples) < 2:
            raise ValueError("DP training needs at least two training examples")
        if dp.delta >= 1 / len(examples):
            print(f"warning: --dp-delta {dp.delta:g} is not below 1 / {len(examples)} examples: such a delta "
                  "allows leaking a whole example; use a smaller one", file=sys.stderr)
        n_batches = -(-len(examples) // batch_size)  # Opacus' sample rate is 1 / len(data_loader)
        self.sample_rate = 1 / n_batches
        self.noise = noise_multiplier(dp, self.sample_rate, steps)  # fails here, before anything is written
        self.engine = None

    def __call__(self, model, optimizer, train_data):
        """(model, optimizer, train_data, metrics_fn) wrapped for DP-SGD; train_data is replaced by Poisson batches."""
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader

        check_compatible(method="lora", grad_accum=1, resume=False)
        _register_rules()
        make_dp_ready(getattr(model, "_orig_mod", model))
        loader = DataLoader(self.examples, batch_size=self.batch_size, collate_fn=self.collate_fn)
        model.train()
        with warnings.catch_warnings():  # Opacus warns about secure_mode (a CSPRNG for the noise) on every run
            warnings.simplefilter("ignore")
            self.engine = PrivacyEngine(accountant=self.dp.accountant)
            model, optimizer, loader = self.engine.make_private_with_epsilon(
                module=model, optimizer=optimizer, data_loader=loader, target_epsilon=self.dp.epsilon,
                target_delta=self.dp.delta, max_grad_norm=self.dp.max_grad_norm, poisson_sampling=True,
                # Opacus plans in epochs (steps = int(epochs / sample_rate)); half a step avoids rounding down
                epochs=(self.steps + 0.5) * self.sample_rate)
        self.noise = optimizer.noise_multiplier
        # Opacus' backward hooks sit on modules whose inputs (frozen activations) need no gradient: expected, harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return model, optimizer, PoissonBatches(loader), self.metrics

    def epsilon(self) -> float:
        """Epsilon spent so far (0 before the first step)."""
        if self.engine is None or not len(self.engine.accountant):
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(self.engine.get_epsilon(self.dp.delta))

    def steps_taken(self) -> int:
        """Noisy steps the accountant has recorded."""
        return int(sum(h[-1] for h in self.engine.accountant.history)) if self.engine else 0

    def metrics(self) -> dict:
        """The row train.py adds to each evaluation in metrics.jsonl."""
        return {"epsilon": round(self.epsilon(), 4)}

    def summary(self) -> dict:
        """What a run's config records: the target, the mechanism's parameters and the epsilon actually spent."""
        return {"target_epsilon": self.dp.epsilon, "delta": self.dp.delta, "max_grad_norm": self.dp.max_grad_norm,
                "accountant": self.dp.accountant, "noise_multiplier": self.noise, "sample_rate": self.sample_rate,
                "expected_batch_size": self.batch_size, "n_examples": len(self.examples),
                "planned_steps": self.steps, "steps": self.steps_taken(),
                "epsilon_spent": self.epsilon()}
