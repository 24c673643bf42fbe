"""Why shockmon has no alert before the edge of stability, a catapult or a grokking jump: measured on the
recorded runs.

The detection benchmark scores shockmon 0 on ``eos_tanh``, ``eos_relu`` and ``catapult``. Issue 5 asks, where a
transition type is not detectable from quotient observables, for the evidence. This prints it from the cached
recordings (``python -m benchmarks.detection`` makes them; nothing is trained here):

- **Edge of stability.** Full-batch GD is stable along a Hessian direction while ``eta * lambda < 2``: the step's
  component along it shrinks by ``|1 - eta lambda|`` per step and flips sign, so nothing oscillates, grows, or
  reverses until the sharpness passes ``2/eta``. How close the sharpness is to ``2/eta`` is a property of the
  Hessian, which the parameters' motion shows only once it is unstable. Measured: the first step at which the
  units' motion reverses (the cosine between successive displacements of all tracked coordinates,
  ``cos(x_t - x_{t-1}, x_{t-1} - x_{t-2})``, falls below 0 after the tracker's first window), against the case's
  transition (sharpness ``>= 1.9/eta``) and the first measurement ``>= 2/eta``; and the smallest cosine inside
  the warning window (1 means the units moved along straight lines there).
- **Catapult.** The loss rises from the first step and peaks at step 3--8, while the units' step lengths grow by
  ``4-8x``. A forecast needs a full window of ``window`` updates; the instability test fits the last
  ``growth_window`` step lengths against the ``2 * growth_window`` before them, so it needs ``3 * growth_window``
  updates, and a settled history (a run-away from the first step never stands out of its own history): both
  with the tracker's defaults, printed beside the transition steps.
- **Grokking** (what the quotient does show). The particle view sees no coherent compression of units (README);
  the trajectory view's Riccati blow-ups (alerted on only with ``trajectory_alerts=True``, off by default) are
  printed beside the jump and the warning window, with those on the control runs, and so is the step at which the
  raw parameter norm peaks (weight decay starts to shrink the network): the turn a Page--Hinkley test on that
  norm catches.

Run: ``python -m benchmarks.detection.evidence`` (``--cache`` a recordings directory, ``--seeds``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.detection.__main__ import CACHE, _cache_path
from benchmarks.detection.cases import all_cases
from benchmarks.detection.record import Recording, replay


def displacements(rec: Recording) -> np.ndarray:
    """The units' displacement between successive tracker updates, ``(T - 1, every tracked coordinate of every
    group)``."""
    x = np.concatenate([u.reshape(u.shape[0], -1) for u in rec.units.values()], 1).astype(np.float64)
    return np.diff(x, axis=0)


def motion_cosines(rec: Recording) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, cos)``: the cosine between the units' successive displacements, at each feed step from the
    third on."""
    d = displacements(rec)
    num = (d[1:] * d[:-1]).sum(1)
    den = np.sqrt((d[1:] * d[1:]).sum(1) * (d[:-1] * d[:-1]).sum(1))
    cos = np.divide(num, den, out=np.ones_like(num), where=den > 0)  # a unit that did not move: no reversal
    return np.asarray(rec.feed_steps[2:]), cos


def first_reversal(steps: np.ndarray, cos: np.ndarray, after: int) -> int | None:
    """The first step after ``after`` at which the motion reverses (``cos < 0``); ``None`` when it never does."""
    hit = np.nonzero((steps > after) & (cos < 0))[0]
    return None if hit.size == 0 else int(steps[hit[0]])


