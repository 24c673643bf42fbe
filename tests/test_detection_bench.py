"""The detection benchmark's pipeline, in ``--quick`` mode (one seed, shortened runs): it checks the plumbing
(recording, replay, baselines, scoring, outputs), not the scores. The scoring rules are checked on hand-made
alerts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.detection import baselines as bl  # noqa: E402
from benchmarks.detection import evidence as ev  # noqa: E402
from benchmarks.detection import scoring as sc  # noqa: E402
from benchmarks.detection.record import Recording  # noqa: E402


@pytest.mark.slow
def test_detection_bench_quick_runs_every_case_and_writes_its_outputs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.detection", "--quick", "--out", str(tmp_path), "--cache",
         str(tmp_path / "cache")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "detection_quick.json").read_text())
    names = [c["name"] for c in doc["cases"]]
    assert {"grok_mlp", "eos_tanh", "catapult", "condensation", "spikes_tanh", "spikes_relu"} <= set(names)
    assert any(c["control"] for c in doc["cases"])
    # replaying the recorded tracker inputs reproduces the live monitor's events exactly
    assert doc["replay_matches_live"] is True
    assert set(doc["results"]) == {"shockmon", *bl.LABEL_FREE, *bl.REFERENCE}
    for det, res in doc["results"].items():
        assert set(res["per_case"]) == set(names)
        if det != "shockmon":
            assert res["threshold"] in bl.GRIDS[det]
    assert len(doc["runs"]) == len(names)
    for run in doc["runs"]:
        assert run["steps"] > 0 and run["cpu_seconds"] > 0
    # the catapult peaks within the quick run, so there is one transition to score
    assert all(len(r["transitions"]) == 1 for r in doc["runs"] if r["case"] == "catapult")
    assert "| shockmon |" in proc.stdout and "| spike |" in proc.stdout
    for name in names:
        png = tmp_path / f"detection_quick_{name}.png"
        assert png.stat().st_size > 5000, name
    assert (tmp_path / "detection_quick.md").read_text().startswith("Detection benchmark")


def test_detection_scoring_windows_late_and_false_alarms():
    run = sc.RunAlerts("c", 3, False, transitions=[100], window=50, steps=300,
                       alerts=[10, 60, 80, 120, 200], predicted=[math.nan, 110.0, 95.0, math.nan, math.nan])
    ctl = sc.RunAlerts("k", 3, True, transitions=[], window=0, steps=5000, alerts=[7])
    s = sc.score([run, ctl])
    assert (s.transitions, s.detected, s.tp, s.late, s.fp, s.control_fp) == (1, 1, 2, 1, 3, 1)
    assert s.leads == [40] and s.errors == [10.0] and s.rel_errors == [0.25]
    assert s.recall == 1.0 and s.precision == pytest.approx(0.4)
    assert s.false_alarms_per_1e4 == pytest.approx(2.0)


def test_detection_threshold_rule_prefers_f1_then_lead_then_conservative():
    def runs(alerts):
        return [sc.RunAlerts("c", 0, False, [100], 50, 300, alerts)]

    cands = {1.0: runs([5, 60]), 2.0: runs([60]), 3.0: runs([90]), 4.0: runs([])}
    assert sc.choose(cands) == 2.0  # F1 1 at 2 and 3; the longer lead wins
    assert sc.choose({1.0: runs([]), 2.0: runs([])}) == 2.0  # nothing detected: the conservative one


def test_detection_baselines_fire_once_per_excursion_on_seeded_streams():
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    loss = np.exp(-steps / 200) + 0.001 * rng.standard_normal(400)
    loss[250:255] *= 20  # one spike
    assert bl.spike(steps, loss, 2.0) == [250]
    assert bl.zscore(steps, loss, 6.0) == [250]
    pnorm = 10 + 0.01 * steps + 0.001 * rng.standard_normal(400)
    pnorm[300:] += 0.05 * (steps[300:] - 300)  # the norm's drift changes at 300
    hits = bl.cusum(steps, pnorm, 8.0)
    assert hits and 300 <= hits[0] <= 305
    hits = bl.page_hinkley(steps, pnorm, 8.0)
    assert hits and 300 <= hits[0] <= 310
    assert bl.spike(steps[:200], loss[:200], 2.0) == [] and bl.cusum(steps[:250], pnorm[:250], 64.0) == []


def _units_recording(x: np.ndarray) -> Recording:
    T = x.shape[0]
    steps = np.arange(1, T + 1)
    z = np.zeros(T)
    return Recording("synthetic", 0, steps, z, z, z, z, np.zeros(0, dtype=int), {}, steps,
                     {"g": x.astype(np.float32)}, None, z, [], {}, 0.0, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_evidence_finds_the_first_reversal_of_the_units_motion(seed):
    """The EoS evidence's measure: straight (even curving) motion has no reversal; a period-2 oscillation growing
    out of float noise, as GD past 2/eta gives, reverses the motion within a few steps of where it outgrows the
    drift, never before it starts."""
    rng = np.random.default_rng(seed)
    T, start = 200, 120
    t = np.arange(T, dtype=np.float64)[:, None, None]
    x0, v = rng.standard_normal((1, 64, 9)), rng.standard_normal((1, 64, 9))
    smooth = x0 + 0.01 * v * t + 1e-5 * v * t**2  # a drift that accelerates: cosines stay near 1
    steps, cos = ev.motion_cosines(_units_recording(smooth))
    assert ev.first_reversal(steps, cos, 16) is None and cos.min() > 0.99
    mode = rng.standard_normal((1, 64, 9))
    amp = np.where(t >= start, 1e-4 * 1.5 ** (t - start), 0.0)  # 0.01 |v| per step of drift; the mode passes it
    osc = smooth + amp * (-1.0) ** t * mode  # after ~9 steps of growth
    steps, cos = ev.motion_cosines(_units_recording(osc))
    first = ev.first_reversal(steps, cos, 16)
    assert first is not None and start < first <= start + 20
    assert ev.first_reversal(steps, cos, first) != first  # strictly after `after`


def test_detection_replay_every_n_steps_is_what_a_live_monitor_observing_that_often_gives():
    """``--every-n-steps K`` replays an every-step recording at stride K: the same inputs and the same events as a
    live ``ShockMonitor(every_n_steps=K)`` on the same run (a condensation run: ~1 s; it has a shock at stride 2)."""
    from benchmarks.detection.cases import all_cases
    from benchmarks.detection.record import replay, run_case

    case = next(c for c in all_cases() if c.name == "condensation")
    every = run_case(case.name, 0, case.build(0, False))
    live = run_case(case.name, 0, case.build(0, False), {"every_n_steps": 2})
    at = every.feed_steps % 2 == 0
    np.testing.assert_array_equal(every.feed_steps[at], live.feed_steps)
    for g, u in every.units.items():
        np.testing.assert_array_equal(u[at], live.units[g])
    assert live.events and replay(every, every_n_steps=2) == live.events
    assert replay(every) == every.events
    with pytest.raises(ValueError, match="every_n_steps"):
        replay(every, every_n_steps=0)
