"""The case registry: what a case family module declares, and helpers for transition rules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.detection.record import Recording, Setup


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        name: unique name (``--cases``).
        family: the case family (one module each).
        build: ``(seed, quick) -> Setup``.
        transitions: the run's transition steps, by a rule fixed here from the run's own metrics (controls:
            none).
        window: the warning window: an alert in ``[t - window, t]`` is a true positive for the transition at
            ``t``.
        rule: the transition rule, in words (for the report).
        control: a control (no transition by construction; every alert is a false alarm).
    """

    name: str
    family: str
    build: Callable[[int, bool], Setup]
    transitions: Callable[[Recording], list[int]]
    window: int
    rule: str
    control: bool = False
    default: bool = True  # in the default suite (others run with ``--cases``)


def first_at_least(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    """The first step whose value is ``>= threshold`` (``None`` when none)."""
    hit = np.nonzero(np.asarray(values) >= threshold)[0]
    return None if hit.size == 0 else int(np.asarray(steps)[hit[0]])


def no_transition(rec: Recording) -> list[int]:
    return []


def all_cases() -> list[Case]:
    from benchmarks.detection import catapult, condensation, controls, eos, grokking, spikes

    out: list[Case] = []
    for mod in (grokking, eos, catapult, condensation, spikes, controls):
        out += mod.CASES
    return out