def eos_row(rec: Recording, transition: int | None, window: int, after: int) -> dict[str, Any]:
    eta = float(rec.config["eta"])
    sharp = np.asarray(rec.evals["sharpness"])
    at_2 = np.nonzero(sharp >= 2.0 / eta)[0]
    steps, cos = motion_cosines(rec)
    inside = (steps >= transition - window) & (steps <= transition) if transition is not None else None
    return {
        "transition": transition,
        "sharpness_2_over_eta": int(rec.eval_steps[at_2[0]]) if at_2.size else None,
        "first_reversal": first_reversal(steps, cos, after),
        "min_cos_in_window": float(cos[inside].min()) if inside is not None and inside.any() else math.nan,
    }


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.detection.evidence", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=CACHE, help="the recordings cache (as for the benchmark)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(6)))
    args = ap.parse_args(argv)
    from shockmon import BurgersTracker

    defaults = BurgersTracker()
    after, need_growth = defaults.window, 3 * defaults.growth_window
    cases = {c.name: c for c in all_cases()}
    out: dict[str, list[dict[str, Any]]] = {}
    names = ("eos_tanh", "eos_relu", "catapult", "grok_mlp", "control_grok_mlp")
    if not any(_cache_path(args.cache, c, s, False).exists() for c in names for s in args.seeds):
        ap.error(f"no recordings of {', '.join(names)} for seeds {args.seeds} under {args.cache}: "
                 f"`python -m benchmarks.detection --cached --cases {' '.join(names)}` makes them")

    def load(case: str, seed: int) -> Recording | None:
        path = _cache_path(args.cache, case, seed, False)
        return Recording.load(path) if path.exists() else None

    for name in ("eos_tanh", "eos_relu"):
        rows = out[name] = []
        print(f"\n{name}: transition = first sharpness >= 1.9/eta; reversal = first cos(dx_t, dx_t-1) < 0 after "
              f"update {after}; min cos over the {cases[name].window}-step warning window")
        print("| seed | transition | sharpness >= 2/eta | first reversal | reversal - transition | min cos in window |")
        print("| --- | --- | --- | --- | --- | --- |")
        for seed in args.seeds:
            rec = load(name, seed)
            if rec is None:
                continue
            tr = cases[name].transitions(rec)
            row = {"seed": seed, **eos_row(rec, tr[0] if tr else None, cases[name].window, after)}
            rows.append(row)
            gap = (row["first_reversal"] - row["transition"]
                   if row["first_reversal"] is not None and row["transition"] is not None else None)
            print(f"| {seed} | {row['transition']} | {row['sharpness_2_over_eta']} | {row['first_reversal']} | "
                  f"{gap} | {row['min_cos_in_window']:.4f} |")
    rows = out["catapult"] = []
    print(f"\ncatapult: transition = the loss's peak; a forecast needs {after} updates, an instability event "
          f"{need_growth} (tracker defaults)")
    print("| seed | transition | loss growth to the peak | step-length growth to its peak |")
    print("| --- | --- | --- | --- |")
    for seed in args.seeds:
        rec = load("catapult", seed)
        if rec is None:
            continue
        (tr,) = cases["catapult"].transitions(rec)
        sl = np.linalg.norm(displacements(rec), axis=1)
        i = int(np.searchsorted(rec.steps, tr))  # the peak's index in the per-step series
        j = int(np.searchsorted(rec.feed_steps, tr))  # ... and among the tracker's updates
        row = {"seed": seed, "transition": tr, "loss_growth": float(rec.loss[i] / rec.loss[0]),
               "step_growth": float(sl[: j + 1].max() / sl[0]), "forecast_needs": after,
               "instability_needs": need_growth}
        rows.append(row)
        print(f"| {seed} | {tr} | x{row['loss_growth']:.0f} | x{row['step_growth']:.1f} |")
    grok = cases["grok_mlp"]
    print(f"\ngrok_mlp: the jump (test accuracy >= 0.9), its {grok.window}-step warning window, the parameter norm's "
          "peak, and the trajectory view's forecasts with trajectory_alerts=True")
    print("| run | jump | window | parameter norm's peak | trajectory-view forecasts (step -> predicted) |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("grok_mlp", "control_grok_mlp"):
        rows = out[name] = []
        for seed in args.seeds:
            rec = load(name, seed)
            if rec is None:
                continue
            tr = cases[name].transitions(rec)
            fc = [(int(e["step"]), float(e["predicted_step"])) for e in replay(rec, _trajectory_alerts)
                  if e["group"] == "trajectory" and e["kind"] == "forecast"]
            peak = int(rec.steps[int(np.argmax(rec.param_norm))])
            rows.append({"seed": seed, "transition": tr[0] if tr else None, "param_norm_peak": peak,
                         "trajectory_forecasts": fc})
            win = f"{tr[0] - grok.window}-{tr[0]}" if tr else "-"
            shown = ", ".join(f"{a} -> {b:.0f}" for a, b in fc) or "none"
            print(f"| {name} s{seed} | {tr[0] if tr else '-'} | {win} | {peak} | {shown} |")
    return out


def _trajectory_alerts() -> Any:
    from shockmon import ShockMonitor

    return ShockMonitor(print_summary=False, tracker_kwargs={"trajectory_alerts": True})._make_tracker()


if __name__ == "__main__":
    main()
