"""Scoring alerts against transitions, and the one rule that picks each detector's threshold.

For a transition at step ``t`` of a case with warning window ``W``:

- an alert in ``[t - W, t]`` is a **true positive** (a warning of that transition);
- an alert in ``(t, t + W/2]`` is **late**: it reports the transition after the fact, and counts as neither a
  warning nor a false alarm;
- any other alert -- including every alert on a control run -- is a **false positive**.

A transition with no alert in its window is **missed**. Per detector, over a set of runs: recall = detected /
transitions; precision = true positives / (true + false positives), controls included; the lead of a detected
transition is ``t`` minus its first true alert; false alarms per 10^4 steps are counted on the controls; the
*chance precision* is the share of the transition runs' steps that lie in a warning window (what alerts at
random steps would score). For
shockmon, whose alerts carry a forecast step, the forecast error at the first true alert is ``|predicted -
t|`` (reported in steps and as a fraction of that alert's lead).

Threshold rule (:func:`choose`), the same for every detector: on the selection seeds, take the threshold with
the highest F1 = 2PR/(P+R); break ties by the longer median lead, then by the larger (more conservative)
threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunAlerts:
    """A detector's alerts on one run, with what is needed to score them."""

    case: str
    seed: int
    control: bool
    transitions: list[int]
    window: int
    steps: int  # steps in the run
    alerts: list[int]
    predicted: list[float] = field(default_factory=list)  # forecast step per alert (shockmon), else empty


@dataclass
class Score:
    transitions: int = 0
    detected: int = 0
    tp: int = 0
    fp: int = 0
    late: int = 0
    control_fp: int = 0
    control_steps: int = 0
    leads: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # |forecast - t| at the first true alert
    rel_errors: list[float] = field(default_factory=list)  # error / lead
    covered: int = 0  # steps of transition runs inside a warning window
    case_steps: int = 0  # steps of transition runs

    @property
    def recall(self) -> float:
        return self.detected / self.transitions if self.transitions else math.nan

    @property
    def precision(self) -> float:
        n = self.tp + self.fp
        return self.tp / n if n else math.nan

    @property
    def f1(self) -> float:
        r, p = self.recall, self.precision
        if not (r > 0 and p > 0):
            return 0.0
        return 2 * p * r / (p + r)

    @property
    def chance_precision(self) -> float:
        """The precision of alerts at random steps of the transition runs: the share of their steps that lie in
        a warning window (high where transitions are frequent, e.g. repeated loss spikes)."""
        return self.covered / self.case_steps if self.case_steps else math.nan

    @property
    def median_lead(self) -> float:
        return float(np.median(self.leads)) if self.leads else math.nan

    @property
    def false_alarms_per_1e4(self) -> float:
        return 1e4 * self.control_fp / self.control_steps if self.control_steps else math.nan

    @property
    def median_error(self) -> float:
        return float(np.median(self.errors)) if self.errors else math.nan

    @property
    def median_rel_error(self) -> float:
        return float(np.median(self.rel_errors)) if self.rel_errors else math.nan

    def add(self, r: RunAlerts) -> None:
        alerts = sorted(zip(r.alerts, r.predicted or [math.nan] * len(r.alerts)))
        if r.control:
            self.control_steps += r.steps
        else:
            self.case_steps += r.steps
            inside = set()
            for t in r.transitions:
                inside.update(range(max(t - r.window, 1), min(t, r.steps) + 1))
            self.covered += len(inside)
        self.transitions += len(r.transitions)
        used = [False] * len(alerts)
        for t in r.transitions:
            inside = [i for i, (a, _) in enumerate(alerts) if t - r.window <= a <= t]
            for i in inside:
                used[i] = True
            if inside:
                self.detected += 1
                a, pred = alerts[inside[0]]
                lead = t - a
                self.leads.append(lead)
                if math.isfinite(pred):
                    err = abs(pred - t)
                    self.errors.append(err)
                    self.rel_errors.append(err / max(lead, 1))
        for i, (a, _) in enumerate(alerts):
            if used[i]:
                self.tp += 1
            elif any(t < a <= t + r.window / 2 for t in r.transitions):
                self.late += 1
            else:
                self.fp += 1
                if r.control:
                    self.control_fp += 1

    def row(self) -> dict[str, Any]:
        return {
            "transitions": self.transitions,
            "detected": self.detected,
            "recall": self.recall,
            "precision": self.precision,
            "f1": self.f1,
            "tp": self.tp,
            "fp": self.fp,
            "late": self.late,
            "median_lead": self.median_lead,
            "leads": list(self.leads),
            "false_alarms_per_1e4_control_steps": self.false_alarms_per_1e4,
            "control_fp": self.control_fp,
            "control_steps": self.control_steps,
            "median_forecast_error": self.median_error,
            "median_forecast_error_over_lead": self.median_rel_error,
            "chance_precision": self.chance_precision,
        }


def score(runs: list[RunAlerts]) -> Score:
    s = Score()
    for r in runs:
        s.add(r)
    return s


def choose(candidates: dict[float, list[RunAlerts]]) -> float:
    """The threshold by the rule in the module docstring, from ``threshold -> alerts on the selection seeds``."""

    def key(th: float) -> tuple[float, float, float]:
        s = score(candidates[th])
        lead = s.median_lead
        return (round(s.f1, 9), lead if math.isfinite(lead) else -math.inf, th)

    return max(candidates, key=key)
