"""Property-based tests of the tracker: random particle streams never make it raise, its forecasts are finite or
inf, and its state dict round-trips at any step (the resumed tracker emits exactly the same events)."""

from __future__ import annotations

import copy
import math
import os
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shockmon import BurgersTracker

settings.register_profile("ci", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SHOCKMON_HYPOTHESIS_PROFILE", "ci"))


@st.composite
def streams(draw):  # type: ignore[no-untyped-def]
    """A few groups of random sizes/dimensions, moving by a random mix of drift, contraction, noise and jumps,
    with occasional non-finite values and occasional size changes."""
    n_groups = draw(st.integers(1, 3))
    shapes = [(draw(st.integers(1, 40)), draw(st.sampled_from([0, 1, 2, 5]))) for _ in range(n_groups)]
    steps = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    contraction = draw(st.floats(-0.05, 0.05, allow_subnormal=False))  # other tests may flush denormals
    noise = draw(st.sampled_from([0.0, 1e-6, 1e-2, 1.0]))
    bad_step = draw(st.one_of(st.none(), st.integers(0, 59)))
    resize_step = draw(st.one_of(st.none(), st.integers(0, 59)))
    scale = draw(st.sampled_from([1e-12, 1.0, 1e6]))
    traj_dim = draw(st.sampled_from([0, 1, 7]))
    cut = draw(st.integers(0, 59))
    return shapes, steps, seed, contraction, noise, bad_step, resize_step, scale, traj_dim, cut


def _feed(shapes, steps, seed, contraction, noise, bad_step, resize_step, scale, traj_dim):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(n, d, generator=g) if d else torch.randn(n, generator=g) for n, d in shapes]
    q0 = torch.randn(traj_dim, generator=g)
    for step in range(steps):
        groups = {}
        for i, x0 in enumerate(base):
            x = scale * (x0 * (1 + contraction * step) + noise * torch.randn(x0.shape, generator=g))
            if step == bad_step and i == 0 and x.numel():
                x = x.clone()
                x.view(-1)[0] = math.nan if seed % 2 else math.inf
            if resize_step is not None and step >= resize_step and i == 0 and x.shape[0] > 1:
                x = x[:-1]
            groups[f"g{i}"] = x
        traj = (q0 * (1 + contraction * step) + noise * torch.randn(traj_dim, generator=g)) if traj_dim else None
        yield step, groups, traj


def _check_outputs(tr: BurgersTracker) -> None:
    for k, v in tr.forecast().items():
        assert v.dim() == 0 and (torch.isfinite(v) or torch.isinf(v)), (k, v)
    summary = tr.summary()
    assert torch.isfinite(summary["steps_to_shock"]) or summary["steps_to_shock"] == math.inf


@given(streams())
def test_property_tracker_never_raises_and_roundtrips(case) -> None:  # type: ignore[no-untyped-def]
    shapes, steps, seed, contraction, noise, bad_step, resize_step, scale, traj_dim, cut = case
    full = BurgersTracker(horizon=50, window=6)
    part = BurgersTracker(horizon=50, window=6)
    events_full, events_part = [], []
    resumed = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # size changes warn by design
        for step, groups, traj in _feed(
            shapes, steps, seed, contraction, noise, bad_step, resize_step, scale, traj_dim
        ):
            full.update(step, groups, trajectory=traj)
            events_full += full.poll()
            _check_outputs(full)
            target = resumed if resumed is not None else part
            target.update(step, groups, trajectory=traj)
            events_part += target.poll()
            if step == cut and resumed is None:
                resumed = BurgersTracker(horizon=50, window=6)
                resumed.load_state_dict(copy.deepcopy(part.state_dict()))
    assert [e.to_dict() for e in events_part] == [e.to_dict() for e in events_full]
    if bad_step is not None and bad_step < steps:
        assert any(e.kind.value == "divergence" for e in events_full)
