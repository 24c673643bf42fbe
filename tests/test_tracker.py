"""BurgersTracker on exact Burgers flows: forecasts, shocks, viscosity, trajectory view, persistence, no sync.

Thresholds are the issue's. Seeds used to choose the tracker's defaults were 0-8; the seeds here (11, 12) were
not looked at while choosing them.
"""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch

from shockmon.burgers import breaking_time, formation_time, hopf_cole
from shockmon.events import EventKind
from shockmon.tracker import BurgersTracker

torch.set_num_threads(1)

DT = 0.01  # Burgers time per training step
SEEDS = (11, 12)

INITIAL = {
    "sine": (lambda x: -torch.sin(x), (-math.pi, math.pi)),
    "gaussian": (lambda x: torch.exp(-x * x), (-4.0, 6.0)),
    "smooth-step": (lambda x: -torch.tanh(x), (-4.0, 4.0)),
}


def inviscid_stream(
    u0: Callable[[torch.Tensor], torch.Tensor],
    lo: float,
    hi: float,
    n: int,
    noise: float,
    seed: int,
    steps: int,
) -> Iterator[torch.Tensor]:
    """Particles on the straight characteristics x0 + t u0(x0), plus independent position noise each step."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.linspace(lo, hi, n)
    for k in range(steps):
        yield x0 + DT * k * u0(x0) + noise * torch.randn(n, generator=g)


def run(tracker: BurgersTracker, stream: Iterator[torch.Tensor], name: str = "layer") -> dict[int, float]:
    forecasts = {}
    for k, x in enumerate(stream):
        tracker.update(k, {name: x})
        forecasts[k] = float(tracker.forecast()[name])
    return forecasts


def first(events, kind: EventKind) -> int | None:
    steps = [e.step for e in events if e.kind is kind]
    return steps[0] if steps else None


# ----------------------------------------------------------------------------------------------------
# inviscid
@pytest.mark.parametrize("noise", [0.0, 1e-3], ids=["exact", "noisy"])
@pytest.mark.parametrize("ic", list(INITIAL))
def test_tracker_inviscid_forecast_and_shock(ic, noise):
    u0, (lo, hi) = INITIAL[ic]
    t_star = breaking_time(u0, torch.linspace(lo, hi, 2001))
    s_star = t_star / DT  # in steps
    for seed in SEEDS if noise else SEEDS[:1]:
        tracker = BurgersTracker(horizon=200)
        fc = run(tracker, inviscid_stream(u0, lo, hi, 256, noise, seed, int(1.3 * s_star)))
        events = tracker.poll()
        tol = 0.05 if noise == 0 else 0.10
        half = round(s_star / 2)
        assert abs(fc[half] / s_star - 1) <= tol, (seed, fc[half], s_star)
        # and it stays there up to the crossing
        assert all(abs(fc[k] / s_star - 1) <= tol for k in range(half, int(0.95 * s_star))), seed
        f = first(events, EventKind.FORECAST)
        assert f is not None and f < s_star, (seed, events)
        s = first(events, EventKind.SHOCK)
        assert s is not None and abs(s / s_star - 1) <= 0.03, (seed, s, s_star)
        assert first(events, EventKind.DIVERGENCE) is None


@pytest.mark.parametrize("ic", list(INITIAL))
def test_tracker_inviscid_heavier_noise_withholds_rather_than_errs(ic):
    """Noise 3e-3: the forecast may be withheld (inf) for a while, but a finite one is within 10 %."""
    u0, (lo, hi) = INITIAL[ic]
    s_star = breaking_time(u0, torch.linspace(lo, hi, 2001)) / DT
    for seed in SEEDS:
        tracker = BurgersTracker(horizon=200)
        fc = run(tracker, inviscid_stream(u0, lo, hi, 256, 3e-3, seed, int(1.3 * s_star)))
        finite = [fc[k] for k in range(round(s_star / 2), int(0.95 * s_star)) if math.isfinite(fc[k])]
        assert finite and all(abs(f / s_star - 1) <= 0.10 for f in finite), seed
        events = tracker.poll()
        s = first(events, EventKind.SHOCK)
        assert s is not None and abs(s / s_star - 1) <= 0.03, (seed, s)


def test_tracker_inviscid_event_payload():
    u0, (lo, hi) = INITIAL["sine"]
    tracker = BurgersTracker(horizon=200, units=4)
    run(tracker, inviscid_stream(u0, lo, hi, 256, 0.0, 0, 120))
    events = tracker.poll()
    assert [e.kind for e in events] == [EventKind.FORECAST, EventKind.SHOCK]
    fc, shock = events
    assert fc.group == "layer" and fc.channel == "particle"
    assert fc.predicted_step == pytest.approx(100, rel=0.02) and fc.strength > 5
    # the units most involved straddle x0 = 0, the middle of the 256 particles
    assert len(fc.units) == 4 and all(abs(u - 127.5) < 8 for u in fc.units)
    assert shock.step >= fc.step and tracker.poll() == []  # poll drains


# ---------------------------------------------------------------------------------------------------- viscous
def _sine(x: torch.Tensor) -> torch.Tensor:
    return -torch.sin(x)


def advect(nu: float, n: int, steps: int, diffusion: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Particles carried by the exact Hopf-Cole field of u0 = -sin x (RK4; Euler-Maruyama when diffusing)."""
    g = torch.Generator().manual_seed(seed)

    def field(x: torch.Tensor, t: float) -> torch.Tensor:
        return _sine(x) if t <= 0 else hopf_cole(x, t, nu, _sine, torch.cos, u_max=1.0)[0]

    x = torch.linspace(-math.pi, math.pi, n, dtype=torch.float64)
    out = [x]
    for k in range(steps):
        t = k * DT
        if diffusion:
            x = (
                x
                + DT * field(x, t)
                + math.sqrt(2 * diffusion * DT) * torch.randn(n, generator=g, dtype=x.dtype)
            )
        else:
            k1 = field(x, t)
            k2 = field(x + 0.5 * DT * k1, t + 0.5 * DT)
            k3 = field(x + 0.5 * DT * k2, t + 0.5 * DT)
            k4 = field(x + DT * k3, t + DT)
            x = x + DT / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(x)
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("nu", [0.05, 0.01])
def test_tracker_viscous_shock_timing(nu):
    """Formation time t_f: the exact gradient at the shock reaches half the steady slope -U^2/(4 nu)."""
    t_f = formation_time(_sine, nu, -1.0 / (4 * nu), potential=torch.cos, tol=1e-4)
    paths = advect(nu, 1024, int(1.6 * t_f / DT)).float()
    tracker = BurgersTracker(horizon=200)
    for k in range(paths.shape[0]):
        tracker.update(k, {"layer": paths[k]})
    events = tracker.poll()
    s = first(events, EventKind.SHOCK)
    assert s is not None and abs(s * DT / t_f - 1) <= 0.15, (s, t_f, events)
    f = first(events, EventKind.FORECAST)
    assert f is not None and f < s
    # no diffusion: the viscosity estimate is (near) zero, measured in units of the particles' own spread
    assert float(tracker.summary()["viscosity/layer"]) < 1e-8


