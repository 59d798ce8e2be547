"""Client-level DP's server side (dp.ClientDP, used by the Flower App's strategy): clients are Poisson-sampled at the
rate the accountant assumes whoever is left, and each update is clipped and noised as calibrated. Runs with dying
clients and empty rounds: test_federate_app.py and test_federate_deploy.py."""
import numpy as np
import pytest

from llmkit.train import dp as privacy
from llmkit.train.federated import FederateConfig


def test_clients_are_poisson_sampled_at_the_accounted_rate_whoever_is_left():
    # 10 clients, fraction 0.1: the accountant assumes q = 1/10. With 5 of them gone Flower would pick 1 of the 5
    # every round (q = 0.2, and never 0 or 2); the run must keep each client's chance at 0.1, independently.
    dp = privacy.ClientDP(FederateConfig(model="m", data="d", out="o", clients=10, rounds=20, fraction_fit=0.1,
                                         dp_epsilon=20.0))
    assert dp.m == 1 and dp.sample_rate == pytest.approx(0.1)
    alive = list(range(5))
    picks = [dp.sample(alive) for _ in range(20000)]
    rate = np.mean([c in p for p in picks for c in alive])
    assert rate == pytest.approx(0.1, abs=0.01)
    sizes = np.bincount([len(p) for p in picks], minlength=3)
    assert sizes[0] > 0.5 * 20000 and sizes[2] > 0  # binomial sizes (Poisson sampling), not a fixed-size subset
    assert dp.summary(3)["sampling"] == "poisson"


def test_client_level_dp_clips_each_update_and_adds_calibrated_noise():
    fc = FederateConfig(model="m", data="d", out="o", clients=4, rounds=5, dp_epsilon=8.0, dp_clip=1.0)
    dp = privacy.ClientDP(fc)
    assert dp.m == 4 and dp.sample_rate == 1.0 and dp.noise > 0
    assert 7.9 <= dp.epsilon(5) <= 8.0 and dp.epsilon(1) < dp.epsilon(5)
    g = [np.zeros((3, 4), np.float32), np.ones(5, np.float32)]
    big = [np.full((3, 4), 10.0, np.float32), np.ones(5, np.float32)]  # update norm sqrt(12) * 10: clipped to 1
    small = [np.full((3, 4), 0.01, np.float32), np.ones(5, np.float32)]  # norm ~0.035: kept as it is
    dp.noise = 0.0
    new, info = dp.aggregate(g, [big, small])
    assert info["clipped"] == 1 and info["update_norms"][0] == pytest.approx(np.sqrt(12) * 10, rel=1e-5)
    expect = (np.full((3, 4), 1 / np.sqrt(12)) + 0.01) / 4  # uniform mean over the planned 4 clients
    np.testing.assert_allclose(new[0], expect, rtol=1e-5)
    np.testing.assert_allclose(new[1], 1.0)
    assert new[0].dtype == np.float32
    dp.noise = 2.0  # the noise on the mean has standard deviation noise * clip / m
    zeros = [np.zeros(200_000, np.float32)]
    new, _ = dp.aggregate(zeros, [zeros])
    assert new[0].std() == pytest.approx(2.0 * 1.0 / 4, rel=0.02)
