"""The fusion-default rule on made-up per-user losses (pure: no model)."""

from __future__ import annotations

import numpy as np
import pytest

from server.bank.selection import choose, paired_interval

RNG = np.random.default_rng(0)


def _pool(users: int, shifts: list[float], noise: float) -> np.ndarray:
    """Candidates x users: a shared user difficulty plus each candidate's shift plus noise."""
    difficulty = RNG.normal(3.0, 0.5, size=users)

    def jitter() -> np.ndarray:  # exactly zero-mean: each candidate's mean is the shift
        e = RNG.normal(0, noise, size=users)
        return e - e.mean()

    return np.array([difficulty + shift + jitter() for shift in shifts])


def test_a_gain_within_the_pools_noise_keeps_the_shared_lora_alone():
    losses = _pool(10, [0.0, -0.004, 0.002, -0.003], noise=0.05)
    assert np.argmin(losses.mean(axis=1)) == 1  # the lowest mean is a residual candidate...
    chosen, intervals = choose(losses, [True] * 4, baseline=0)
    assert chosen == 0  # ...but not beyond noise
    assert intervals[0] is None and all(low < 0 < high for _, low, high in intervals[1:])


def test_a_clear_gain_is_taken_and_the_lowest_clear_mean_wins():
    losses = _pool(36, [0.0, -0.05, -0.08, 0.03], noise=0.01)
    chosen, intervals = choose(losses, [True] * 4, baseline=0)
    assert chosen == 2 and intervals[2][2] < 0
    # a candidate whose served rank does not fit is never chosen, however good
    assert choose(losses, [True, True, False, True], baseline=0)[0] == 1


def test_without_a_shared_lora_the_lowest_mean_wins():
    losses = _pool(10, [0.01, -0.004, 0.002], noise=0.05)
    chosen, intervals = choose(losses, [True] * 3, baseline=None)
    assert chosen == int(np.argmin(losses.mean(axis=1))) and intervals == [None] * 3
    with pytest.raises(ValueError, match="max_fused_rank"):
        choose(losses, [False] * 3, baseline=None)


def test_the_interval_is_a_user_bootstrap_of_the_mean_difference():
    diffs = RNG.normal(-0.1, 0.2, size=40)
    mean, low, high = paired_interval(diffs)
    assert mean == pytest.approx(diffs.mean()) and low < mean < high
    se = diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert paired_interval(diffs) == (mean, low, high)  # seeded
