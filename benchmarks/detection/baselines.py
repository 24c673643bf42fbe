"""Label-free baseline detectors (and one reference that needs held-out labels), on a run's recorded series.

Every detector is causal (it sees the series up to the current step only) and returns its *alerts*: the steps
at which its alarm condition switches on (one alert per excursion, not one per step), so a detector is not
rewarded or punished for how long a condition lasts. Each has one threshold, chosen on the selection seeds
(see :mod:`benchmarks.detection.scoring`) from the grid in :data:`GRIDS`.

- ``spike``: Lightning's ``SpikeDetection`` rule -- the loss rose since the last step and exceeds the running
  mean of the last 10 losses by more than ``rtol`` times that mean (``rtol`` = 2 in Lightning).
- ``z_loss`` / ``z_grad``: a z-score of the training loss / the gradient norm against the mean and standard
  deviation of the previous 50 steps (as large-LM training stacks do, with 6 sigma); threshold ``k``.
- ``cusum_pnorm`` / ``ph_pnorm``: CUSUM and Page--Hinkley on the raw parameter norm. The norm drifts by design
  (weight decay, growth), so both watch its per-step change, standardised against the previous 50 changes,
  for a change in either direction: CUSUM with drift 0.5 restarting after each alarm, Page--Hinkley with
  tolerance 0.5 (cumulative deviation from the running mean against its running extremum); threshold ``h`` /
  ``lambda``.
- ``ref_cusum_heldout`` (reference, needs labels): the same CUSUM on the changes of the held-out metric (test
  accuracy, or minus the test loss for regression), evaluated every few steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

Z_WINDOW = 50
MIN_HISTORY = 10

GRIDS: dict[str, list[float]] = {
    "spike": [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0],
    "z_loss": [2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0],
    "z_grad": [2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0],
    "cusum_pnorm": [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
    "ph_pnorm": [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
    "ref_cusum_heldout": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
}
LABEL_FREE = ("spike", "z_loss", "z_grad", "cusum_pnorm", "ph_pnorm")
REFERENCE = ("ref_cusum_heldout",)


def onsets(steps: Sequence[int], flags: Sequence[bool]) -> list[int]:
    """Steps where ``flags`` switches from False to True."""
    out, prev = [], False
    for s, f in zip(steps, flags):
        if f and not prev:
            out.append(int(s))
        prev = bool(f)
    return out


def spike(steps: np.ndarray, loss: np.ndarray, rtol: float, window: int = 10, warmup: int = 1) -> list[int]:
    """Lightning's ``SpikeDetection`` condition (mode ``min``, ``atol=None``), per step."""
    hist: deque[float] = deque(maxlen=window)
    last = 0.0
    flags = []
    for i, v in enumerate(loss):
        flag = False
        if not np.isfinite(v):
            flag = True
        elif i >= warmup and hist:
            mean = float(np.mean(hist))
            flag = (v - last) > 0 and abs(v - mean) >= abs(rtol * mean)
        flags.append(flag)
        if np.isfinite(v):
            hist.append(float(v))
            last = float(v)
    return onsets(steps, flags)


def _standardised(x: np.ndarray, window: int = Z_WINDOW) -> np.ndarray:
    """``(x_t - mean) / sd`` against the previous ``window`` finite values (``nan`` before ``MIN_HISTORY``)."""
    z = np.full(len(x), np.nan)
    hist: deque[float] = deque(maxlen=window)
    for i, v in enumerate(x):
        if len(hist) >= MIN_HISTORY and np.isfinite(v):
            a = np.asarray(hist)
            sd = max(a.std(), 1e-12 * abs(a.mean()), 1e-30)  # a constant history: any change is huge
            z[i] = float(np.clip((v - a.mean()) / sd, -1e30, 1e30))
        if np.isfinite(v):
            hist.append(float(v))
    return z


def zscore(steps: np.ndarray, x: np.ndarray, k: float) -> list[int]:
    """Alert when ``x`` is more than ``k`` standard deviations above its previous ``Z_WINDOW`` values (or
    non-finite)."""
    z = _standardised(x)
    flags = [(not np.isfinite(v)) or (np.isfinite(zz) and zz > k) for v, zz in zip(x, z)]
    return onsets(steps, flags)


def _increments(x: np.ndarray) -> np.ndarray:
    return np.concatenate([[np.nan], np.diff(x)])


def cusum(steps: np.ndarray, x: np.ndarray, h: float, drift: float = 0.5) -> list[int]:
    """Two-sided CUSUM on the standardised increments of ``x``; restarts after each alarm."""
    z = _standardised(_increments(x))
    hi = lo = 0.0
    out = []
    for s, v, zz in zip(steps, x, z):
        if not np.isfinite(v):
            out.append(int(s))
            hi = lo = 0.0
            continue
        if not np.isfinite(zz):
            continue
        hi = max(0.0, hi + zz - drift)
        lo = max(0.0, lo - zz - drift)
        if hi > h or lo > h:
            out.append(int(s))
            hi = lo = 0.0
    return out


def page_hinkley(steps: np.ndarray, x: np.ndarray, lam: float, delta: float = 0.5) -> list[int]:
    """Two-sided Page--Hinkley test on the standardised increments of ``x``; restarts after each alarm."""
    z = _standardised(_increments(x))
    n, mean, m_up, m_dn, min_up, max_dn = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    out = []
    for s, v, zz in zip(steps, x, z):
        if not np.isfinite(v):
            out.append(int(s))
            n, mean, m_up, m_dn, min_up, max_dn = 0, 0.0, 0.0, 0.0, 0.0, 0.0
            continue
        if not np.isfinite(zz):
            continue
        n += 1
        mean += (zz - mean) / n
        m_up += zz - mean - delta
        m_dn += zz - mean + delta
        min_up, max_dn = min(min_up, m_up), max(max_dn, m_dn)
        if m_up - min_up > lam or max_dn - m_dn > lam:
            out.append(int(s))
            n, mean, m_up, m_dn, min_up, max_dn = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    return out


def detect(name: str, rec, threshold: float) -> list[int]:
    """Alerts of baseline ``name`` with ``threshold`` on a :class:`~benchmarks.detection.record.Recording`."""
    fns: dict[str, Callable[[], list[int]]] = {
        "spike": lambda: spike(rec.steps, rec.loss, threshold),
        "z_loss": lambda: zscore(rec.steps, rec.loss, threshold),
        "z_grad": lambda: zscore(rec.steps, rec.grad_norm, threshold),
        "cusum_pnorm": lambda: cusum(rec.steps, rec.param_norm, threshold),
        "ph_pnorm": lambda: page_hinkley(rec.steps, rec.param_norm, threshold),
        "ref_cusum_heldout": lambda: cusum(rec.eval_steps, rec.evals["heldout"], threshold),
    }
    if name not in fns:
        raise ValueError(f"Expected a baseline in {sorted(fns)}, but got {name!r}")
    return fns[name]()
