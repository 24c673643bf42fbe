"""Flows without a shock must stay silent: zero events over 10^4 steps.

Rarefaction (u0 = tanh x), uniform translation, independent random walks, Ornstein--Uhlenbeck particles (a
stationary contraction: gradient flow into a minimum, whose characteristics converge but never cross) and a
constant trajectory. Each control is a group of one tracker, so they also run batched, as in training.
"""

from __future__ import annotations

import pytest
import torch

from shockmon.tracker import BurgersTracker

torch.set_num_threads(1)

STEPS = 10_000
DT = 0.01
CHUNK = 1000  # noise is drawn in chunks of steps: cheap streams


def _noise(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(CHUNK, *shape, generator=g)


@pytest.mark.slow
def test_tracker_controls_one_dimensional_are_silent():
    n = 64
    g = torch.Generator().manual_seed(2024)
    x0 = torch.linspace(-4, 4, n)
    walk = x0.clone()
    ou = x0.clone()  # contracts from [-4, 4] into a stationary cloud of width 0.02
    ou_stat = torch.randn(n, generator=g)  # stationary from the start, noise-dominated
    q = torch.randn(6, generator=g)
    tracker = BurgersTracker()
    events = []
    for c in range(STEPS // CHUNK):
        e1, e2, e3, e4, e5 = (_noise(g, n) for _ in range(5))
        for i in range(CHUNK):
            k = c * CHUNK + i
            t = k * DT
            walk = walk + 0.01 * e3[i]
            ou = ou - 0.01 * ou + 0.003 * e4[i]
            ou_stat = ou_stat - 0.05 * ou_stat + 0.3 * e5[i]
            groups = {
                "rarefaction": x0 + t * torch.tanh(x0) + 1e-3 * e1[i],
                "translation": x0 + t + 1e-3 * e2[i],
                "random-walks": walk,
                "ou-contraction": ou,
                "ou-stationary": ou_stat,
            }
            tracker.update(k, groups, trajectory=q)
        events += tracker.poll()
    assert events == []
    summary = tracker.summary()
    assert float(summary["shock"]) == 0.0 and float(summary["steps_to_shock"]) == float("inf")


@pytest.mark.slow
def test_tracker_controls_multidimensional_and_noisy_trajectory_are_silent():
    """8-D random walks (pairwise closing), a 2-D OU contraction (Jacobian) and a random-walk trajectory."""
    n = 48
    g = torch.Generator().manual_seed(7)
    walk8 = torch.randn(n, 8, generator=g)
    ou2 = 3 * torch.randn(n, 2, generator=g)
    q = torch.zeros(8)
    tracker = BurgersTracker()
    events = []
    for c in range(STEPS // CHUNK):
        e1, e2, e3 = _noise(g, n, 8), _noise(g, n, 2), _noise(g, 8)
        for i in range(CHUNK):
            k = c * CHUNK + i
            walk8 = walk8 + 0.01 * e1[i]
            ou2 = ou2 - 0.01 * ou2 + 0.003 * e2[i]
            q = q + 0.01 * e3[i]
            tracker.update(k, {"walk8": walk8, "ou2": ou2}, trajectory=q)
        events += tracker.poll()
    assert events == []


@pytest.mark.parametrize("rate", [0.05, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracker_exponential_merging_without_crossing_is_silent(rate, seed):
    """256 units in 2-D contracting exponentially onto 3 points (plus 1e-4 noise): an Ornstein--Uhlenbeck-like
    merging whose characteristics converge but never cross. Its collective forecast recedes like time (the
    compression's plateau, as a formed shock's would) but no pair collapses: no event. (A plateau alone, without
    a collapsed pair, fires here at rate 0.05.)"""
    g = torch.Generator().manual_seed(seed)
    n = 256
    x0 = torch.randn(n, 2, generator=g)
    target = (2 * torch.randn(3, 2, generator=g))[torch.arange(n) % 3]
    tracker = BurgersTracker()
    for k in range(300):
        x = target + (x0 - target) * torch.exp(torch.tensor(-rate * k)) + 1e-4 * torch.randn(n, 2, generator=g)
        tracker.update(k, {"units": x})
    assert tracker.poll() == []