@pytest.mark.slow
@pytest.mark.parametrize("start", [1.2, 1.5])
def test_tracker_reports_a_formed_shock_once_without_a_forecast(start):
    """A monitor attached after the viscous shock formed (nu = 0.01) sees no crossing to forecast, only the
    formed shock: pairs inside the viscous width while the collective compression sits at its plateau. It
    fires one ``shock`` (its own step as predicted step), and in-shock holds while the shock lasts: not one
    event per disarm-and-cooldown cycle (n_off + cooldown = 25 updates) over the ~140 updates that follow."""
    nu = 0.01
    t_f = formation_time(_sine, nu, -1.0 / (4 * nu), potential=torch.cos, tol=1e-4)
    paths = advect(nu, 1024, int(2.5 * t_f / DT)).float()
    k0 = int(start * t_f / DT)
    tracker = BurgersTracker(horizon=200)
    for k in range(k0, paths.shape[0]):
        tracker.update(k, {"layer": paths[k]})
    events = tracker.poll()
    assert [e.kind for e in events] == [EventKind.SHOCK], events
    (s,) = events
    # a full window (16 updates), then the forecast history the plateau is judged on
    assert k0 + tracker.window <= s.step <= k0 + 3 * tracker.window
    assert s.predicted_step == s.step and len(s.units) > 0
    assert float(tracker.summary()["state/layer"]) == 2.0  # still in-shock at the end: the shock is there


@pytest.mark.slow
@pytest.mark.parametrize(("nu", "diffusion"), [(0.05, 0.05), (0.01, 0.01), (0.05, 0.005)])
def test_tracker_viscosity_estimate_from_brownian_particles(nu, diffusion):
    """Particles of the viscous flow plus Brownian motion of diffusion coefficient D: nu_hat within 2x of D.

    In learning-rate time with lr = DT the tracker's time is the flow's, so nu_hat is in the same units as D.
    """
    paths = advect(nu, 1024, 120, diffusion=diffusion, seed=SEEDS[0])
    tracker = BurgersTracker(time="lr")
    ratios = []
    for k in range(paths.shape[0]):
        tracker.update(k, {"layer": paths[k]}, lr=DT)
        if k >= 40:
            ratios.append(float(tracker.summary()["viscosity/layer"]) / diffusion)
    assert all(0.5 <= r <= 2.0 for r in ratios), (min(ratios), max(ratios))


# ----------------------------------------------------------------------------------------------------
# trajectory
@pytest.mark.parametrize("noise", [0.0, 1e-4], ids=["exact", "noisy"])
@pytest.mark.parametrize("s0", [-0.01, -0.005])
def test_tracker_trajectory_riccati_forecast_and_consistency(s0, noise):
    """q(t) with s = <v, dv/dt>/|v|^2 = s0/(1 + s0 t) exactly (speed decaying linearly), plus noise."""
    t_star = -1.0 / s0
    P, v0 = 8, 0.05
    for seed in SEEDS if noise else SEEDS[:1]:
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(P, generator=g, dtype=torch.float64)
        e /= e.norm()
        q0 = torch.randn(P, generator=g, dtype=torch.float64)
        tracker = BurgersTracker(horizon=400, trajectory_alerts=True)
        quiet = BurgersTracker(horizon=400)  # the default: computed and logged, not alerted on
        for k in range(int(1.05 * t_star)):
            t = float(k)
            q = q0 + e * v0 * (t + s0 * t * t / 2) + noise * torch.randn(P, generator=g, dtype=torch.float64)
            tracker.update(k, {}, trajectory=q)
            quiet.update(k, {}, trajectory=q)
            if t_star / 2 <= k <= 0.9 * t_star:
                fc = float(tracker.forecast()["trajectory"])
                slope = float(tracker.summary()["burgers_consistency"])
                assert abs(fc / t_star - 1) <= 0.05, (seed, k, fc)
                assert abs(slope - 1) <= 0.1, (seed, k, slope)
        events = tracker.poll()
        assert first(events, EventKind.FORECAST) is not None
        assert all(e.group == "trajectory" and e.channel == "trajectory" for e in events)
        assert quiet.poll() == [] and float(quiet.forecast()["trajectory"]) == float(tracker.forecast()["trajectory"])


