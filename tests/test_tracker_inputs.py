"""Bad input gets a clear error or warning; non-finite input is an event, never an exception, never poison."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from shockmon.events import EventKind
from shockmon.tracker import BurgersTracker

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, r"Expected argument `window` to be an integer >= 3, but got 0"),
        ({"window": 3.5}, r"`window` to be an integer >= 3, but got 3.5"),
        ({"window": True}, r"`window` to be an integer >= 3, but got True"),
        ({"horizon": -1}, r"`horizon` to be a finite number > 0.0, but got -1"),
        ({"horizon": math.inf}, r"`horizon` to be a finite number"),
        ({"neighbors": 1}, r"`neighbors` to be an integer >= 2, but got 1"),
        ({"alpha": 0.0}, r"`alpha` to be a finite number > 0.0 and <= 0.5, but got 0.0"),
        ({"alpha": 0.7}, r"`alpha` to be a finite number > 0.0 and <= 0.5, but got 0.7"),
        ({"rank": 0}, r"`rank` to be an integer >= 1, but got 0"),
        ({"quantile": 1.5}, r"`quantile` to be a finite number >= 0.0 and <= 1.0, but got 1.5"),
        ({"coherence": -1}, r"`coherence` to be a finite number >= 0.0, but got -1"),
        ({"coherence": math.nan}, r"`coherence` to be a finite number >= 0.0, but got nan"),
        ({"method": "svd"}, r"`method` to be one of \('auto', 'jacobian', 'pairs'\), but got 'svd'"),
        ({"time": "epoch"}, r"`time` to be one of \('step', 'lr'\), but got 'epoch'"),
        ({"n_on": 0}, r"`n_on` to be an integer >= 1, but got 0"),
        ({"n_off": 0}, r"`n_off` to be an integer >= 1, but got 0"),
        (
            {"horizon": 100, "disarm_horizon": 50},
            r"`disarm_horizon` to be >= `horizon` \(100.0\), but got 50",
        ),
        ({"cooldown": -1}, r"`cooldown` to be an integer >= 0, but got -1"),
        ({"warmup": -5}, r"`warmup` to be an integer >= 0, but got -5"),
        ({"shock_updates": 0}, r"`shock_updates` to be an integer >= 1, but got 0"),
        ({"riccati_window": 2}, r"`riccati_window` to be an integer >= 4, but got 2"),
        ({"trajectory_window": 3}, r"`trajectory_window` to be an integer >= 4, but got 3"),
        ({"max_particles": 4}, r"`max_particles` to be an integer >= 9, but got 4"),
        ({"knn_every": 0}, r"`knn_every` to be an integer >= 1, but got 0"),
        ({"units": -1}, r"`units` to be an integer >= 0, but got -1"),
        ({"capacity": 0}, r"`capacity` to be an integer >= 1, but got 0"),
        ({"seed": -1}, r"`seed` to be an integer >= 0, but got -1"),
        ({"growth": 1.0}, r"`growth` to be 0 \(off\) or a finite number > 1, but got 1.0"),
        ({"growth": 0.5}, r"`growth` to be 0 \(off\) or a finite number > 1, but got 0.5"),
        ({"growth": math.inf}, r"`growth` to be 0 \(off\) or a finite number > 1, but got inf"),
        ({"growth": True}, r"`growth` to be 0 \(off\) or a finite number > 1, but got True"),
        ({"growth_window": 3}, r"`growth_window` to be an integer >= 4, but got 3"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_tracker_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BurgersTracker(**kwargs)


def test_tracker_defaults_are_valid():
    t = BurgersTracker()
    assert t.horizon == 200 and t.window == 16 and t.disarm_horizon == 400 and "groups=[]" in repr(t)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: t.update(1.0, {"a": torch.zeros(4)}), TypeError, r"`step` to be an int, but got float"),
        (lambda t: t.update(True, {"a": torch.zeros(4)}), TypeError, r"`step` to be an int, but got bool"),
        (
            lambda t: t.update(0, [torch.zeros(4)]),
            TypeError,
            r"`groups` to be a mapping name -> Tensor, but got list",
        ),
        (lambda t: t.update(0, {"a": [1.0, 2.0]}), TypeError, r"group 'a' to be a Tensor, but got list"),
        (
            lambda t: t.update(0, {"a": torch.zeros(4, 2, 2)}),
            ValueError,
            r"group 'a' to have shape \(n,\) or \(n, D\), but got \(4, 2, 2\)",
        ),
        (
            lambda t: t.update(0, {"a": torch.zeros(0)}),
            ValueError,
            r"group 'a' to have shape .* but got \(0,\)",
        ),
        (lambda t: t.update(0, {"a": torch.zeros(4, 0)}), ValueError, r"but got \(4, 0\)"),
        (
            lambda t: t.update(0, {"a": torch.zeros(4, dtype=torch.complex64)}),
            TypeError,
            r"real tensor, but got dtype torch.complex64",
        ),
        (
            lambda t: t.update(0, {"a": torch.zeros(4, dtype=torch.bool)}),
            TypeError,
            r"real tensor, but got dtype torch.bool",
        ),
        (
            lambda t: t.update(0, {"trajectory": torch.zeros(4)}),
            ValueError,
            r"other than 'trajectory', got 'trajectory'",
        ),
        (lambda t: t.update(0, {"": torch.zeros(4)}), ValueError, r"non-empty strings"),
        (
            lambda t: t.update(0, {}, trajectory=torch.zeros(2, 2)),
            ValueError,
            r"`trajectory` to be a non-empty 1-D tensor, but got \(2, 2\)",
        ),
        (
            lambda t: t.update(0, {}, trajectory=[1.0]),
            TypeError,
            r"`trajectory` to be a Tensor or None, but got list",
        ),
        (
            lambda t: t.update(0, {"a": torch.zeros(4)}, lr="0.1"),
            TypeError,
            r"`lr` to be a float, a 0-d Tensor or None, but got str",
        ),
        (
            lambda t: t.update(0, {"a": torch.zeros(4)}, lr=torch.ones(2)),
            ValueError,
            r"`lr` to be a scalar, but got shape \(2,\)",
        ),
        (lambda t: t.update(0, {}), ValueError, r"at least one group or a trajectory on the first update"),
    ],
    ids=lambda v: "",
)
def test_tracker_invalid_updates(call, error, match):
    with pytest.raises(error, match=match):
        call(BurgersTracker())


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        ({"a": torch.zeros(2, 2, 2)}, ValueError, r"group 'a' to have shape \(n,\) or \(n, D\), but got \(2, 2, 2\)"),
        ({"a": torch.zeros(4, dtype=torch.complex64)}, TypeError, r"group 'a' to be a real tensor"),
        ({"a": torch.zeros(4, dtype=torch.bool)}, TypeError, r"group 'a' to be a real tensor"),
        ({"a": [0.0] * 4}, TypeError, r"group 'a' to be a Tensor, but got list"),
        ({"a": torch.zeros(4), "trajectory": torch.zeros(4)}, ValueError, r"other than 'trajectory'"),
        ({"a": torch.zeros(4), "": torch.zeros(4)}, ValueError, r"non-empty strings"),
    ],
    ids=["dims", "complex", "bool", "list", "trajectory", "empty-name"],
)
def test_tracker_later_updates_are_checked_as_the_first(groups, error, match):
    """The checks of an update whose groups have the last update's names, shapes, dtypes and devices are skipped
    (they passed then); any other is checked in full."""
    t = BurgersTracker()
    for k in range(3):
        t.update(k, {"a": torch.zeros(4)})
    with pytest.raises(error, match=match):
        t.update(3, groups)
    t.update(4, {"a": torch.zeros(4)})  # the tracker goes on
    t.drop(["a"])
    t.update(5, {"a": torch.ones(4)})  # the same shape after a drop: registered afresh
    assert t.groups == ["a"] and t._buckets[0].count == 1
    with pytest.warns(UserWarning, match="Group 'a' changed dtype from float32 to float64; its history restarts"):
        t.update(6, {"a": torch.ones(4, dtype=torch.float64)})


def test_tracker_steps_must_increase():
    t = BurgersTracker()
    t.update(5, {"a": torch.zeros(4)})
    with pytest.raises(ValueError, match="`step` to increase, but got 5 after 5"):
        t.update(5, {"a": torch.zeros(4)})
    with pytest.raises(ValueError, match="but got 3 after 5"):
        t.update(3, {"a": torch.zeros(4)})


def test_tracker_lr_time_needs_a_first_learning_rate():
    t = BurgersTracker(time="lr")
    with pytest.raises(ValueError, match="Expected `lr` on the first update of a tracker with time='lr'"):
        t.update(0, {"a": torch.zeros(4)})
    t.update(0, {"a": torch.zeros(4)}, lr=0.1)
    t.update(1, {"a": torch.zeros(4)})  # later updates reuse the last learning rate


def test_tracker_integer_inputs_are_accepted():
    t = BurgersTracker()
    for k in range(20):
        t.update(k, {"a": torch.arange(10) * (k + 1)})
    assert t.poll() == []


def _sine_stream(n: int, steps: int) -> list[torch.Tensor]:
    x0 = torch.linspace(-math.pi, math.pi, n)
    g = torch.Generator().manual_seed(5)
    return [x0 - 0.01 * k * torch.sin(x0) + 1e-4 * torch.randn(n, generator=g) for k in range(steps)]


def test_tracker_group_changing_size_warns_once_and_restarts():
    xs = _sine_stream(128, 120)
    t = BurgersTracker()
    for k in range(60):
        t.update(k, {"a": xs[k], "b": xs[k]})
    assert math.isfinite(float(t.forecast()["a"]))
    with pytest.warns(
        UserWarning, match=r"Group 'a' changed size from 128x1 to 96x1 particles; its history restarts"
    ):
        t.update(60, {"a": xs[60][:96], "b": xs[60]})
    assert math.isinf(float(t.forecast()["a"]))  # history restarted...
    assert math.isfinite(float(t.forecast()["b"]))  # ...for that group only
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the same new size does not warn again
        for k in range(61, 120):
            t.update(k, {"a": xs[k][:96], "b": xs[k]})
    # the restarted group tracks again (its half-domain of particles crosses at step 100 too)
    assert any(e.group == "a" and e.kind is EventKind.FORECAST and e.step > 60 for e in t.poll())


def test_tracker_group_missing_from_an_update_keeps_its_state():
    xs = _sine_stream(64, 60)
    t = BurgersTracker()
    for k in range(40):
        t.update(k, {"a": xs[k], "b": xs[k]})
    before = float(t.summary()["forecast/b"])
    t.update(40, {"a": xs[40]})  # b absent: split from a's bucket, not updated
    assert float(t.summary()["forecast/b"]) == before
    for k in range(41, 60):
        t.update(k, {"a": xs[k], "b": xs[k]})
    assert float(t.forecast()["a"]) == pytest.approx(float(t.forecast()["b"]), rel=0.05)


def test_tracker_non_finite_input_is_a_divergence_event_and_does_not_poison():
    xs = _sine_stream(256, 120)
    clean, dirty = BurgersTracker(), BurgersTracker()
    for k, x in enumerate(xs):
        clean.update(k, {"a": x})
        y = x.clone()
        if 30 <= k < 33:  # three steps of NaN/Inf in a few particles
            y[[5, 200]] = math.nan
            y[100] = math.inf
        if k == 70:  # the whole group, once
            y[:] = -math.inf
        dirty.update(
            k, {"a": y}, trajectory=torch.tensor([math.nan, 1.0]) if k == 50 else torch.tensor([0.0, 1.0])
        )
    events = dirty.poll()
    div = [e for e in events if e.kind is EventKind.DIVERGENCE]
    assert [(e.group, e.step) for e in div] == [("a", 30), ("trajectory", 50), ("a", 70)]  # rising edges only
    assert div[0].channel == "input" and set(div[0].units) == {5, 100, 200}
    assert len(div[2].units) == dirty.units
    # the flow is still tracked: the same forecast and shock as without the bad values
    assert float(dirty.summary()["state/a"]) == float(clean.summary()["state/a"])
    shocks = [e.step for e in events if e.kind is EventKind.SHOCK and e.group == "a"]
    ref = [e.step for e in clean.poll() if e.kind is EventKind.SHOCK]
    assert shocks and abs(shocks[0] - ref[0]) <= 2
    assert all(
        math.isfinite(float(v)) or math.isinf(float(v)) for v in dirty.summary().values() if not v.isnan()
    )


def test_tracker_all_non_finite_from_the_start_does_not_crash():
    t = BurgersTracker()
    for k in range(30):
        t.update(k, {"a": torch.full((32, 2), math.nan)}, trajectory=torch.full((3,), math.inf))
    events = t.poll()
    assert {(e.group, e.kind) for e in events} == {
        ("a", EventKind.DIVERGENCE),
        ("trajectory", EventKind.DIVERGENCE),
    }
    assert len(events) == 2


def test_tracker_kept_pair_index_follows_refreshed_split_and_loaded_neighbour_lists(monkeypatch):
    """The flat gather index of the neighbour pairs is kept between updates: refreshed lists, a bucket split by a
    missing group and a resumed state give exactly what recomputing it at every update gives."""
    from shockmon import _particles as pt

    g = torch.Generator().manual_seed(3)
    base = {nm: torch.randn(80, 5, generator=g) for nm in "abc"}
    pull = torch.randn(5, generator=g)

    def inputs(k: int) -> dict[str, torch.Tensor]:  # a cloud contracting onto a plane, with noise
        out = {}
        for nm, x0 in base.items():
            x = x0.clone()
            x[:, 0] = x0[:, 0] * (1 - 0.012 * k) + 0.05 * pull[0]
            out[nm] = x + 1e-3 * torch.randn(x.shape, generator=g)
        return out

    stream = [inputs(k) for k in range(70)]

    def run() -> tuple[list[dict[str, float]], list]:
        tr, seen = BurgersTracker(knn_every=4, neighbors=6), []
        for k, groups in enumerate(stream):
            if k == 30:
                groups = {nm: x for nm, x in groups.items() if nm != "c"}  # "c" is split off its bucket
            if k == 45:
                resumed = BurgersTracker()
                resumed.load_state_dict(copy.deepcopy(tr.state_dict()))
                tr = resumed
            tr.update(k, groups)
            seen.append({nm: float(v) for nm, v in tr.summary().items()})
        return seen, tr.poll()

    kept = run()
    original = pt.pair_stats
    monkeypatch.setattr(pt, "pair_stats", lambda fm, idx, flat=None: original(fm, idx))
    recomputed = run()
    assert kept[1] == recomputed[1]
    for k, (a, b) in enumerate(zip(kept[0], recomputed[0])):
        assert a.keys() == b.keys(), k
        assert all(a[x] == b[x] or (math.isnan(a[x]) and math.isnan(b[x])) for x in a), k
    # moved to the device of its inputs (meta here: any CPU-kept index would be an error there)
    monkeypatch.setattr(pt, "pair_stats", original)
    tr = BurgersTracker(knn_every=1000, neighbors=6)  # no refresh after the move: the kept index must move
    for k in range(40):
        tr.update(k, stream[k])
    for k in range(40, 50):
        tr.update(k, {nm: torch.empty(80, 5, device="meta") for nm in "abc"})
    assert {t.device.type for t in tr.summary().values()} == {"meta"}
    assert {b.pairs[1].device.type for b in tr._buckets if b.pairs is not None} == {"meta"}  # a CUDA run would raise


def test_tracker_running_window_fit_follows_splits_resumes_and_states_saved_without_it(monkeypatch):
    """The window fit comes from running sums, advanced at each update and rebuilt from the ring every `window`
    updates. Through learning-rate time, a bucket split by a missing group, a resumed state and a state saved
    before the sums existed, every update's fit is the least-squares fit of the ring (within 2 % of its float
    resolution), and a resumed state goes on bit for bit."""
    from shockmon import _particles as pt

    small = BurgersTracker(window=8)
    for k in range(20):
        small.update(k, {"a": torch.randn(60, 3)})
    assert small._buckets[0].fit_sums is None  # below CPU_LARGE elements the product over the ring is cheaper
    monkeypatch.setattr(pt, "CPU_LARGE", 1)
    L = 8
    g = torch.Generator().manual_seed(5)
    base = {nm: 5.0 + torch.randn(60, 3, generator=g) for nm in "abc"}
    drift = {nm: 0.2 * torch.randn(60, 3, generator=g) for nm in "abc"}

    def run(stream_len: int, resume_at: int | None, legacy: bool) -> tuple[BurgersTracker, list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(9)
        tr, fits = BurgersTracker(window=L, time="lr"), []
        t = 0.0
        for k in range(stream_len):
            lr = 0.01 * (1.5 + math.sin(0.3 * k))
            groups = {nm: base[nm] + drift[nm] * t + 1e-3 * torch.randn(60, 3, generator=gen) for nm in "abc"}
            t += lr
            if k == 20:
                del groups["c"]  # "c" is split off its bucket
            if k == resume_at:
                state = copy.deepcopy(tr.state_dict())
                if legacy:  # as saved before the running sums existed
                    for bd in state["buckets"]:
                        for key in ("fit_sums", "fit_count", "fit_ref"):
                            del bd[key]
                tr = BurgersTracker()
                tr.load_state_dict(state)
            tr.update(k, groups, lr=lr)
            for b in tr._buckets:
                if b.count >= L:
                    times = torch.tensor(b.times_host, dtype=torch.float64)
                    dt = times - times.mean()
                    x = b.pos.double() - b.pos[0].double()
                    v_exact = torch.einsum("l,l...->...", dt, x) / (dt * dt).sum()
                    res = 16 * torch.finfo(b.dtype).eps * float(b.pos.abs().max()) / float(dt.norm())
                    assert (b.v.double() - v_exact).abs().max() <= 0.02 * res, (k, b.names)
                    assert (b.xc.double() - b.pos[0].double() - x.mean(0)).abs().max() <= res * float(dt.norm())
            fits.append(torch.cat([b.v.flatten() for b in tr._buckets]))
        return tr, fits

    plain, fits = run(60, None, False)
    assert sum(b.fit_sums is not None for b in plain._buckets) == 2  # both buckets fit from the sums
    for resume_at in (29, 36):  # between rebuilds, and at one
        _, resumed = run(60, resume_at, False)
        assert all(torch.equal(a, b) for a, b in zip(fits, resumed))
        _, legacy = run(60, resume_at, True)  # rebuilt at once from the ring: the same fits, to rounding
        assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(fits, legacy))


def test_non_finite_particles_are_found_and_replaced_alike_by_a_gather_of_rows_and_a_where(monkeypatch):
    """The coordinates' sum is a matrix-vector product, and on CPU the replacement of a large bucket's non-finite
    particles a gather of rows from a kept buffer (elsewhere a `where`): the same particles are found and
    replaced, with the same extrapolations to rounding, and the same events follow."""
    from shockmon import _particles as pt

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 4, generator=g)
    x[0, 3, 1], x[1, 7, 0], x[2, 9, :2] = math.nan, -math.inf, torch.tensor([math.inf, -math.inf])
    x[2, 11, 2] = 3e38  # finite, and so is its row (a sum would overflow only beyond)
    assert torch.equal(pt.finite(pt.row_sums(x)), torch.isfinite(x).all(-1))
    keep = torch.rand(3, 50, generator=g) < 0.7
    both = torch.randn(2, 3, 50, 4, generator=g)
    assert torch.equal(pt.take_rows(both, keep), torch.where(keep[..., None], both[0], both[1]))

    base = torch.randn(2, 64, 3, generator=g)
    drift = 0.05 * torch.randn(2, 64, 3, generator=g)
    stream = []
    for k in range(60):
        y = base + drift * k + 1e-3 * torch.randn(2, 64, 3, generator=g)
        if k in (1, 20, 21, 40):  # on the second update, on two in a row, and once the window is full
            y[0, [2, 30]] = math.nan
            y[1, 5, 1] = math.inf
        stream.append({"a": y[0], "b": y[1]})

    def run(rows: bool) -> tuple[list[torch.Tensor], list]:
        monkeypatch.setattr(pt, "CPU_LARGE", 1 if rows else 1 << 62)  # the rows form, or the `where` everywhere
        tr, rings = BurgersTracker(window=8), []
        for k, groups in enumerate(stream):
            tr.update(k, groups)
            rings.append(tr._buckets[0].pos.clone())
        assert (tr._buckets[0].fill is not None) == rows
        return rings, tr.poll()

    rows, where = run(True), run(False)
    assert rows[1] == where[1] and any(e.kind is EventKind.DIVERGENCE for e in rows[1])
    for a, b in zip(rows[0], where[0]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
