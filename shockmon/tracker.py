"""The streaming Burgers characteristic tracker.

:class:`BurgersTracker` takes quotient observables step by step and forecasts shocks -- the moment
characteristics cross. It is pure torch, knows nothing of models or Lightning, keeps its state on the device
of its inputs, and synchronises with the host only in :meth:`BurgersTracker.poll`.

The computations live in pure functions: :mod:`shockmon._particles` (particle view),
:mod:`shockmon._trajectory` (trajectory view) and :mod:`shockmon._alerts` (Riccati gate, hysteresis, event
ring). This module orchestrates them.

Cost and state. Groups of equal shape ``(n, D)`` are stacked into *buckets* and processed by one batch of
tensor operations, so the cost per update is a few dozen kernels per bucket, not per group. State is a ring of
the last ``window`` snapshots per group, O(particles x window), fixed in size whatever the number of steps. In
1-D the neighbours are the sorted neighbours (a sort per update, O(n log n)); in D > 1 they are exact
k-nearest neighbours by squared distances (float64, centred) + ``topk`` (O(n^2 D)), refreshed round-robin every
``knn_every`` updates.
Groups of more than ``max_particles`` particles are tracked on a fixed random subsample of that size (seeded,
saved in the state dict): the cost then stops growing with ``n`` but a shock confined to fewer than about ``n
/ max_particles`` particles can be missed.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from shockmon import _alerts as al
from shockmon import _particles as pt
from shockmon import _trajectory as tj
from shockmon._device import to_device
from shockmon.events import EventKind, ShockEvent

Tensor = torch.Tensor

__all__ = ["BurgersTracker"]

TRAJECTORY = "trajectory"
#: per-group features passed from the views to the alert logic, in this column order
_FEATURES = ("T", "sd_T", "tau", "strength", "collapse", "nonfinite", "nu", "step_sq")
_KINDS = {
    al.KIND_FORECAST: EventKind.FORECAST,
    al.KIND_SHOCK: EventKind.SHOCK,
    al.KIND_DIVERGENCE: EventKind.DIVERGENCE,
    al.KIND_INSTABILITY: EventKind.INSTABILITY,
}
_METHODS = ("auto", "jacobian", "pairs")
#: the device tensors of a bucket's state
_BUCKET_TENSORS = (
    "pos",
    "times",
    "noise_d",
    "noise_m",
    "noise_dvar",
    "noise_pos",
    "xc",
    "v",
    "tc",
    "knn",
    "sub",
)
_BUCKET_TENSORS += ("derived", "fit_sums")
_TIMES = ("step", "lr")
#: settings the layout of a saved state depends on (ring and history lengths, the time axis, the particle
#: subsample, the event rows): a state is always resumed with the values it was saved with
_LAYOUT_SETTINGS = (
    "window", "riccati_window", "trajectory_window", "growth_window", "time", "max_particles", "seed", "units",
    "capacity"
)
#: settings added after states were first saved, with the value that reproduces how such a state was made
_LEGACY_SETTINGS = {"trajectory_alerts": True, "collective": 0.0, "coherence": 0.0, "growth": 0.0}
_SETTINGS_FROM = ("saved", "current")
#: the growth test looks at a group only after this many of its windows of updates (a settled history)
_GROWTH_HISTORY = 3
#: particles per group the step length is measured on (a median: 128 estimate it to a few percent)
_GROWTH_SAMPLE = 128


def _int_arg(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"Expected argument `{name}` to be an integer >= {low}, but got {value!r}")
    return int(value)


def _float_arg(name: str, value: Any, low: float, high: float = math.inf, open_low: bool = True) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    ok = ok and (float(value) > low if open_low else float(value) >= low) and float(value) <= high
    if not ok:
        rng = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if math.isfinite(high) else "")
        raise ValueError(f"Expected argument `{name}` to be a finite number {rng}, but got {value!r}")
    return float(value)


class _Bucket:
    """Groups of identical shape, processed together. Host bookkeeping plus device tensors."""

    def __init__(
        self, names: list[str], n: int, D: int, dtype: torch.dtype, device: torch.device, L: int
    ) -> None:
        self.names = list(names)
        self.n, self.D, self.dtype, self.device, self.L = n, D, dtype, device, L
        B = len(names)
        self.pos = torch.zeros(L, B, n, D, dtype=dtype, device=device)
        self.times = torch.zeros(L, dtype=torch.float64, device=device)
        self.times_host: list[float] | None = [0.0] * L  # mirror while every time is known on the host
        self.count = 0
        self.noise_d = torch.zeros(B, dtype=torch.float64, device=device)
        self.noise_m = torch.zeros(B, dtype=torch.float64, device=device)
        self.noise_dvar = torch.zeros(B, dtype=torch.float64, device=device)
        self.noise_pos = torch.zeros(B, dtype=torch.float64, device=device)
        self.noise_count = 0
        self.xc = torch.zeros(B, n, D, dtype=dtype, device=device)  # last fit, to carry non-finite particles
        self.v = torch.zeros(B, n, D, dtype=dtype, device=device)
        self.tc = torch.zeros((), dtype=torch.float64, device=device)
        self.knn: Tensor | None = None
        self.pairs: tuple[Tensor, Tensor] | None = None  # (knn, its pair_index) while the lists are unchanged
        self.gidx: Tensor | None = None  # the members' group indices, cached on device
        self.gi_host: list[int] | None = None  # and on the host
        self.const: tuple[Tensor, ...] | None = None  # constant tensors, cached
        self.derived: Tensor | None = None  # (5, B): sd_v, sd_m, nu, significant nu, float floor
        self.sub: Tensor | None = None  # (B, n) original indices when subsampled
        # the window fit's running sums (pt.fit_window_sums) about ring slot fit_ref, current after update
        # fit_count; rebuilt from the ring every L updates
        self.fit_sums: Tensor | None = None
        self.fit_count, self.fit_ref = -1, -1
        self.fill: Tensor | None = None  # (2, B, n, D) inputs and extrapolations, kept between updates (on CPU)

    def take(self, keep: list[int]) -> _Bucket:
        """A new bucket holding the members ``keep`` (copies)."""
        nb = _Bucket([self.names[j] for j in keep], self.n, self.D, self.dtype, self.device, self.L)
        idx = to_device(torch.tensor(keep), self.device)
        nb.pos = self.pos.index_select(1, idx).clone()
        for f in ("noise_d", "noise_m", "noise_dvar", "noise_pos", "xc", "v"):
            setattr(nb, f, getattr(self, f).index_select(0, idx).clone())
        nb.times = self.times.clone()
        nb.times_host = None if self.times_host is None else list(self.times_host)
        nb.derived = None if self.derived is None else self.derived.index_select(1, idx).clone()
        nb.tc = self.tc.clone()
        nb.count, nb.noise_count = self.count, self.noise_count
        nb.knn = None if self.knn is None else self.knn.index_select(0, idx).clone()
        nb.sub = None if self.sub is None else self.sub.index_select(0, idx).clone()
        nb.fit_sums = None if self.fit_sums is None else self.fit_sums.index_select(1, idx).clone()
        nb.fit_count, nb.fit_ref = self.fit_count, self.fit_ref
        return nb

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("names", "n", "D", "L", "count", "noise_count")}
        d.update(fit_count=self.fit_count, fit_ref=self.fit_ref)
        d["times_host"] = None if self.times_host is None else list(self.times_host)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        for k in _BUCKET_TENSORS:
            d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device) -> _Bucket:
        b = cls(d["names"], d["n"], d["D"], getattr(torch, d["dtype"]), device, d["L"])
        b.count, b.noise_count = int(d["count"]), int(d["noise_count"])
        # saved before the running fit sums: they are rebuilt from the ring at the next update
        b.fit_count, b.fit_ref = int(d.get("fit_count", -1)), int(d.get("fit_ref", -1))
        b.times_host = None if d["times_host"] is None else list(d["times_host"])
        for k in _BUCKET_TENSORS:
            val = d.get(k)
            setattr(b, k, None if val is None else val.to(device).clone())
        return b


class BurgersTracker:
    """Streaming Burgers characteristic tracker: forecasts shocks from quotient observables, on device.

    Two views of the same picture. **Particle view**: each group (a layer's units, a block's heads) is a set
    of particles ``x_i(t)`` in invariant coordinates; velocities are least-squares slopes over the last
    ``window`` snapshots; the local velocity gradient is fitted over ``neighbors`` neighbours and its
    compression rate ``lambda_i = lambda_min(sym J_i)`` counts when significantly negative (Bonferroni over
    the group). The forecast is ``t_c - 1/lambda`` with ``t_c`` the window's centre time (the velocities' lag
    corrected), robust-minimised over the group, and it is kept only while it is *Burgers-consistent*: along
    characteristics ``-1/lambda`` shrinks at rate one, so the forecast stays put (the fitted slope of the
    forecast against time is within ``(-1/2, 1/2)``); a forecast that recedes (a stationary contraction, or a
    viscous shock that has formed) is not a coming crossing, nor is one that advances fast (an abrupt
    compression). **Trajectory view**: for the vector ``q(t)`` of all scalar quotient observables, ``s = <v,
    dv/dt>/|v|^2`` and a Riccati fit ``1/s = a + b t``; ``b`` is the Burgers-consistency figure and the fit's
    zero the forecast blow-up (logged; alerted on only with ``trajectory_alerts``).

    A ``forecast`` event fires when a Burgers-consistent crossing is predicted between now and ``horizon``
    steps ahead for ``n_on`` updates. A *shock* fires while armed when a significantly closing pair of particles
    crosses or comes within the viscous width ``2 nu/|dv|``, when the forecast time is reached, or when the
    compression stops steepening with the crossing due within the forecasts' own span (the gradient plateaus at
    its viscous limit). Unarmed, only a shock that has *formed* fires: the plateau and a collapsed pair at once
    (a collective crossing within ``horizon`` whose forecast recedes like time, as a formed viscous shock's does,
    while pairs have crossed; one closing pair alone, never forecast, is mostly noise in a dense cloud). Its
    event's predicted step is its own. Both states disarm when no consistent forecast is within
    ``disarm_horizon`` for ``n_off`` updates, except that in-shock holds while pairs stay collapsed or the
    plateau lasts: a lasting shock is one event. Viscosity ``nu = D_hat/2``
    comes from the MAD variance of velocity residuals, with measurement noise (constant in the lag) separated
    from diffusion (growing with it).

    Use: :meth:`update` every step (no host sync), :meth:`forecast` / :meth:`summary` for device tensors to
    log, :meth:`poll` once per logging interval for the events since the last poll (the one host sync);
    :meth:`state_dict` / :meth:`load_state_dict` (and pickle) to resume with identical events.

    What it can and cannot see. Forecasts need a significant compression (``z`` above a Bonferroni threshold)
    that is also Burgers-consistent over ``riccati_window`` updates; when the velocities are too noisy for
    that, the forecast is withheld (``inf``) rather than wrong. In the pairs method the compression must also be
    coherent over a particle's neighbourhood (``coherence``): particles drifting past one another are not a
    shock, and neither is a contraction onto an attractor (its forecast recedes with time). On the tests' flows
    (256 particles, time step 0.01 per step, position noise 1e-3) the forecast at half the crossing time is within
    a few percent of it; with noise 3e-3 it is withheld until later. Cost: see ``benchmarks/tracker_cost.py``.

    Args:
        horizon: a ``forecast`` event fires when a shock is predicted within this many steps (``H_on``).
        window: snapshots per least-squares fit (``L``), ``>= 3``.
        neighbors: neighbourhood size ``K`` for the local gradient, ``>= 2``.
        alpha: family-wise false-alarm rate per group and update for the significance test, in ``(0, 0.5)``.
        rank: the group's time to shock is the ``rank``-th smallest of its significant particles' (an order
            statistic is much steadier than the minimum of many noisy estimates, and biased late by only about
            ``T'' (rank * spacing / 2)^2 / 2`` where ``T(x0)`` is the crossing time of the characteristic from
            ``x0``).
        collective: a forecast counts only while at least this fraction of the group's tracked particles
            (``ceil(collective * n)``, at least ``rank``) are due to cross within ``horizon``: a shock worth an
            alert is collective, a macroscopic share of a layer's units. Units overtaking one another in ones
            and twos happen throughout ordinary training. The forecast itself stays the ``rank``-th time (a
            point shock of a smooth profile is first reached by a few particles). ``0``: no such gate.
        quantile: if given, use this quantile of the significant particles' times to shock instead of
            ``rank``.
        coherence: pairs method only: a particle's rate (its most compressive pair) counts only while the mean
            strain of all its neighbour pairs is below zero by this many standard errors of their scatter
            (:func:`shockmon._particles.coherent_compression`): a forming shock compresses a neighbourhood, units
            drifting past one another at random do not. ``0``: no such test (nor with fewer than 3 neighbours).
        method: ``"auto"`` (least-squares Jacobian when ``D <= 3`` and ``K >= 2D + 1``, with closed-form
            eigenvalues; pairwise closing times otherwise), ``"jacobian"`` (``torch.linalg.eigh`` beyond ``D =
            3``, whose failure check synchronises a GPU's stream at every update) or ``"pairs"`` (every
            approaching pair measures ``e^T J e`` along its direction; see
            :func:`shockmon._particles.pairs_rates_and_collapse` for why transverse offsets do not matter).
            The Jacobian's smallest eigenvalue is tested against ``z + sqrt(2 (D - 1))`` standard errors (the
            smallest of ``D`` noisy eigenvalues is biased low). In ``D = 9`` (a rescaling layer's units) the
            Jacobian over 19 neighbours cost 5-20x the pairs on the benchmark, so ``"auto"`` keeps pairs there.
        time: ``"step"`` or ``"lr"`` (learning-rate time ``t = sum lr``; forecasts are converted back to steps
            at the current learning rate).
        n_on, n_off: updates a condition must hold to arm / disarm.
        disarm_horizon: ``H_off``, default ``2 * horizon``.
        cooldown: updates after a disarm during which no forecast arms.
        warmup: no forecast or shock event before this step.
        shock_updates: updates the shock criterion must hold.
        riccati_window: forecasts in the particle view's Burgers-consistency fit (default ``window``), ``>=
            4``.
        trajectory_window: rates ``s`` in the trajectory view's Riccati fit (default ``4 * window``), ``>=
            4``.
        trajectory_alerts: raise ``forecast``/``shock`` events from the trajectory view too. Off by default:
            its forecast and state are still computed and logged, but on the detection benchmark's runs its
            Riccati-consistent "blow-ups" marked the ends of fast phases (a path decelerating to a stop),
            never a scored transition (``benchmarks/detection``). Divergence events are always raised.
        growth: an ``instability`` event fires when a particle group's median step length (the distance its
            median particle moved since the previous update, per unit learning rate, floored at float resolution)
            grows exponentially: the least-squares line through the log step lengths of the last
            ``growth_window`` updates rises by at least this factor, its slope is significant at level ``alpha``
            (a t test on the residuals), and its rise stands out of the scatter of the ``2 * growth_window``
            updates before (:func:`shockmon._alerts.growth_test`), on two updates in a row. A run-away
            oscillation -- a direction past its edge of stability, the mechanism of catapults and Adam's loss
            spikes -- grows like this for several updates before the loss does much; ordinary training's step
            lengths wander or drift slowly. One event per episode, with the fastest-moving particles (of a
            sample of about 128) as its units, and no forecast step. ``0``: off.
        growth_window: updates in the growth test's fit, ``>= 4``.
        max_particles: larger groups are tracked on a fixed random subsample of this size.
        knn_every: in D > 1, each particle's neighbour list is recomputed (exactly) every this many updates; a
            slice of ``n / knn_every`` lists per group is refreshed at each update, so the cost is steady.
        units: unit indices carried by each event.
        capacity: events buffered on device between polls.
        seed: seeds the subsample.

    Example (a seeded synthetic stream: 256 particles of the inviscid flow ``u0 = -sin x``, time step 0.01 per
    step, whose characteristics cross at ``t* = 1``, i.e. step 100):

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x0 = torch.linspace(-3.14159, 3.14159, 256)
        >>> tracker = BurgersTracker(horizon=200)
        >>> for step in range(121):
        ...     x = x0 - 0.01 * step * torch.sin(x0) + 1e-4 * torch.randn(256, generator=g)
        ...     tracker.update(step, {"layer": x})
        ...     if step == 50:
        ...         predicted = round(tracker.forecast()["layer"].item())
        >>> predicted
        100
        >>> [(e.kind.value, e.step) for e in tracker.poll()]
        [('forecast', 24), ('shock', 101)]
    """

    VERSION = 1
    _Z_GATE = 2.5  # a forecast must recede significantly slower than time itself (slope + z SE < 1)
    _Z_PLATEAU = 3.0  # an imminent compression has stopped steepening (slope - z SE > 1/2)
    _NOISE_EVERY = 4  # noise statistics are refreshed every this many updates

    def __init__(
        self,
        horizon: int | float = 200,
        window: int = 16,
        neighbors: int = 8,
        *,
        alpha: float = 1e-3,
        rank: int = 2,
        collective: float = 0.05,
        quantile: float | None = None,
        coherence: float = 3.0,
        method: str = "auto",
        time: str = "step",
        n_on: int = 3,
        n_off: int = 5,
        disarm_horizon: int | float | None = None,
        cooldown: int = 20,
        warmup: int = 0,
        shock_updates: int = 1,
        riccati_window: int | None = None,
        trajectory_window: int | None = None,
        trajectory_alerts: bool = False,
        growth: float = 4.0,
        growth_window: int = 12,
        max_particles: int = 4096,
        knn_every: int = 64,
        units: int = 8,
        capacity: int = 4096,
        seed: int = 0,
    ) -> None:
        self.horizon = _float_arg("horizon", horizon, 0.0)
        self.window = _int_arg("window", window, 3)
        self.neighbors = _int_arg("neighbors", neighbors, 2)
        self.alpha = _float_arg("alpha", alpha, 0.0, 0.5)
        self.rank = _int_arg("rank", rank, 1)
        self.collective = _float_arg("collective", collective, 0.0, 1.0, open_low=False)
        self.quantile = (
            None if quantile is None else _float_arg("quantile", quantile, 0.0, 1.0, open_low=False)
        )
        self.coherence = _float_arg("coherence", coherence, 0.0, open_low=False)
        if not isinstance(method, str) or method not in _METHODS:
            raise ValueError(f"Expected argument `method` to be one of {_METHODS}, but got {method!r}")
        self.method = method
        if not isinstance(time, str) or time not in _TIMES:
            raise ValueError(f"Expected argument `time` to be one of {_TIMES}, but got {time!r}")
        self.time = time
        self.n_on = _int_arg("n_on", n_on, 1)
        self.n_off = _int_arg("n_off", n_off, 1)
        h_off = 2.0 * self.horizon if disarm_horizon is None else disarm_horizon
        self.disarm_horizon = _float_arg("disarm_horizon", h_off, 0.0)
        if self.disarm_horizon < self.horizon:
            raise ValueError(
                f"Expected argument `disarm_horizon` to be >= `horizon` ({self.horizon}),"
                f" but got {self.disarm_horizon}"
            )
        self.cooldown = _int_arg("cooldown", cooldown, 0)
        self.warmup = _int_arg("warmup", warmup, 0)
        self.shock_updates = _int_arg("shock_updates", shock_updates, 1)
        rw = self.window if riccati_window is None else riccati_window
        self.riccati_window = _int_arg("riccati_window", rw, 4)
        tw = 4 * self.window if trajectory_window is None else trajectory_window
        self.trajectory_window = _int_arg("trajectory_window", tw, 4)
        if not isinstance(trajectory_alerts, bool):
            raise ValueError(
                f"Expected argument `trajectory_alerts` to be a bool, but got {trajectory_alerts!r}"
            )
        self.trajectory_alerts = trajectory_alerts
        ok = isinstance(growth, numbers.Real) and not isinstance(growth, bool) and math.isfinite(growth)
        if not ok or not (growth == 0 or growth > 1):
            raise ValueError(f"Expected argument `growth` to be 0 (off) or a finite number > 1, but got {growth!r}")
        self.growth = float(growth)
        self.growth_window = _int_arg("growth_window", growth_window, 4)
        # the growth test's t quantile and log growth factor (host arithmetic, once)
        self._growth_levels = (
            al.t_critical(self.alpha, self.growth_window - 2), math.log(self.growth) if self.growth > 0 else 0.0
        )
        self.max_particles = _int_arg("max_particles", max_particles, max(self.neighbors + 1, 3))
        self.knn_every = _int_arg("knn_every", knn_every, 1)
        self.units = _int_arg("units", units, 0)
        self.capacity = _int_arg("capacity", capacity, 1)
        self.seed = _int_arg("seed", seed, 0)
        self._cfg = dict(
            h_on=self.horizon,
            h_off=self.disarm_horizon,
            n_on=self.n_on,
            n_off=self.n_off,
            n_shock=self.shock_updates,
            cooldown=self.cooldown,
        )
        self.reset()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget all groups, history, state and buffered events (the configuration is kept)."""
        self._device: torch.device | None = None
        self._names: list[str] = [TRAJECTORY]
        self._retired: set[str] = set()  # dropped groups: their index stays (event rows name it), state is freed
        self._shape: dict[str, tuple[int, int, torch.dtype]] = {}
        self._buckets: list[_Bucket] = []
        self._where: dict[str, tuple[int, int]] = {}
        self._hist_count: list[int] = [0]
        self._last_step: int | None = None
        self._traj: dict[str, Any] | None = None
        self._g: dict[str, Tensor] = {}
        self._read = 0
        self._feat_default: Tensor | None = None
        self._units_default: Tensor | None = None
        self._rows_fixed: Tensor | None = None
        self._grow_t: tuple[Tensor, Tensor] | None = None  # the growth test's least-squares design, on device
        self._index_cache: dict[tuple[torch.dtype, tuple[Any, ...]], Tensor] = {}  # see _device_index
        self._t_host: float | None = None  # the current time, while it is known on the host
        self._growth_log_lr: float | Tensor = 0.0  # log of the last learning rate given (growth test)
        self._rate_host: float | None = None
        # (name, shape, dtype, device) of every group at the last update, once registered (None: check again)
        self._sig: tuple[Any, ...] | None = None
        self._sig_now: tuple[Any, ...] | None = None

    def _init_device(self, device: torch.device) -> None:
        self._device = device
        G, M, k = 1, self.riccati_window, self.units
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.long, device=device)
        self._g = {
            "state": torch.zeros(G, **i64),
            "on": torch.zeros(G, **i64),
            "off": torch.zeros(G, **i64),
            "shk": torch.zeros(G, **i64),
            "cool": torch.zeros(G, **i64),
            "div": torch.zeros(G, dtype=torch.bool, device=device),
            "hist_t": torch.full((G, M), math.nan, **f64),
            "hist_T": torch.full((G, M), math.nan, **f64),
            "hist_sd": torch.full((G, M), math.nan, **f64),
            "pred": torch.full((G,), math.inf, **f64),  # predicted shock step (forecast())
            "steps": torch.full((G,), math.inf, **f64),  # steps to shock (summary)
            "nu": torch.full((G,), math.nan, **f64),
            "buf": torch.zeros(self.capacity + 1, al.ROW_FIXED + k, **f64),
            "counter": torch.zeros((), **i64),
            "t": torch.zeros((), **f64),
            "rate": torch.ones((), **f64),
            "consistency": torch.full((), math.nan, **f64),
            **self._growth_state(G, device),
        }

    def _growth_state(self, G: int, device: torch.device) -> dict[str, Tensor]:
        """The growth test's state for ``G`` groups, before any update."""
        f64 = dict(dtype=torch.float64, device=device)
        return {
            # log step lengths per unit learning rate, oldest first: the test's window and the history before it
            "grow": torch.full((G, _GROWTH_HISTORY * self.growth_window), math.nan, **f64),
            "grow_on": torch.zeros(G, dtype=torch.long, device=device),  # updates in a row it grew (0, 1, 2+)
            "grate": torch.full((G,), math.nan, **f64),  # growth rate of the step length per update
        }

    def _move(self, device: torch.device) -> None:
        """Move every state tensor to ``device`` (host-side, once)."""
        self._device = device
        self._g = {k: v.to(device) for k, v in self._g.items()}
        for b in self._buckets:
            b.device = device
            for f in (*_BUCKET_TENSORS, "gidx"):
                val = getattr(b, f)
                setattr(b, f, None if val is None else val.to(device))
        if self._traj is not None:
            self._traj = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self._traj.items()}
        if isinstance(self._growth_log_lr, Tensor):
            self._growth_log_lr = self._growth_log_lr.to(device)
        self._feat_default = self._units_default = self._rows_fixed = self._grow_t = None
        self._index_cache = {}
        for b in self._buckets:
            b.const = b.pairs = b.fill = None

    def _add_group(self, name: str) -> None:
        self._names.append(name)
        self._hist_count.append(0)
        g = self._g
        for key in ("state", "on", "off", "shk", "cool", "div"):
            g[key] = torch.cat([g[key], torch.zeros_like(g[key][:1])])
        for key in ("hist_t", "hist_T", "hist_sd"):
            g[key] = torch.cat([g[key], torch.full_like(g[key][:1], math.nan)])
        g["pred"] = torch.cat([g["pred"], torch.full_like(g["pred"][:1], math.inf)])
        g["steps"] = torch.cat([g["steps"], torch.full_like(g["steps"][:1], math.inf)])
        g["nu"] = torch.cat([g["nu"], torch.full_like(g["nu"][:1], math.nan)])
        g["grow"] = torch.cat([g["grow"], torch.full_like(g["grow"][:1], math.nan)])
        g["grow_on"] = torch.cat([g["grow_on"], torch.zeros_like(g["grow_on"][:1])])
        g["grate"] = torch.cat([g["grate"], torch.full_like(g["grate"][:1], math.nan)])

    def _restart_group(self, name: str) -> None:
        """Clear the history and alert state of one group (its size changed)."""
        gi = self._names.index(name)
        self._hist_count[gi] = 0
        g = self._g
        for key in ("state", "on", "off", "shk", "cool"):
            g[key][gi] = 0
        g["div"][gi] = False
        g["hist_t"][gi] = math.nan
        g["hist_T"][gi] = math.nan
        g["hist_sd"][gi] = math.nan
        g["pred"][gi] = math.inf
        g["grow"][gi] = math.nan
        g["grow_on"][gi] = 0
        g["grate"][gi] = math.nan
        g["steps"][gi] = math.inf
        g["nu"][gi] = math.nan

    @property
    def groups(self) -> list[str]:
        """The groups tracked now, in first-seen order (dropped ones excluded)."""
        return [nm for nm in self._names[1:] if nm not in self._retired]

    def drop(self, names: Iterable[str]) -> None:
        """Stop tracking groups: their particle history is freed, their alert state cleared, and they leave
        :meth:`forecast` and :meth:`summary`. Events of theirs not yet polled are kept. A dropped name fed
        again starts afresh. ``ShockMonitor`` drops the groups a rebuilt observer no longer has.

        Example:
            >>> t = BurgersTracker()
            >>> for step in range(3):
            ...     t.update(step, {"a": torch.randn(8), "b": torch.randn(8)})
            >>> t.drop(["b"])
            >>> t.groups, sorted(k for k in t.summary() if k.startswith("forecast/"))
            (['a'], ['forecast/a', 'forecast/trajectory'])
        """
        names = [names] if isinstance(names, str) else list(names)
        unknown = [nm for nm in names if nm not in self._shape]
        if unknown:
            raise ValueError(
                f"Expected groups the tracker has, one of {self.groups}, but got {unknown} in `names`"
            )
        with torch.inference_mode():  # the state tensors are inference tensors (see update)
            for nm in names:
                if nm in self._where:
                    self._detach(nm)
                del self._shape[nm]
                self._restart_group(nm)
                self._retired.add(nm)
            self._sig = None

    def _detach(self, name: str) -> None:
        self._sig = None
        bi, j = self._where.pop(name)
        b = self._buckets[bi]
        keep = [i for i in range(len(b.names)) if i != j]
        if keep:
            self._buckets[bi] = b.take(keep)
        else:
            self._buckets[bi] = None  # type: ignore[call-overload]
        self._reindex()

    def _device_index(self, values: tuple[int, ...] | tuple[bool, ...], dtype: torch.dtype) -> Tensor:
        """Host ints (``torch.long``) or bools (``torch.bool``) as a device tensor, cached by value: built once per
        pattern with a non-blocking copy (``torch.tensor(..., device=...)`` would synchronise a GPU stream every
        update). The dtype is part of the key: ``(True, False) == (1, 0)`` in Python."""
        key = (dtype, values)
        t = self._index_cache.get(key)
        if t is None:
            if len(self._index_cache) >= 256:
                self._index_cache.clear()
            t = self._index_cache[key] = to_device(torch.tensor(values, dtype=dtype), self._device)
        return t

    def _reindex(self) -> None:
        self._buckets = [b for b in self._buckets if b is not None]
        self._where = {nm: (bi, j) for bi, b in enumerate(self._buckets) for j, nm in enumerate(b.names)}

    # ------------------------------------------------------------------ input checks
    def _check(self, step: Any, groups: Any, trajectory: Any, lr: Any) -> tuple[int, dict[str, Tensor], bool]:
        """The step as an int, the groups as a dict, and whether they have the last update's signature."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"Expected `step` to be an int, but got {type(step).__name__}")
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"Expected `step` to increase, but got {step} after {self._last_step}")
        if not isinstance(groups, Mapping):
            raise TypeError(
                f"Expected `groups` to be a mapping name -> Tensor, but got {type(groups).__name__}"
            )
        # the groups' names, shapes, dtypes and devices: when they are those of the last update, they were checked
        # then, and the registry below has nothing to do (~2 us per group of host work saved)
        sig = (
            tuple((name, x.shape, x.dtype, x.device) for name, x in groups.items())
            if all(isinstance(x, Tensor) for x in groups.values())
            else None
        )
        self._sig_now = sig
        same = sig is not None and sig == self._sig
        for name, x in groups.items() if not same else ():
            if not isinstance(name, str) or not name or name == TRAJECTORY:
                raise ValueError(
                    f"Expected group names to be non-empty strings other than 'trajectory', got {name!r}"
                )
            if not isinstance(x, Tensor):
                raise TypeError(f"Expected group {name!r} to be a Tensor, but got {type(x).__name__}")
            if x.dim() not in (1, 2) or x.shape[0] < 1 or (x.dim() == 2 and x.shape[1] < 1):
                raise ValueError(
                    f"Expected group {name!r} to have shape (n,) or (n, D), but got {tuple(x.shape)}"
                )
            if x.is_complex() or not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"Expected group {name!r} to be a real tensor, but got dtype {x.dtype}")
        out = dict(groups)
        if trajectory is not None:
            if not isinstance(trajectory, Tensor):
                raise TypeError(
                    f"Expected `trajectory` to be a Tensor or None, but got {type(trajectory).__name__}"
                )
            if trajectory.dim() != 1 or trajectory.numel() < 1:
                raise ValueError(
                    f"Expected `trajectory` to be a non-empty 1-D tensor, but got {tuple(trajectory.shape)}"
                )
        if lr is not None and not isinstance(lr, (numbers.Real, Tensor)):
            raise TypeError(f"Expected `lr` to be a float, a 0-d Tensor or None, but got {type(lr).__name__}")
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"Expected `lr` to be a scalar, but got shape {tuple(lr.shape)}")
        if self.time == "lr" and lr is None and self._last_step is None:
            raise ValueError("Expected `lr` on the first update of a tracker with time='lr', but got None")
        return step, out, same

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self,
        step: int,
        groups: Mapping[str, Tensor],
        trajectory: Tensor | None = None,
        lr: float | Tensor | None = None,
    ) -> None:
        """Feed one snapshot. No host synchronisation.

        Args:
            step: the training step (strictly increasing).
            groups: group name -> particles, ``(n,)`` or ``(n, D)``, in module order; any device and dtype
                (float64 inputs are tracked in float64, others in float32).
            trajectory: optional 1-D vector ``q(t)`` of all scalar quotient observables.
            lr: learning rate, for ``time="lr"`` (required on the first update; later defaults to the last
                one).

        A group whose size changes is warned about once per change and its history restarts. Non-finite values
        are replaced by their particle's extrapolated fit (so they never poison the state) and raise a
        ``divergence`` event.

        The work runs under ``torch.inference_mode()`` (about 15 % faster per update than ``no_grad`` on CPU: no
        autograd bookkeeping); the tracker's state tensors are inference tensors, which is why :meth:`forecast`
        and :meth:`summary` hand out ordinary copies.
        """
        with torch.inference_mode():
            self._update(step, groups, trajectory, lr)

    def _update(
        self, step: int, groups: Mapping[str, Tensor], trajectory: Tensor | None, lr: float | Tensor | None
    ) -> None:
        step, groups, same = self._check(step, groups, trajectory, lr)
        first = next(iter(groups.values()), trajectory)
        if self._device is None:
            if first is None:
                raise ValueError(
                    "Expected at least one group or a trajectory on the first update, but got none"
                )
            self._init_device(first.device)
        elif first is not None and first.device != self._device:
            self._move(first.device)  # e.g. state loaded from a CPU checkpoint, inputs on the GPU: once
        dev = self._device
        assert dev is not None
        g = self._g
        # ---- time
        if self.time == "lr":
            if lr is not None:
                g["rate"] = (
                    lr.to(dev, torch.float64).reshape(())
                    if isinstance(lr, Tensor)
                    else torch.full((), float(lr), dtype=torch.float64, device=dev)
                )
                self._rate_host = float(lr) if isinstance(lr, numbers.Real) else None
            if self._last_step is not None:
                g["t"] = g["t"] + g["rate"] * float(step - self._last_step)
                if self._t_host is not None and self._rate_host is not None:
                    self._t_host += self._rate_host * float(step - self._last_step)
                else:
                    self._t_host = None
            else:
                self._t_host = 0.0 if self._rate_host is not None else None
        else:
            self._t_host = float(step)
            g["t"] = torch.full((), self._t_host, dtype=torch.float64, device=dev)  # a fill: no host->device copy
        t_now = g["t"]
        self._last_step = step
        # ---- group registry (host-side shape checks); nothing to do for the names, shapes and dtypes of the last
        # update (no drop or load since)
        for name, x in groups.items() if not same else ():
            n = x.shape[0]
            D = 1 if x.dim() == 1 else x.shape[1]
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            if name not in self._shape:
                if name not in self._names:
                    self._add_group(name)
                self._retired.discard(name)
            elif self._shape[name] != (n, D, dtype):
                on, oD, odt = self._shape[name]
                what = (
                    f"changed size from {on}x{oD} to {n}x{D} particles"
                    if (on, oD) != (n, D)
                    else f"changed dtype from {odt} to {dtype}".replace("torch.", "")
                )
                warnings.warn(f"Group {name!r} {what}; its history restarts.", stacklevel=3)
                self._detach(name)
                self._restart_group(name)
            self._shape[name] = (n, D, dtype)
        present = list(groups)
        # members of a bucket are updated together; a bucket member missing now is split off
        split = False
        for bi, b in enumerate(list(self._buckets)):
            here = [j for j, nm in enumerate(b.names) if nm in groups]
            if here and len(here) < len(b.names):
                away = [j for j in range(len(b.names)) if j not in here]
                self._buckets[bi] = b.take(here)
                self._buckets.append(b.take(away))
                split = True
        if split:
            self._reindex()
        new = [nm for nm in present if nm not in self._where]
        by_shape: dict[tuple[int, int, torch.dtype], list[str]] = {}
        for nm in new:
            by_shape.setdefault(self._shape[nm], []).append(nm)
        for (n, D, dtype), names in by_shape.items():
            m = min(n, self.max_particles)
            b = _Bucket(names, m, D, dtype, dev, self.window)
            if m < n:
                subs = []
                for nm in names:
                    gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._names.index(nm))
                    subs.append(torch.sort(torch.randperm(n, generator=gen)[:m]).values)
                b.sub = to_device(torch.stack(subs), dev)
            self._buckets.append(b)
        if by_shape:
            self._reindex()
        self._sig = self._sig_now
        # ---- per-bucket particle view: one row of features per group (see _FEATURES)
        G = len(self._names)
        f64 = dict(dtype=torch.float64, device=dev)
        if self._feat_default is None or self._feat_default.shape[0] != G:
            row = torch.tensor([math.inf, math.inf, math.inf, 0.0, 0.0, 0.0, math.nan, math.nan], dtype=torch.float64)
            row = to_device(row, dev)
            self._feat_default = row.expand(G, len(row)).contiguous()
            self._units_default = torch.full((G, 3 * self.units), -1, dtype=torch.long, device=dev)
        F = self._feat_default.clone()
        U = self._units_default.clone()
        upd_list = [False] * G
        for b in self._buckets:
            if b.names[0] not in groups:
                continue
            feat, units = self._bucket_update(b, [groups[nm] for nm in b.names], t_now)
            if b.gidx is None or b.gi_host is None:  # a bucket's members and their indices never change
                b.gi_host = [self._names.index(nm) for nm in b.names]
                b.gidx = to_device(torch.tensor(b.gi_host), dev)
            gi_host = b.gi_host
            F.index_copy_(0, b.gidx, feat)
            U.index_copy_(0, b.gidx, units)
            for gi in gi_host:
                upd_list[gi] = True
        # ---- trajectory view
        if trajectory is not None:
            upd_list[0] = True
            feat0, traj_cons = self._traj_update(trajectory, t_now)
            F[0] = feat0
            g["consistency"] = traj_cons
        T_all, sdT_all, traw_all, str_all, coll_all, nonf_all, nu_all, stepsq_all = F.unbind(1)
        # ---- Riccati gate on the particle groups' forecast history
        M = self.riccati_window
        rows_h = [gi for gi in range(1, G) if upd_list[gi]]
        slots = {self._hist_count[gi] % M for gi in rows_h}
        if len(rows_h) == G - 1 and len(slots) == 1:  # every group, one history slot (host-known): a column
            (c,) = slots
            g["hist_t"][1:, c] = t_now
            g["hist_T"][1:, c] = T_all[1:]
            g["hist_sd"][1:, c] = sdT_all[1:]
        elif rows_h:
            ri = self._device_index(tuple(rows_h), torch.long)
            si = self._device_index(tuple(self._hist_count[gi] % M for gi in rows_h), torch.long)
            g["hist_t"][ri, si] = t_now
            g["hist_T"][ri, si] = T_all.index_select(0, ri)
            g["hist_sd"][ri, si] = sdT_all.index_select(0, ri)
        for gi in rows_h:
            self._hist_count[gi] += 1
        slope, se = al.forecast_trend(g["hist_t"], g["hist_T"], g["hist_sd"], max(4, M // 2))
        # Burgers: the forecast stays put (slope 0). Receding (slope -> 1): a stationary contraction or a formed
        # viscous shock; advancing fast (slope << 0): an abrupt compression, not yet a ridden characteristic
        consistent = (slope.abs() < 0.5) & (slope + self._Z_GATE * se < 1.0)
        # the forecast stops steepening *when the crossing is due within the forecasts' own span*: a viscous
        # shock forming; a receding forecast further out was not a coming crossing (it just disarms)
        hist_ok = pt.finite(g["hist_t"])
        span = t_now - torch.where(hist_ok, g["hist_t"], math.inf).amin(1)
        plateau = (slope - self._Z_PLATEAU * se > 0.5) & (traw_all <= span)
        if trajectory is not None:
            consistent[0] = (traj_cons > 0.5) & (traj_cons < 2.0) & pt.finite(T_all[0])
            plateau[0] = False
        T_g = torch.where(consistent, T_all, math.inf)
        armed = g["state"] == al.IMMINENT
        reached = consistent & (T_all <= t_now) & armed  # a forecast that was never issued is not "reached"
        # a crossing or viscous collapse counts after a forecast: one that was never forecast is, on real runs,
        # mostly noise in a dense cloud. Unarmed, a shock counts once it has formed: pairs collapsed *and* the
        # collective compression at its plateau (condensation: units' directions merging at a steady rate; a
        # monitor attached after the crossing). In-shock holds while either lasts: one event per shock
        collapsed = coll_all > 0
        shock_cond = ((reached | collapsed | plateau) & armed) | (plateau & collapsed)
        shock_cond[0] = reached[0]
        hold = collapsed | plateau  # False for the trajectory view: it has no pairs, and no plateau
        rate = g["rate"]
        steps_to = (T_g - t_now) / rate
        all_updated = all(upd_list)
        upd = None if all_updated else self._device_index(tuple(upd_list), torch.bool)
        warm = step >= self.warmup
        to_fc, to_sh, to_div = al.step_machine(g, upd, warm, steps_to, shock_cond, nonf_all > 0, self._cfg, hold)
        pred = step + steps_to
        if upd is None:  # every group was updated (host-known): no masking
            g["pred"], g["steps"], g["nu"] = pred, steps_to.clamp_min(0), nu_all
        else:
            g["pred"] = torch.where(upd, pred, g["pred"])
            g["steps"] = torch.where(upd, steps_to.clamp_min(0), g["steps"])
            g["nu"] = torch.where(upd, nu_all, g["nu"])
        # ---- growth of the step length (the instability test), particle groups only
        if self.growth > 0:
            # log step length per unit learning rate: a warm-up or a schedule changes the step length, not the
            # dynamics' speed
            lstep_all = 0.5 * torch.log(stepsq_all) - self._log_lr(lr, dev)
            grow_new = torch.cat([g["grow"][:, 1:], lstep_all[:, None]], 1)
            if self._grow_t is None:
                self._grow_t = al.growth_design(self.growth_window, dev)
            grate, gstrength, grows = al.growth_test(grow_new, self._grow_t, *self._growth_levels)
            if not warm:  # the warm-up gate (host-known)
                grows = torch.zeros_like(grows)
            # an event on the second update in a row that grows (one window of a small group's heavy-tailed
            # steps can look like a line; two in a row rarely do), once per episode
            to_grow = grows & (g["grow_on"] == 1)
            on_new = torch.where(grows, (g["grow_on"] + 1).clamp_max(2), 0)
            if upd is None:
                g["grow"], g["grate"], g["grow_on"] = grow_new, grate, on_new
            else:
                g["grow"] = torch.where(upd[:, None], grow_new, g["grow"])
                g["grate"] = torch.where(upd, grate, g["grate"])
                g["grow_on"] = torch.where(upd, on_new, g["grow_on"])
                to_grow = to_grow & upd
        # ---- events: per group a divergence row, a state-machine row, an instability row
        if self._rows_fixed is None or self._rows_fixed.shape[0] != G:
            gidx = torch.arange(G, **f64)
            # group, then the constant columns of a divergence row (kind) and of an instability row (kind, no
            # forecast step)
            self._rows_fixed = torch.stack(
                [gidx, torch.full_like(gidx, al.KIND_DIVERGENCE), torch.full_like(gidx, al.KIND_INSTABILITY),
                 torch.full_like(gidx, math.inf)], 1
            )
        stepv = torch.full((G, 1), float(step), **f64)
        kind = to_sh.double()[:, None]  # KIND_FORECAST = 0, KIND_SHOCK = 1
        pred_ev = torch.where(to_sh & ~pt.finite(pred), float(step), pred)[:, None]
        gcol = self._rows_fixed[:, :1]
        Ud = U.double()
        rows_sm = torch.cat([stepv, gcol, kind, pred_ev, str_all[:, None], Ud[:, : self.units]], 1)
        u = self.units
        rows_dv = torch.cat(
            [stepv, self._rows_fixed[:, :2], pred[:, None], torch.zeros_like(stepv), Ud[:, u : 2 * u]], 1
        )
        alert = to_fc | to_sh
        if not self.trajectory_alerts:  # the trajectory view is logged (forecast, state), not alerted on
            alert[0] = False
        if self.growth > 0:
            rows_gr = torch.cat([stepv, gcol, self._rows_fixed[:, 2:], gstrength[:, None], Ud[:, 2 * self.units :]], 1)
            rows = torch.stack([rows_dv, rows_sm, rows_gr], 1).reshape(3 * G, -1)
            flags = torch.stack([to_div, alert, to_grow], 1).reshape(3 * G)
        else:
            rows = torch.stack([rows_dv, rows_sm], 1).reshape(2 * G, -1)
            flags = torch.stack([to_div, alert], 1).reshape(2 * G)
        al.write_events(g["buf"], g["counter"], rows, flags)

    def _log_lr(self, lr: float | Tensor | None, dev: torch.device) -> float | Tensor:
        """``log(lr)`` (host float, or a 0-d device tensor for a tensor ``lr``); the last one when ``lr`` is
        ``None``, ``0`` before any; ``nan`` for ``lr <= 0`` (no step length per unit rate then)."""
        if lr is None:
            return self._growth_log_lr
        if isinstance(lr, Tensor):
            out: float | Tensor = torch.log(lr.to(dev, torch.float64).reshape(()).clamp_min(0))
            out = torch.where(torch.isfinite(out), out, math.nan)
        else:
            out = math.log(lr) if lr > 0 else math.nan
        self._growth_log_lr = out
        return out

    def _bucket_update(self, b: _Bucket, xs: list[Tensor], t_now: Tensor) -> tuple[Tensor, Tensor]:
        """Particle view of a bucket: features ``(B, 8)`` (``_FEATURES``), unit indices ``(B, 3 units)``."""
        dev, L, K = b.device, b.L, self.neighbors
        # (n,) and (n, 1) groups share a bucket: stack them all as (n, D); an input already (n, D) of the bucket's
        # dtype and device goes in as it is (the no-op .to and .reshape cost ~1 us each, per group and update)
        ins = [
            xi if xi.dim() == 2 and xi.dtype == b.dtype and xi.device == dev
            else xi.to(device=dev, dtype=b.dtype).reshape(xi.shape[0], -1)
            for xi in xs
        ]
        # on CPU (large buckets), into the first half of a kept buffer; each particle's extrapolation goes into the
        # second, and the non-finite particles are replaced by a gather of rows (pt.take_rows)
        rows = b.sub is None and pt.large_on_cpu(len(ins) * ins[0].numel(), dev)
        if rows:
            shape = (2, len(ins), *ins[0].shape)
            if b.fill is None or b.fill.shape != shape:
                b.fill = torch.empty(shape, dtype=b.dtype, device=dev)
            x = torch.stack(ins, out=b.fill[0])
        else:
            x = torch.stack(ins)
        # (B, N): divergence looks at every unit, tracked or not. A sum over the coordinates is non-finite when
        # any is (or when finite ones overflow, beyond 1e37: divergent too); 3x cheaper than isfinite().all(-1)
        fin_all = pt.finite(pt.row_sums(x))
        nonfinite = ~fin_all.all(1)
        nf_units = self._units_of((~fin_all).to(b.dtype))
        if b.sub is not None:
            x = pt.gather_neighbours(x, b.sub[:, :, None])[:, :, 0]
            fin = fin_all.gather(1, b.sub)
        else:
            fin = fin_all
        B, n, D = x.shape
        # each particle's extrapolation from the last fit (into the buffer's second half on the rows path), which
        # replaces a non-finite particle
        out = b.fill[1] if rows else None
        if b.count >= 2:
            guess = torch.mul(b.v, (t_now - b.tc).to(b.dtype), out=out).add_(b.xc)
        elif b.count == 1:
            guess = b.pos[0] if out is None else out.copy_(b.pos[0])
        else:
            guess = torch.zeros_like(x) if out is None else out.zero_()
        x = pt.take_rows(b.fill, fin) if rows else torch.where(fin[..., None], x, guess)
        # the step length: the median particle's distance moved since the last snapshot (its log, for the
        # growth test), and the particles moving most (the units of an instability event), over a fixed
        # sample of at most ~2 x _GROWTH_SAMPLE particles (every stride-th; all of a small group)
        if b.count >= 1 and self.growth > 0:
            stride = max(1, x.shape[1] // _GROWTH_SAMPLE)
            xs = x[:, ::stride]
            sq = (xs - b.pos[(b.count - 1) % L, :, ::stride]).square().sum(-1)  # (B, ~n / stride)
            # the square of the median step (its log: in _update), floored at the coordinates' float resolution:
            # steps of a few ulps (a group that does not move) rise and fall by whole factors, which is no growth
            res = (16 * torch.finfo(b.dtype).eps) * xs.abs().amax((1, 2))
            med_sq = torch.maximum(sq.median(1).values, res * res).double()
            fast = self._units_of(sq)
            fast_units = self._map_units(b, torch.where(fast >= 0, fast * stride, fast))
        else:
            med_sq, fast_units = None, None
        slot = b.count % L
        advanced = self._advance_fit(b, slot, x)
        b.pos[slot] = x
        b.times[slot] = t_now
        th = self._t_host
        if b.times_host is not None and th is not None:
            b.times_host[slot] = th
        else:
            b.times_host = None
        b.count += 1
        filled = min(b.count, L)
        nonf = nonfinite.double()
        if b.const is None:
            f64 = dict(dtype=torch.float64, device=dev)
            b.const = (
                torch.full((B,), math.inf, **f64),
                torch.zeros(B, **f64),
                torch.full((B,), math.nan, **f64),
                torch.full((B, self.units), -1, dtype=torch.long, device=dev),
            )
        inf_b, zero_b, nan_b, none_units = b.const
        msq = nan_b if med_sq is None else med_sq
        gunits = none_units if fast_units is None else fast_units

        def pack(
            T: Tensor, sdT: Tensor, traw: Tensor, strength: Tensor, coll: Tensor, nu: Tensor, units: Tensor
        ) -> tuple[Tensor, Tensor]:
            feat = torch.stack([T, sdT, traw, strength, coll, nonf, nu, msq], 1)
            return feat, torch.cat([units, nf_units, gunits], 1)

        if b.count < 3:
            return pack(inf_b, inf_b, inf_b, zero_b, zero_b, nan_b, none_units)
        # ---- least-squares fit over the window: on CPU from running sums of displacements, advanced by this
        # snapshot (O(B n D)) and rebuilt from the ring every L updates; elsewhere one product over the ring
        if b.times_host is not None:
            w, tc_h, var_iid, var_walk = pt.window_fit_weights(b.times_host, filled, b.dtype, dev)
            tc = torch.full((), tc_h, dtype=torch.float64, device=dev)
            tn: list[Any] = b.times_host
        else:
            ws_t, wm_t, tc, var_iid, var_walk = pt.window_weights(b.times, filled)
            w = torch.stack([wm_t[:filled], ws_t[:filled]])
            tn = [b.times[i] for i in range(L)]
        if advanced:
            assert b.fit_sums is not None and b.times_host is not None
            ref = b.fit_ref
            xv = pt.fit_from_sums(b.fit_sums, b.pos[ref], L, tc_h - b.times_host[ref], var_iid)
        elif filled == L and b.times_host is not None and pt.large_on_cpu(b.pos[0].numel(), dev):  # from the ring
            t0, rel = pt.relative_times(b.times_host)
            xv, b.fit_sums = pt.fit_window_sums(b.pos, rel, slot, tc_h - t0, var_iid)
            b.fit_count, b.fit_ref = b.count, slot
        else:
            xv = pt.fit_window(b.pos if filled == L else b.pos[:filled], w)
            b.fit_sums = None
        xc, v = xv.unbind(0)
        b.xc, b.v, b.tc = xc, v, tc
        dt_now = t_now - tc
        # ---- noise statistics, every NOISE_EVERY updates (they are averaged over 2L updates anyway)
        k_noise = min(7, L, b.count)
        full = k_noise == min(7, L)
        if b.derived is None or b.noise_count == 0 or not full or b.count % self._NOISE_EVERY == 0:
            self._noise_block(b, xc, v, dt_now, k_noise, full, tn, var_iid, var_walk)
        assert b.derived is not None
        sd_v, sd_m, nu, nu_sig, floor_m = b.derived.unbind(0)
        k_eff = min(K, n - 1)
        if k_eff < 1 or b.count < L:  # forecasts only from full windows
            return pack(inf_b, inf_b, inf_b, zero_b, zero_b, nu, none_units)
        method = self.method
        if method == "auto":
            method = "jacobian" if (D <= 3 and k_eff >= 2 * D + 1) else "pairs"
        sdv = sd_v.to(b.dtype)
        if D == 1 and method == "jacobian":
            kw = min(K, n)
            lam, sxx, var_fit, dxs, dvs = pt.local_rates_1d(xc[..., 0], v[..., 0], kw)
            if kw >= 4:  # enough residual degrees of freedom: measure the velocity noise directly
                sdv = torch.sqrt(var_fit + floor_m * var_iid).to(b.dtype)
            se = sdv[:, None] * torch.rsqrt(sxx.clamp_min(torch.finfo(b.dtype).tiny))
            ztests = n
            r2, dot = dxs * dxs, dxs * dvs  # adjacent pairs in sorted order
        else:
            if b.knn is None or b.knn.shape[-1] != k_eff:
                b.knn = pt.knn(xc, k_eff)
            else:  # refresh a round-robin slice (>= 64 rows) of the lists; each is <= `knn_every` updates old
                per = min(n, max(64, -(-n // self.knn_every)))
                period = max(1, (per * self.knn_every) // n)
                if (b.count - L) % period == 0:
                    start = (((b.count - L) // period) * per) % n
                    rows = torch.arange(start, min(start + per, n), device=dev)
                    b.knn[:, rows] = pt.knn(xc, k_eff, rows)
                    b.pairs = None
            if method == "jacobian":
                lam, se, sdv, r2, dot = pt.local_rates_jacobian(xc, v, b.knn, sdv, sd_m.to(b.dtype))
                ztests = n
            else:
                if b.pairs is None or b.pairs[0] is not b.knn:  # lists replaced, moved, loaded or refreshed
                    b.pairs = (b.knn, pt.pair_index(b.knn))
                r2, dot = pt.pair_stats(pt.feature_major(xv), b.knn, b.pairs[1])
                ztests = n * k_eff
        z = pt.bonferroni_z(self.alpha, ztests)
        if method == "pairs":
            lam, se, coll = pt.pairs_rates_and_collapse(
                r2, dot, dt_now, sdv, sd_m.to(b.dtype), nu_sig.to(b.dtype), z
            )
            if self.coherence > 0 and k_eff >= 3:  # the rate counts only where the neighbourhood compresses
                fin = fin & pt.coherent_compression(r2, dot, self.coherence)
        else:
            coll = pt.collapse_pairs(r2, dot, dt_now, sdv, sd_m.to(b.dtype), nu_sig.to(b.dtype), z)
            if D > 1:  # the smallest of D noisy eigenvalues sits ~sqrt(2(D - 1)) SEs below zero: add it
                se = se * (1.0 + math.sqrt(2.0 * (D - 1)) / z)
        rank = min(self.rank, n)
        n_coll = max(rank, math.ceil(self.collective * n))
        tau, strength, units, sd_tau, tau_c = pt.reduce_group(
            lam, se, fin, z, rank, self.quantile, self.units, n_coll
        )
        tau = tau.double()
        if n_coll > rank:  # not a collective crossing within the horizon: no forecast
            due = (tau_c.double() - dt_now) <= self.horizon * self._g["rate"]
            tau = torch.where(due, tau, math.inf)
        return pack(
            tc + tau,
            sd_tau.double(),
            tau - dt_now,
            strength.double(),
            coll.double(),
            nu,
            self._map_units(b, units),
        )

    def _advance_fit(self, b: _Bucket, slot: int, x: Tensor) -> bool:
        """Advance the bucket's running fit sums by ``x``, about to replace ring slot ``slot``: the window fit
        then costs O(B n D) instead of a read of the whole ring. ``False`` (not advanced) when they are to be
        rebuilt from the ring instead: every ``L`` updates (which bounds their rounding drift, and before their
        reference snapshot leaves the ring), and whenever they are not current (none yet, a ring not full, a
        state saved without them, times not known on the host). Only where they pay (``pt.large_on_cpu``)."""
        th, L = self._t_host, b.L
        current = b.fit_sums is not None and b.fit_count == b.count and b.times_host is not None and th is not None
        if not current or b.count < L or (b.count + 1) % L == 0 or not pt.large_on_cpu(x.numel(), x.device):
            return False
        ref = b.fit_ref
        t_ref = b.times_host[ref]
        pt.advance_fit_sums(b.fit_sums, x, b.pos[slot], b.pos[ref], th - t_ref, th - b.times_host[slot])
        b.fit_count = b.count + 1
        return True

    def _noise_block(
        self,
        b: _Bucket,
        xc: Tensor,
        v: Tensor,
        dt_now: Tensor,
        k_noise: int,
        full: bool,
        tn: list[Any],
        var_iid: Any,
        var_walk: Any,
    ) -> None:
        """Update a bucket's noise estimates and the quantities derived from them (``b.derived``)."""
        L, B = b.L, len(b.names)
        n, D = b.n, b.D
        stride = max(1, -(-n * D // 256))  # a bounded subset: <= 256 values per group
        slots = [(b.count - 1 - i) % L for i in range(k_noise)]
        snaps = [b.pos[s_, :, ::stride].reshape(B, -1) for s_ in slots]
        d_inst, m_inst = pt.noise_update(snaps, [tn[s_] for s_ in slots])
        # a running mean, then an exponential one over 2 windows; estimates from fewer snapshots than the full
        # stencil only seed it (they attribute all noise to diffusion)
        b.noise_count = 1 if not full else b.noise_count + 1
        beta = 1.0 / min(b.noise_count, max(2 * L // self._NOISE_EVERY, 1))
        dev_d = d_inst - b.noise_d
        b.noise_d = b.noise_d + beta * dev_d
        b.noise_m = b.noise_m + beta * (m_inst - b.noise_m)
        b.noise_dvar = b.noise_dvar + beta * (dev_d * dev_d * (1.0 - beta) - b.noise_dvar)
        # the pooled scatter of the newest snapshot about the fitted lines now: a conservative position noise
        resid_now = snaps[0] - (xc[:, ::stride] + v[:, ::stride] * dt_now.to(b.dtype)).reshape(B, -1)
        b.noise_pos = pt.mad_var(resid_now)
        floor_m = (16 * torch.finfo(b.dtype).eps * xc.abs().amax((1, 2)).double()) ** 2  # float resolution
        d_rate = b.noise_d.clamp_min(0)
        sd_v = torch.sqrt((b.noise_m.clamp_min(0) + floor_m) * var_iid + d_rate * var_walk)
        # viscosity for the viscous-width test: only where the diffusion rate stands out of its estimation
        # scatter (successive estimates share a seven-snapshot stencil, so few of them are independent)
        n_eff = max(1.0, min(b.noise_count, 2 * L / self._NOISE_EVERY) * self._NOISE_EVERY / 7.0)
        nu_sig = 0.5 * (b.noise_d - 3.0 * torch.sqrt(b.noise_dvar.clamp_min(0) / n_eff)).clamp_min(0)
        sd_m = torch.sqrt(b.noise_pos + floor_m)
        b.derived = torch.stack([sd_v, sd_m, 0.5 * d_rate, nu_sig, floor_m])

    def _map_units(self, b: _Bucket, units: Tensor) -> Tensor:
        if b.sub is None:
            return units
        mapped = b.sub.gather(1, units.clamp_min(0))
        return torch.where(units >= 0, mapped, units)

    def _units_of(self, score: Tensor) -> Tensor:
        """Indices of the particles with positive ``score`` (up to ``units``), ``-1`` padded."""
        B, n = score.shape
        k = min(self.units, n)
        top = torch.topk(score, k, dim=1)
        u = torch.where(top.values > 0, top.indices, -1)
        if k < self.units:
            u = torch.cat([u, torch.full((B, self.units - k), -1, dtype=u.dtype, device=u.device)], 1)
        return u

    def _traj_update(self, q: Tensor, t_now: Tensor) -> tuple[Tensor, Tensor]:
        """Trajectory view: its feature row ``(8,)`` and the Burgers-consistency slope (0-d)."""
        dev = self._device
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = q.to(device=dev, dtype=dtype)
        P, L, M = q.shape[0], self.window, self.trajectory_window
        tr = self._traj
        if tr is None or tr["ring"].shape[1] != P or tr["ring"].dtype != dtype:
            if tr is not None:
                warnings.warn(
                    f"The trajectory changed size from {tr['ring'].shape[1]} to {P}; its history restarts.",
                    stacklevel=4,
                )
            tr = self._traj = {
                "ring": torch.zeros(L, P, dtype=dtype, device=dev),
                "times": torch.zeros(L, dtype=torch.float64, device=dev),
                "times_host": [0.0] * L,
                "count": 0,
                "hist_t": torch.full((M,), math.nan, dtype=torch.float64, device=dev),
                "hist_s": torch.full((M,), math.nan, dtype=torch.float64, device=dev),
                "hist_v": torch.full((M,), math.nan, dtype=torch.float64, device=dev),
                "hcount": 0,
            }
            self._hist_count[0] = 0
        fin = pt.finite(q)
        nonfinite = ~fin.all()
        slot = tr["count"] % L
        prev = tr["ring"][(tr["count"] - 1) % L] if tr["count"] > 0 else torch.zeros_like(q)
        tr["ring"][slot] = torch.where(fin, q, prev)
        tr["times"][slot] = t_now
        if tr["times_host"] is not None and self._t_host is not None:
            tr["times_host"][slot] = self._t_host
        else:
            tr["times_host"] = None
        tr["count"] += 1
        filled = min(tr["count"], L)
        f64 = dict(dtype=torch.float64, device=dev)
        nonf = nonfinite.double().reshape(())
        nan = torch.full((), math.nan, **f64)
        inf = torch.full((), math.inf, **f64)
        zero = torch.zeros((), **f64)
        if filled < 5:
            return torch.stack([inf, inf, inf, zero, zero, nonf, nan, nan]), nan
        s, var_s, tbar = tj.path_rate(tr["ring"], tr["times"], filled, 4.0, tr["times_host"])
        hs = tr["hcount"] % M
        tr["hist_t"][hs] = tbar
        tr["hist_s"][hs] = s.double()
        tr["hist_v"][hs] = var_s.double()
        tr["hcount"] += 1
        inflate = math.sqrt(L / 2.0)
        b, se, t_star = tj.riccati_fit(
            tr["hist_t"], tr["hist_s"], tr["hist_v"], max(4, self.riccati_window // 2), inflate
        )
        ok = pt.finite(t_star) & (b - 3.0 * se > 0)
        T = torch.where(ok, t_star, inf)
        strength = torch.where(ok, b / se.clamp_min(1e-300), zero)
        return torch.stack([T, inf, T - t_now, strength, zero, nonf, nan, nan]), b

    # ------------------------------------------------------------------ outputs
    def _group_names(self) -> list[str]:
        return self._names

    def forecast(self) -> dict[str, Tensor]:
        """Predicted shock step per group and ``"trajectory"``, as 0-d device tensors (``inf`` when none)."""
        if self._device is None:
            return {TRAJECTORY: torch.tensor(math.inf, dtype=torch.float64)}
        pred = self._g["pred"].clone()  # an ordinary tensor (the state is an inference tensor)
        return {nm: pred[i] for i, nm in self._ordered()}

    def _ordered(self) -> list[tuple[int, str]]:
        items = [(i, nm) for i, nm in enumerate(self._names) if i > 0 and nm not in self._retired]
        return items + [(0, TRAJECTORY)]

    def summary(self) -> dict[str, Tensor]:
        """0-d device tensors for logging (no host sync). The keys, ``<group>`` in first-seen order:

        - ``forecast/<group>``: steps to the predicted shock (``inf`` when none; 0 once its time is reached),
          for each group and ``trajectory``;
        - ``viscosity/<group>``: ``nu = D_hat/2`` in the tracker's time units (``nan`` until estimated);
        - ``state/<group>``: 0 pre, 1 imminent, 2 in-shock, for each group and ``trajectory``;
        - ``growth/<group>``: growth rate of the group's median step length, per update (the log-linear slope
          over the last ``growth_window`` updates; ``nan`` until they are there, or with ``growth=0``);
        - ``burgers_consistency``: fitted slope of ``d(1/s)/dt`` on the trajectory (1 for Burgers; ``nan``
          until enough data);
        - ``steps_to_shock``: the minimum of the ``forecast/`` values;
        - ``shock``: 1.0 if any group is in-shock, else 0.0.
        """
        if self._device is None:
            inf = torch.tensor(math.inf, dtype=torch.float64)
            return {
                f"forecast/{TRAJECTORY}": inf,
                f"state/{TRAJECTORY}": torch.tensor(0.0, dtype=torch.float64),
                "burgers_consistency": torch.tensor(math.nan, dtype=torch.float64),
                "steps_to_shock": inf,
                "shock": torch.tensor(0.0, dtype=torch.float64),
            }
        g = self._g
        out: dict[str, Tensor] = {}
        steps, nu = g["steps"].clone(), g["nu"].clone()  # ordinary tensors (the state is an inference tensor)
        for i, nm in self._ordered():
            out[f"forecast/{nm}"] = steps[i]
        for i, nm in self._ordered():
            if i > 0:
                out[f"viscosity/{nm}"] = nu[i]
        state = g["state"].double()
        for i, nm in self._ordered():
            out[f"state/{nm}"] = state[i]
        grate = g["grate"].clone()
        for i, nm in self._ordered():
            if i > 0:
                out[f"growth/{nm}"] = grate[i]
        out["burgers_consistency"] = g["consistency"].clone()
        out["steps_to_shock"] = steps.amin()
        out["shock"] = (g["state"] == al.IN_SHOCK).any().double()
        return out

    def poll(self) -> list[ShockEvent]:
        """Events since the last poll, in step order. The one host synchronisation (one transfer)."""
        blob = self.poll_tensor()
        return [] if blob is None else self.poll_host(blob.cpu())

    def poll_tensor(self) -> Tensor | None:
        """The device tensor :meth:`poll` reads (event counter and ring), for a caller that copies it to the host
        together with other values (``ShockMonitor``: one transfer per log step); ``None`` before the first
        update. Hand the host copy to :meth:`poll_host`."""
        if self._device is None:
            return None
        g = self._g
        return torch.cat([g["counter"].double().reshape(1), g["buf"].reshape(-1)])  # the ring is float64

    def poll_host(self, blob: Tensor | np.ndarray) -> list[ShockEvent]:
        """The events since the last poll from a host copy of :meth:`poll_tensor` (marks them read)."""
        blob = torch.as_tensor(blob, dtype=torch.float64)
        cap = self.capacity
        total = int(blob[0])
        buf = blob[1:].reshape(cap + 1, -1)
        start = self._read
        if total - start > cap:
            dropped = total - start - cap
            warnings.warn(
                f"BurgersTracker dropped {dropped} events: more than capacity={cap} between polls. "
                "Poll more often or "
                "raise `capacity`.",
                stacklevel=2,
            )
            start = total - cap
        events = []
        for c in range(start, total):
            row = buf[c % cap].tolist()
            gi, kind = int(row[1]), int(row[2])
            name = self._names[gi] if 0 <= gi < len(self._names) else str(gi)
            channel = "input" if kind == al.KIND_DIVERGENCE else (TRAJECTORY if gi == 0 else "particle")
            units = tuple(int(u) for u in row[al.ROW_FIXED :] if u >= 0)
            events.append(
                ShockEvent(_KINDS[kind], name, channel, int(row[0]), float(row[3]), float(row[4]), units)
            )
        self._read = total
        return events

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict[str, Any]:
        keys = (
            "horizon window neighbors alpha rank collective quantile coherence method time n_on n_off disarm_horizon "
            "cooldown warmup "
            "shock_updates riccati_window trajectory_window trajectory_alerts growth growth_window max_particles"
            " knn_every units capacity seed"
        ).split()
        return {k: getattr(self, k) for k in keys}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: configuration, groups, histories, alert state and unread events."""
        return {
            "version": self.VERSION,
            "config": self._config(),
            "device": None if self._device is None else str(self._device),
            "names": list(self._names),
            "retired": sorted(self._retired),
            "shape": {k: (n, D, str(dt).replace("torch.", "")) for k, (n, D, dt) in self._shape.items()},
            "buckets": [b.to_dict() for b in self._buckets],
            "hist_count": list(self._hist_count),
            "last_step": self._last_step,
            "traj": None if self._traj is None else {k: copy.copy(v) for k, v in self._traj.items()},
            "g": dict(self._g),
            "read": self._read,
            "t_host": self._t_host,
            "rate_host": self._rate_host,
            "growth_log_lr": self._growth_log_lr,
        }

    def load_state_dict(self, d: Mapping[str, Any], *, settings: str = "saved") -> None:
        """Restore from :meth:`state_dict` (tensors are moved to the device they were saved from, or kept).

        Args:
            d: a :meth:`state_dict`.
            settings: ``"saved"`` (default): take every setting from ``d``, so the tracker goes on exactly as
                the one that saved it. ``"current"``: keep this tracker's thresholds (``horizon``, ``alpha``,
                ``n_on``, ...) and take from ``d`` only the settings its layout depends on (``window``,
                ``riccati_window``, ``trajectory_window``, ``time``, ``max_particles``, ``seed``, ``units``,
                ``capacity``); a warning names every setting that differs, and which value is used. This is
                how :class:`~shockmon.ShockMonitor` resumes: the settings it was built with apply.

        A state saved before a setting existed resumes with the value that reproduces how it was made
        (``coherence=0``, ``collective=0``, ``trajectory_alerts=True``), with a warning naming them.

        Example:
            >>> import torch, warnings
            >>> src = BurgersTracker(horizon=50)
            >>> src.update(0, {"a": torch.randn(10)})
            >>> BurgersTracker().load_state_dict(src.state_dict())  # everything from the state: horizon 50
            >>> mine = BurgersTracker(horizon=80)
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     mine.load_state_dict(src.state_dict(), settings="current")
            >>> mine.horizon, "horizon=80.0 (saved: 50.0)" in str(caught[0].message)
            (80.0, True)
        """
        if not isinstance(settings, str) or settings not in _SETTINGS_FROM:
            raise ValueError(f"Expected argument `settings` to be one of {_SETTINGS_FROM}, but got {settings!r}")
        with torch.inference_mode():  # the state tensors are inference tensors (see update)
            self._load_state_dict(d, settings)

    def _resumed_config(self, saved: Mapping[str, Any], settings: str) -> dict[str, Any]:
        """The configuration to resume ``saved`` with (see :meth:`load_state_dict`); warns about what differs."""
        mine = self._config()
        unknown = sorted(k for k in saved if k not in mine)
        if unknown:
            raise ValueError(
                f"BurgersTracker state has settings this version does not know: {unknown} (saved by a newer"
                " shockmon?); expected only " + ", ".join(mine)
            )
        if settings == "saved":
            missing = {k: v for k, v in _LEGACY_SETTINGS.items() if k not in saved}
            if missing:
                warnings.warn(
                    "BurgersTracker state saved before the setting(s) "
                    + ", ".join(f"`{k}`" for k in missing)
                    + " existed: resuming with "
                    + ", ".join(f"{k}={v!r}" for k, v in missing.items())
                    + ", the behaviour it was saved with.",
                    stacklevel=4,
                )
            return {**mine, **missing, **saved}
        cfg = {**mine, **{k: saved[k] for k in _LAYOUT_SETTINGS if k in saved}}
        kept = [f"{k}={mine[k]!r} (saved: {saved[k]!r})" for k in mine if k in saved and k not in _LAYOUT_SETTINGS
                and saved[k] != mine[k]]
        forced = [f"{k}={saved[k]!r} (yours: {mine[k]!r})" for k in _LAYOUT_SETTINGS if k in saved
                  and saved[k] != mine[k]]
        if kept or forced:
            parts = []
            if kept:
                parts.append("keeping this tracker's " + ", ".join(kept))
            if forced:
                parts.append("keeping the saved " + ", ".join(forced) + ": the saved history is laid out by it")
            warnings.warn("BurgersTracker resumed with other settings than it was saved with: " + "; ".join(parts)
                          + ".", stacklevel=4)
        return cfg

    def _load_state_dict(self, d: Mapping[str, Any], settings: str = "saved") -> None:
        version = d.get("version")
        if version != self.VERSION:
            raise ValueError(
                f"Expected a BurgersTracker state_dict of version {self.VERSION}, but got {version!r}"
            )
        cfg = self._resumed_config(d["config"], settings)
        if cfg != self._config():
            self.__init__(**cfg)  # type: ignore[misc]
        self.reset()
        if d["device"] is None:
            return
        first = next(iter(d["g"].values()))
        dev = first.device
        self._device = dev
        self._names = list(d["names"])
        self._retired = set(d.get("retired", ()))  # absent from states saved before drop() existed
        self._shape = {k: (int(n), int(D), getattr(torch, dt)) for k, (n, D, dt) in d["shape"].items()}
        self._buckets = [_Bucket.from_dict(bd, dev) for bd in d["buckets"]]
        self._reindex()
        self._hist_count = list(d["hist_count"])
        self._last_step = d["last_step"]
        traj = d["traj"]
        self._traj = (
            None
            if traj is None
            else {k: (v.clone() if isinstance(v, Tensor) else copy.copy(v)) for k, v in traj.items()}
        )
        self._g = {k: v.clone() for k, v in d["g"].items()}
        if "grow" not in self._g:  # saved before the growth test existed: its history starts now
            self._g.update(self._growth_state(len(self._names), dev))
        self._read = int(d["read"])
        self._t_host = d["t_host"]
        self._rate_host = d["rate_host"]
        glr = d.get("growth_log_lr", 0.0)  # absent from states saved before the growth test
        self._growth_log_lr = glr.to(dev).clone() if isinstance(glr, Tensor) else glr

    def __getstate__(self) -> dict[str, Any]:
        return self.state_dict()

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__init__(**d["config"])  # type: ignore[misc]
        self.load_state_dict(d)

    def __repr__(self) -> str:
        groups = [nm for nm in self._names[1:]]
        return f"BurgersTracker(horizon={self.horizon:g}, window={self.window}, groups={groups})"