def test_tracker_trajectory_stationary_contraction_is_not_burgers():
    """Exponential approach q = e^{-t/50}: s = -1/50 constant, slope of 1/s is 0; no forecast."""
    tracker = BurgersTracker(horizon=400)
    for k in range(300):
        tracker.update(k, {}, trajectory=torch.full((4,), math.exp(-k / 50), dtype=torch.float64))
    assert abs(float(tracker.summary()["burgers_consistency"])) < 0.1
    assert tracker.poll() == [] and math.isinf(float(tracker.forecast()["trajectory"]))


# ---------------------------------------------------------------------------------------------------- API
def test_tracker_summary_keys_and_values():
    u0, (lo, hi) = INITIAL["sine"]
    tracker = BurgersTracker()
    g = torch.Generator().manual_seed(0)
    xs = list(inviscid_stream(u0, lo, hi, 128, 1e-3, 0, 60))
    for k, x in enumerate(xs):
        tracker.update(k, {"a": x, "b": torch.randn(32, 3, generator=g)}, trajectory=x[:4])
    s = tracker.summary()
    assert set(s) == {
        "forecast/a", "forecast/b", "forecast/trajectory",
        "viscosity/a", "viscosity/b",
        "state/a", "state/b", "state/trajectory",
        "growth/a", "growth/b",
        "burgers_consistency", "steps_to_shock", "shock",
    }  # fmt: skip
    # the characteristics move at constant speed: the step length neither grows nor shrinks much
    assert abs(float(s["growth/a"])) < 0.05 and math.isfinite(float(s["growth/b"]))
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in s.values())
    assert float(s["forecast/a"]) == pytest.approx(100 - 59, abs=5)
    assert float(s["steps_to_shock"]) == min(float(s[k]) for k in s if k.startswith("forecast/"))
    assert float(s["state/a"]) == 1.0 and float(s["shock"]) == 0.0
    f = tracker.forecast()
    assert set(f) == {"a", "b", "trajectory"} and float(f["a"]) == pytest.approx(100, abs=5)
    assert math.isinf(float(f["b"]))


def test_tracker_core_imports_without_lightning_or_plotting():
    code = (
        "import sys, shockmon\n"
        "from shockmon import BurgersTracker, burgers\n"
        "import shockmon.tracker\n"
        "banned = ('lightning', 'pytorch_lightning', 'tensorboard', 'matplotlib')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in banned]\n"
        "assert not bad, bad\n"
        "assert BurgersTracker is shockmon.tracker.BurgersTracker and burgers.hopf_cole\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tracker_before_any_update():
    tracker = BurgersTracker()
    assert tracker.poll() == []
    assert math.isinf(float(tracker.forecast()["trajectory"]))
    assert float(tracker.summary()["shock"]) == 0.0


def test_tracker_learning_rate_time_converts_forecasts_to_steps():
    """Same flow, time = sum(lr): with lr = 0.5 per step, forecasts in steps are unchanged."""
    u0, (lo, hi) = INITIAL["sine"]
    a, b = BurgersTracker(), BurgersTracker(time="lr")
    for k, x in enumerate(inviscid_stream(u0, lo, hi, 256, 0.0, 0, 60)):
        a.update(k, {"layer": x})
        b.update(k, {"layer": x}, lr=torch.tensor(0.5) if k % 2 else 0.5)
    assert float(b.forecast()["layer"]) == pytest.approx(float(a.forecast()["layer"]), rel=1e-4)
    # the viscosity is per unit of learning-rate time: twice the per-step one here
    assert float(b.summary()["viscosity/layer"]) == pytest.approx(
        2 * float(a.summary()["viscosity/layer"]), abs=1e-9
    )


def test_tracker_groups_of_several_shapes_dtypes_and_dimensions():
    """Groups are independent: a compressive 1-D group, a 2-D one, an 8-D noise cloud, in one tracker."""
    u0, (lo, hi) = INITIAL["sine"]
    g = torch.Generator().manual_seed(3)
    x2 = torch.rand(400, 2, generator=g, dtype=torch.float64) * 2 * math.pi - math.pi
    tracker = BurgersTracker()
    for k, x in enumerate(inviscid_stream(u0, lo, hi, 256, 0.0, 0, 110)):
        shifted = x2.clone()
        shifted[:, 0] = x2[:, 0] - DT * k * torch.sin(x2[:, 0])
        noise8 = torch.randn(64, 8, generator=g)
        tracker.update(k, {"one": x, "two": shifted, "cloud": noise8})
    events = tracker.poll()
    assert {e.group for e in events} == {"one", "two"}
    assert float(tracker.forecast()["two"]) == pytest.approx(100, rel=0.1)
    assert tracker._buckets[[b.names for b in tracker._buckets].index(["two"])].dtype == torch.float64


def test_tracker_large_group_is_subsampled_with_original_unit_indices():
    u0, (lo, hi) = INITIAL["sine"]
    tracker = BurgersTracker(max_particles=512, units=4)
    for k, x in enumerate(inviscid_stream(u0, lo, hi, 4096, 0.0, 0, 110)):
        tracker.update(k, {"wide": x})
    fc = [e for e in tracker.poll() if e.kind is EventKind.FORECAST]
    assert fc and abs(fc[0].predicted_step - 100) <= 3
    assert all(abs(u - 2047.5) < 100 for u in fc[0].units)  # indices among the 4096, near x0 = 0
    assert tracker._buckets[0].pos.shape == (16, 1, 512, 1)  # state is O(window x max_particles)


def test_tracker_state_is_fixed_size():
    u0, (lo, hi) = INITIAL["sine"]
    tracker = BurgersTracker()
    sizes = []
    for k, x in enumerate(inviscid_stream(u0, lo, hi, 64, 1e-3, 0, 400)):
        tracker.update(k, {"layer": x}, trajectory=x[:3])
        if k in (50, 399):
            sd = tracker.state_dict()
            tensors = [v for v in sd["g"].values()] + [
                t for b in sd["buckets"] for t in b.values() if torch.is_tensor(t)
            ]
            tensors += [v for v in sd["traj"].values() if torch.is_tensor(v)]
            sizes.append(sum(t.numel() for t in tensors))
    assert sizes[0] == sizes[1]


def test_tracker_poll_overflow_warns_with_count():
    tracker = BurgersTracker(capacity=4)
    for k in range(6):  # every update of a group with NaNs alternating: one divergence event per rising edge
        bad = torch.full((16,), math.nan) if k % 2 == 0 else torch.randn(16)
        tracker.update(k, {f"g{i}": bad for i in range(3)})
    with pytest.warns(UserWarning, match="dropped 5 events"):
        events = tracker.poll()
    assert len(events) == 4 and all(e.kind is EventKind.DIVERGENCE for e in events)
    assert [e.step for e in events] == sorted(e.step for e in events)


# ----------------------------------------------------------------------------------------------------
# persistence
def _mixed_inputs(n_steps: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    u0, (lo, hi) = INITIAL["sine"]
    g = torch.Generator().manual_seed(SEEDS[0])
    out = []
    for k, x in enumerate(inviscid_stream(u0, lo, hi, 256, 1e-3, SEEDS[1], n_steps)):
        y = torch.stack([x, 0.3 * torch.cos(x)], 1) + 1e-3 * torch.randn(256, 2, generator=g)
        t = float(k)
        q = torch.tensor([1.0, 2.0]) * 0.05 * (t - 0.005 * t * t)
        out.append(({"a": x, "b": y}, q))
    return out


@pytest.mark.parametrize("how", ["state_dict", "pickle"])
def test_tracker_resume_mid_stream_gives_identical_events(how):
    inputs = _mixed_inputs(130)
    ref = BurgersTracker()
    for k, (groups, q) in enumerate(inputs[:60]):
        ref.update(k, groups, trajectory=q)
    if how == "state_dict":
        saved = copy.deepcopy(ref.state_dict())
        assert isinstance(saved["version"], int)
        resumed = BurgersTracker()
        resumed.load_state_dict(saved)
    else:
        resumed = pickle.loads(pickle.dumps(ref))
    for k, (groups, q) in enumerate(inputs[60:], start=60):
        ref.update(k, groups, trajectory=q)
        resumed.update(k, groups, trajectory=q)
    a, b = ref.poll(), resumed.poll()
    assert a == b and any(e.kind is EventKind.SHOCK for e in a)
    for k in ref.summary():
        x, y = ref.summary()[k], resumed.summary()[k]
        assert torch.equal(x, y) or (x.isnan() and y.isnan()), k


def test_tracker_load_state_dict_rejects_other_versions():
    sd = BurgersTracker().state_dict()
    sd["version"] = 99
    with pytest.raises(ValueError, match="version 1, but got 99"):
        BurgersTracker().load_state_dict(sd)


def test_tracker_load_state_dict_restores_configuration():
    src = BurgersTracker(horizon=50, window=8)
    src.update(0, {"a": torch.randn(10)})
    dst = BurgersTracker()
    dst.load_state_dict(src.state_dict())
    assert dst.horizon == 50 and dst.window == 8


def test_tracker_load_state_dict_current_settings_keeps_thresholds_and_the_saved_layout():
    inputs = _mixed_inputs(90)
    src = BurgersTracker(horizon=50, window=12)
    for k, (groups, q) in enumerate(inputs[:60]):
        src.update(k, groups, trajectory=q)
    mine = BurgersTracker(horizon=80, window=16, alpha=0.01)
    with pytest.warns(UserWarning, match="other settings") as caught:
        mine.load_state_dict(src.state_dict(), settings="current")
    (message,) = [str(w.message) for w in caught]
    assert "horizon=80.0 (saved: 50.0)" in message and "alpha=0.01 (saved: 0.001)" in message
    assert "disarm_horizon=160.0 (saved: 100.0)" in message  # resolved from the horizon it goes with
    assert "saved window=12 (yours: 16)" in message and "riccati_window=12 (yours: 16)" in message
    assert (mine.horizon, mine.alpha, mine.window, mine.riccati_window) == (80.0, 0.01, 12, 12)
    for k, (groups, q) in enumerate(inputs[60:], start=60):
        mine.update(k, groups, trajectory=q)
    assert [b["count"] for b in mine.state_dict()["buckets"]] == [90, 90]  # the restored history went on


def test_tracker_load_state_dict_current_settings_unchanged_is_silent_and_identical():
    inputs = _mixed_inputs(130)
    ref = BurgersTracker()
    for k, (groups, q) in enumerate(inputs[:60]):
        ref.update(k, groups, trajectory=q)
    resumed = BurgersTracker()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(copy.deepcopy(ref.state_dict()), settings="current")
    for k, (groups, q) in enumerate(inputs[60:], start=60):
        ref.update(k, groups, trajectory=q)
        resumed.update(k, groups, trajectory=q)
    a = ref.poll()
    assert a == resumed.poll() and a


def test_tracker_state_saved_before_a_setting_existed_resumes_as_it_was_made():
    src = BurgersTracker()
    src.update(0, {"a": torch.randn(10, 3)})
    old = src.state_dict()
    old["config"] = {k: v for k, v in old["config"].items() if k not in ("coherence", "collective")}
    dst = BurgersTracker()
    with pytest.warns(UserWarning, match=r"`collective`, `coherence` existed: resuming with collective=0.0, "):
        dst.load_state_dict(old)
    assert (dst.coherence, dst.collective, dst.horizon) == (0.0, 0.0, 200.0)
    with warnings.catch_warnings():  # a tracker's own settings apply: nothing to say about the missing ones
        warnings.simplefilter("error")
        BurgersTracker().load_state_dict(old, settings="current")


def test_tracker_load_state_dict_rejects_unknown_settings():
    sd = BurgersTracker().state_dict()
    sd["config"]["warp_drive"] = 1
    with pytest.raises(ValueError, match=r"does not know: \['warp_drive'\]"):
        BurgersTracker().load_state_dict(sd)
    with pytest.raises(ValueError, match="`settings` to be one of \\('saved', 'current'\\), but got 'mine'"):
        BurgersTracker().load_state_dict(BurgersTracker().state_dict(), settings="mine")


def test_tracker_reset_forgets_everything():
    tracker = BurgersTracker()
    for k, x in enumerate(inviscid_stream(*INITIAL["sine"][:1], -3.0, 3.0, 64, 0.0, 0, 40)):
        tracker.update(k, {"a": x})
    tracker.reset()
    assert tracker.poll() == [] and list(tracker.forecast()) == ["trajectory"]
    tracker.update(0, {"a": torch.randn(64)})  # steps start over


# ---------------------------------------------------------------------------------------------------- no host
# sync
def _forbid_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation in the per-step path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)


def test_tracker_update_does_not_sync(monkeypatch):
    inputs = _mixed_inputs(40)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(48, 8, generator=g)
    tracker = BurgersTracker(time="lr", max_particles=32)
    tracker.update(0, *inputs[0], lr=0.1)  # a first update outside the patch: still nothing may sync after it
    _forbid_sync(monkeypatch)
    for k, (groups, q) in enumerate(inputs[1:], start=1):
        groups = dict(groups, wide=big + 0.01 * k)
        if k == 20:
            groups["a"] = groups["a"].clone()
            groups["a"][3] = math.nan
            q = q.clone()
            q[0] = math.inf
        lr = torch.tensor(0.1) if k % 2 else 0.1
        tracker.update(k, groups, trajectory=q, lr=lr)
        tracker.forecast()
        tracker.summary()
    monkeypatch.undo()
    kinds = {(e.group, e.kind) for e in tracker.poll()}
    assert ("a", EventKind.DIVERGENCE) in kinds and ("trajectory", EventKind.DIVERGENCE) in kinds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tracker_update_does_not_sync_on_cuda():
    # the inputs go to the GPU first: a blocking host->device copy of them would itself be the sync
    inputs = [({n: v.cuda() for n, v in groups.items()}, q.cuda()) for groups, q in _mixed_inputs(40)]
    tracker = BurgersTracker()
    for k, (groups, q) in enumerate(inputs[:20]):  # the first windows build their (cached) designs
        tracker.update(k, groups, trajectory=q)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k, (groups, q) in enumerate(inputs[20:], start=20):
            tracker.update(k, groups, trajectory=q)
            tracker.summary()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tracker.poll()


@pytest.mark.parametrize("D", [1, 2, 3, 4])
def test_tracker_closed_form_small_linear_algebra_matches_lapack(D):
    from shockmon._particles import _small_inv, _sym_min_eig

    g = torch.Generator().manual_seed(D)
    A = torch.randn(500, D, D, generator=g, dtype=torch.float64)
    S = A + A.transpose(-1, -2)
    lam, e = _sym_min_eig(S)
    assert torch.allclose(lam, torch.linalg.eigvalsh(S)[:, 0], atol=1e-10)
    assert torch.allclose((S @ e[..., None])[..., 0], lam[:, None] * e, atol=1e-9)
    P = A @ A.transpose(-1, -2) + 0.1 * torch.eye(D, dtype=torch.float64)
    assert torch.allclose(_small_inv(P), torch.linalg.inv(P), atol=1e-8)
    # a non-finite or singular matrix in the batch is not an exception deep inside torch: nan/inf for that one
    S[3], P[4] = math.nan, 0.0
    lam2, _ = _sym_min_eig(S)
    assert torch.isnan(lam2[3]) and torch.allclose(lam2[:3], lam[:3], atol=1e-10)
    assert not torch.isfinite(_small_inv(P)[4]).all() and torch.isfinite(_small_inv(P)[:4]).all()


def test_tracker_doctests():
    import doctest

    import shockmon._alerts
    import shockmon._particles
    import shockmon._trajectory
    import shockmon.tracker

    for mod in (shockmon.tracker, shockmon._particles, shockmon._trajectory, shockmon._alerts):
        assert doctest.testmod(mod).failed == 0, mod.__name__
    assert doctest.testmod(shockmon.tracker).attempted >= 5  # the seeded stream and where its shock is caught


# ----------------------------------------------------------------------------------------------------
# lessons from real training runs (benchmarks/detection)
def test_tracker_planar_fold_is_forecast_ballistic_gas_is_not():
    """A planar shock in 2-D (a fold along x, the y offsets static) is forecast; a ballistic 8-D gas (pairs,
    independent straight lines) is not."""
    g = torch.Generator().manual_seed(0)
    n = 256
    x0 = (torch.rand(n, generator=g) * 2 - 1) * math.pi
    y0 = torch.rand(n, generator=g)
    planar = BurgersTracker(horizon=200)
    x8 = torch.randn(n, 8, generator=g)
    v8 = 0.01 * torch.randn(n, 8, generator=g)
    gas = BurgersTracker(horizon=200)
    # the same fold in 9-D (pairs): 8 static coordinates set the units apart, as a rescaling layer's directions
    # do; the pairs pass each other there, and still measure the fold along x. Neighbours lie in all 9
    # directions, so the fold shows in their mean strain only as lambda / 9: the coherence test (on by default)
    # does not see it -- its documented price -- and it is off here
    offsets = 0.3 * torch.randn(64, 8, generator=g)
    x9 = (torch.rand(64, generator=g) * 2 - 1) * math.pi
    fold9 = BurgersTracker(horizon=200, coherence=0.0)
    for step in range(121):
        xy = torch.stack([x0 - 0.01 * step * torch.sin(x0), y0], 1)  # crossing at step 100, along x only
        planar.update(step, {"sheet": xy + 1e-4 * torch.randn(n, 2, generator=g)})
        gas.update(step, {"gas": x8 + step * v8 + 1e-4 * torch.randn(n, 8, generator=g)})
        u9 = torch.cat([(x9 - 0.01 * step * torch.sin(x9))[:, None], offsets], 1)
        fold9.update(step, {"units": u9 + 1e-4 * torch.randn(64, 9, generator=g)})
    for tracker in (planar, fold9):
        f = first(tracker.poll(), EventKind.FORECAST)
        assert f is not None and f < 100
    assert gas.poll() == []


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tracker_units_drifting_past_one_another_are_no_shock(seed):
    """500 units on a circle (in 9-D), each drifting at its own constant speed, as units with different hidden
    balancedness do in a lazily trained layer: neighbours keep overtaking one another, with steady closing times,
    but no neighbourhood compresses. Without the coherence test the tracker forecast 3-6 shocks per run here
    (and fired on the detection benchmark's lazy-condensation control); with it, none."""
    g = torch.Generator().manual_seed(seed)
    n = 500
    th0 = torch.rand(n, generator=g) * 2 * math.pi
    om = 0.001 * torch.randn(n, generator=g)
    off = 0.02 * torch.randn(n, 7, generator=g)
    default, without = BurgersTracker(horizon=200), BurgersTracker(horizon=200, coherence=0.0)
    for step in range(400):
        th = th0 + step * om
        x = torch.cat([torch.stack([th.cos(), th.sin()], 1), off], 1) + 1e-5 * torch.randn(n, 9, generator=g)
        default.update(step, {"units": x})
        without.update(step, {"units": x})
    assert default.poll() == []
    assert first(without.poll(), EventKind.FORECAST) is not None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tracker_focusing_cluster_in_9d_is_forecast_with_coherence(seed):
    """A third of a 9-D cloud focusing onto a point at step 150 (every pair of it closing along its separation:
    a coherent compression) is forecast early and on time, and its shock found, with the defaults."""
    g = torch.Generator().manual_seed(seed)
    n, m, t_star = 256, 96, 150
    x0 = torch.randn(n, 9, generator=g)
    c = torch.randn(9, generator=g)
    x0[:m] = c + 0.5 * torch.randn(m, 9, generator=g)
    tracker = BurgersTracker(horizon=200)
    for step in range(170):
        x = x0.clone()
        x[:m] = c + (x0[:m] - c) * (1 - step / t_star)
        tracker.update(step, {"units": x + 1e-4 * torch.randn(n, 9, generator=g)})
    events = tracker.poll()
    fc = [e for e in events if e.kind is EventKind.FORECAST]
    sh = [e for e in events if e.kind is EventKind.SHOCK]
    assert fc and fc[0].step <= t_star / 2 and abs(fc[0].predicted_step - t_star) <= 0.05 * t_star
    assert sh and abs(sh[0].step - t_star) <= 0.03 * t_star


def test_tracker_in_shock_disarms_when_no_consistent_forecast_remains():
    """In-shock ends like imminent (no consistent forecast for n_off updates), whatever compression remains."""
    from shockmon import _alerts as al

    G = 1
    st = {k: torch.zeros(G, dtype=torch.long) for k in ("state", "on", "off", "shk", "cool")}
    st["div"] = torch.zeros(G, dtype=torch.bool)
    cfg = dict(h_on=200.0, h_off=400.0, n_on=3, n_off=5, n_shock=1, cooldown=20)
    upd, no = torch.ones(G, dtype=torch.bool), torch.zeros(G, dtype=torch.bool)
    states = []
    for k in range(20):
        steps_to = torch.tensor([50.0 - k]) if k < 8 else torch.tensor([math.inf])
        shock = torch.tensor([k == 6])
        al.step_machine(st, upd, True, steps_to, shock, no, cfg)
        states.append(int(st["state"]))
    assert states[:7] == [0, 0, al.IMMINENT, al.IMMINENT, al.IMMINENT, al.IMMINENT, al.IN_SHOCK]
    assert states[7:12] == [al.IN_SHOCK] * 5 and states[12] == al.PRE and int(st["cool"]) > 0
    # a forecast already in the past does not arm
    st2 = {k: torch.zeros(G, dtype=torch.long) for k in ("state", "on", "off", "shk", "cool")}
    st2["div"] = torch.zeros(G, dtype=torch.bool)
    for _ in range(5):
        al.step_machine(st2, upd, True, torch.tensor([-3.0]), no, no, cfg)
    assert int(st2["state"]) == al.PRE


def test_tracker_collective_gate_ignores_a_few_crossing_units():
    """An interval of 16 units of 200 compressing to a point is not a shock worth an alert: its edges mix with
    static neighbours, fewer than the default ``collective=0.05`` (10 units) are significantly due within the
    horizon; with the gate off it is forecast; a fifth of the units compressing passes the gate."""
    g = torch.Generator().manual_seed(3)

    def forecast_of(movers: int, n: int = 200, **kw) -> int | None:
        x0 = torch.linspace(-1.0, 1.0, n)
        lo = n // 2 - movers // 2
        centre = x0[lo : lo + movers].mean()
        tracker = BurgersTracker(horizon=200, **kw)
        for step in range(130):
            x = x0.clone()  # an interval of `movers` units compresses onto its centre, reached at step 100
            x[lo : lo + movers] = x0[lo : lo + movers] + (centre - x0[lo : lo + movers]) * min(step / 100.0, 1.0)
            tracker.update(step, {"layer": x + 1e-4 * torch.randn(n, generator=g)})
        return first(tracker.poll(), EventKind.FORECAST)

    assert forecast_of(16) is None
    ungated = forecast_of(16, collective=0.0)
    assert ungated is not None and ungated < 100  # ahead of the crossing
    collective = forecast_of(40)
    assert collective is not None and collective < 100
    with pytest.raises(ValueError, match="collective"):
        BurgersTracker(collective=1.5)


def test_tracker_drop_frees_a_group_and_a_dropped_name_starts_afresh():
    g = torch.Generator().manual_seed(0)
    tracker = BurgersTracker()
    for step in range(20):
        tracker.update(step, {"a": torch.randn(16, 3, generator=g), "b": torch.randn(32, generator=g)})
    before = tracker.state_dict()
    tracker.drop("b")
    after = tracker.state_dict()
    assert tracker.groups == ["a"] and after["retired"] == ["b"]
    assert len(after["buckets"]) == len(before["buckets"]) - 1  # its particle history is gone
    assert not any(k.endswith("/b") for k in tracker.summary()) and "b" not in tracker.forecast()
    with pytest.raises(ValueError, match=r"\['zz'\] in `names`"):
        tracker.drop(["zz"])
    # a round trip keeps it dropped; fed again, it is tracked from scratch
    restored = BurgersTracker()
    restored.load_state_dict(after)
    assert restored.groups == ["a"]
    restored.update(20, {"a": torch.randn(16, 3, generator=g), "b": torch.randn(32, generator=g)})
    assert restored.groups == ["a", "b"] and "forecast/b" in restored.summary()


def test_tracker_device_index_cache_keeps_bools_and_ints_apart():
    # (True, False) == (1, 0) in Python: a cache keyed by the values alone would hand a bool mask to an index
    tracker = BurgersTracker()
    tracker.update(0, {"a": torch.randn(8)})
    mask = tracker._device_index((True, False), torch.bool)
    idx = tracker._device_index((1, 0), torch.long)
    assert mask.dtype == torch.bool and idx.dtype == torch.long and idx.tolist() == [1, 0]
    assert tracker._device_index((1, 0), torch.long) is idx  # cached


def test_tracker_groups_updated_on_different_steps_keep_separate_histories():
    """A group fed every other step has its own forecast-history slots (written through cached device indices):
    the same stream gives the same forecasts whether or not another group comes and goes beside it."""
    inputs = _mixed_inputs(80)
    alone, beside = BurgersTracker(), BurgersTracker()
    g = torch.Generator().manual_seed(3)
    for k, (groups, _) in enumerate(inputs):
        alone.update(k, {"a": groups["a"]})
        extra = {"z": torch.randn(32, 2, generator=g)} if k % 2 else {}
        beside.update(k, {"a": groups["a"], **extra})
        torch.testing.assert_close(beside.forecast()["a"], alone.forecast()["a"])
    torch.testing.assert_close(beside.state_dict()["g"]["hist_T"][1], alone.state_dict()["g"]["hist_T"][1])


def _pairs_reference(r2, dot, dt, sd_v, sd_m, nu, z):  # type: ignore[no-untyped-def]
    """The pairs method's rates and collapse test written plainly: the most compressive pair by min-with-indices,
    the three conditions as comparisons (the tracker computes both with float ops)."""
    inv_r = torch.rsqrt(r2.clamp_min(torch.finfo(r2.dtype).tiny))
    zp = dot * inv_r
    m = torch.min(zp, dim=0)
    ir = inv_r.gather(0, m.indices[None])[0]
    k = z * math.sqrt(2.0)
    closing = zp < (-k * sd_v)[None, :, None]
    proj = (r2 + dt.to(r2.dtype) * dot) * inv_r
    crossed = proj < (-k * sd_m)[None, :, None]
    viscous = proj.abs() * zp > (-2.0 * nu)[None, :, None]
    hit = (closing & (crossed | viscous)).any(0).any(1)
    return m.values * ir, math.sqrt(2.0) * sd_v[:, None] * ir, hit


@pytest.mark.parametrize("float_ops", [True, False], ids=["cpu-float-ops", "accelerator-comparisons"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairs_rates_and_collapse_match_their_plain_definitions(dtype, float_ops, monkeypatch):
    from shockmon import _particles as pt

    monkeypatch.setattr(pt, "_float_ops", lambda t: float_ops)  # CPU writes them with float ops, else plainly
    g = torch.Generator().manual_seed(7)
    for trial in range(300):
        K, B, n = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (9, 5, 40))
        r2 = torch.rand(K, B, n, generator=g, dtype=dtype) * 10.0 ** float(torch.randint(-6, 4, (1,), generator=g))
        dot = torch.randn(K, B, n, generator=g, dtype=dtype) * 10.0 ** float(torch.randint(-6, 2, (1,), generator=g))
        if trial % 5 == 0:  # coincident particles
            r2[torch.rand(r2.shape, generator=g) < 0.1] = 0.0
        if trial % 7 == 0:
            dot[torch.rand(dot.shape, generator=g) < 0.05] = math.nan
        if trial % 11 == 0:  # particles at rest relative to a neighbour
            dot[torch.rand(dot.shape, generator=g) < 0.2] = 0.0
        if trial % 13 == 0:  # every neighbour the same: ties
            r2[:], dot[:] = r2[:1].clone(), dot[:1].clone()
        sd_v, sd_m = 0.01 * torch.rand(B, generator=g, dtype=dtype), 0.01 * torch.rand(B, generator=g, dtype=dtype)
        nu = 1e-3 * (trial % 2) * torch.rand(B, generator=g, dtype=dtype)
        if trial % 17 == 0:
            sd_m[0] = math.nan
        if trial % 19 == 0:
            nu[0] = math.nan
        dt = torch.tensor(5.0 * float(torch.rand(1, generator=g)), dtype=torch.float64)
        lam, se, hit = pt.pairs_rates_and_collapse(r2, dot, dt, sd_v, sd_m, nu, 3.0)
        lam_ref, se_ref, hit_ref = _pairs_reference(r2, dot, dt, sd_v, sd_m, nu, 3.0)
        assert torch.equal(hit, hit_ref), trial
        assert torch.equal(lam.isnan(), lam_ref.isnan()), trial
        ok = ~lam.isnan()
        assert torch.equal(lam[ok], lam_ref[ok]), trial
        # the standard error may come from another of exactly tied pairs only where the rate is 0 (never significant)
        same_se = (se == se_ref) | lam.isnan() | (lam == 0)
        assert bool(same_se.all()), trial
        assert torch.equal(pt.collapse_pairs(r2[0], dot[0], dt, sd_v, sd_m, nu, 3.0), _pairs_reference(
            r2[:1], dot[:1], dt, sd_v, sd_m, nu, 3.0)[2]), trial


def _exact_fit(ring: torch.Tensor, times: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares centre and slope of a ring in float64: the reference for the tracker's float fits."""
    t = torch.tensor(times, dtype=torch.float64)
    dt = t - t.mean()
    x = ring.double() - ring[0].double()  # displacements: no rounding relative to |x|
    return ring[0].double() + x.mean(0), torch.einsum("l,l...->...", dt, x) / (dt * dt).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_window_fit_matches_the_least_squares_fit_of_the_ring(dtype):
    """The window fit advanced by one snapshot per update (O(n D) instead of a read of the ring) is the
    least-squares fit of the ring to within the fit's float resolution, over uneven times (learning-rate time),
    and particles that do not move have velocity 0."""
    from shockmon import _particles as pt

    g = torch.Generator().manual_seed(11)
    L, B, n, D = 8, 3, 40, 4
    x0 = 10.0 * torch.randn(B, n, D, generator=g, dtype=torch.float64)  # far from 0: rounding scales with |x|
    vel = 0.3 * torch.randn(B, n, D, generator=g, dtype=torch.float64)
    vel[0] = 0.0  # a group that does not move
    rates = [0.01 * (1.5 + math.sin(0.7 * k)) for k in range(4 * L)]
    ts = [math.fsum(rates[:k]) for k in range(4 * L)]

    def snap(k: int) -> torch.Tensor:
        x = x0 + vel * ts[k] + 1e-3 * torch.randn(B, n, D, generator=g, dtype=torch.float64) * (
            torch.arange(B) > 0
        )[:, None, None]
        return x.to(dtype)

    ring = torch.stack([snap(k) for k in range(L - 1)] + [torch.zeros(B, n, D, dtype=dtype)])
    times = ts[: L - 1] + [0.0]
    res = 16 * torch.finfo(dtype).eps * 30.0  # the tracker's float resolution of positions (|x| < 30 here)
    for start in (L, 2 * L):  # the newest snapshot written, the sums rebuilt from the ring, then L - 1 advances
        ref = (start - 1) % L
        ring[ref], times[ref] = snap(start - 1), ts[start - 1]
        w, tc, inv_stt, _ = pt.window_fit_weights(times, L, dtype, torch.device("cpu"))
        t0, rel = pt.relative_times(times)
        (xc, v), sums = pt.fit_window_sums(ring, rel, ref, tc - t0, inv_stt)
        for k in range(start, start + L):
            if k > start:  # snapshot k - 1 replaces the oldest
                slot = (k - 1) % L
                x = snap(k - 1)
                pt.advance_fit_sums(sums, x, ring[slot], ring[ref], ts[k - 1] - times[ref], ts[k - 1] - times[slot])
                ring[slot], times[slot] = x, ts[k - 1]
                w, tc, inv_stt, _ = pt.window_fit_weights(times, L, dtype, torch.device("cpu"))
                xc, v = pt.fit_from_sums(sums, ring[ref], L, tc - times[ref], inv_stt)
            xc_exact, v_exact = _exact_fit(ring, times)
            assert xc.dtype == v.dtype == dtype
            assert (xc.double() - xc_exact).abs().max() <= res, k
            # within 2 % of the velocity resolution (the ring's weighted sum, fit_window, is off by ~5 %)
            assert (v.double() - v_exact).abs().max() <= 0.02 * res * math.sqrt(inv_stt), k
            assert not v[0].any(), k  # nothing moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_lists_are_exact_for_a_cloud_far_from_the_origin(dtype):
    """Neighbour lists by squared distances are exact where float32's `|a|^2 + |b|^2 - 2 a.b` (torch.cdist's
    product form) is noise: a cloud 10^4 times farther from the origin than its spacing; and for an ordinary one."""
    from shockmon import _particles as pt

    g = torch.Generator().manual_seed(2)
    for offset, spread in ((0.0, 1.0), (10.0, 1e-3), (-300.0, 1e-1)):
        x = (offset + spread * torch.randn(3, 200, 5, generator=g, dtype=torch.float64)).to(dtype)
        exact = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
        exact.diagonal(dim1=1, dim2=2).fill_(math.inf)
        want = torch.topk(exact, 6, dim=2, largest=False).indices
        assert torch.equal(pt.knn(x, 6).sort(-1).values, want.sort(-1).values), offset
        rows = torch.tensor([3, 50, 199])
        assert torch.equal(pt.knn(x, 6, rows).sort(-1).values, want[:, rows].sort(-1).values), offset
