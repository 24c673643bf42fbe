"""``ShockMonitor``: the Lightning callback that observes, tracks and logs.

Thin glue: :class:`shockmon.observer.Observer` computes the observables,
:class:`shockmon.tracker.BurgersTracker` tracks them; this callback decides *when* (optimizer steps, log
steps) and *where* (loggers, TensorBoard extras, ``trainer.callback_metrics``).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

from shockmon.callbacks import snapshots
from shockmon.callbacks import tensorboard as tb
from shockmon.callbacks._state import check_state_version
from shockmon.callbacks.transfer import to_host
from shockmon.events import EventKind, ShockEvent

if TYPE_CHECKING:
    from shockmon.observer import Observer
    from shockmon.tracker import BurgersTracker

#: ``listener(trainer, monitor, new_events)``, called on every rank after each host read.
Listener = Callable[["pl.Trainer", "ShockMonitor", list[ShockEvent]], None]


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if allow_none:
            what += " or None"
        raise ValueError(f"Expected argument `{name}` to be {what}, but got {value!r}")


#: version of the layout of :meth:`ShockMonitor.state_dict` (a checkpoint without the field is version 0: the same
#: layout, written before the field existed)
STATE_VERSION = 1

#: ``(name, id, shape, dtype, device, requires_grad)`` of every parameter: host metadata, read without a sync
ParamSignature = tuple[tuple[str, int, tuple[int, ...], Any, Any, bool], ...]


def _lazy_parameters(module: Any) -> list[str]:
    """Names of the parameters of lazy modules that are not initialised yet (no shape until a forward pass)."""
    return [n for n, p in module.named_parameters() if is_lazy(p)]


def _param_signature(module: Any) -> ParamSignature:
    return tuple(
        (n, id(p), tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in module.named_parameters()
    )


def _describe_change(old: ParamSignature, new: ParamSignature, limit: int = 6) -> str:
    """What differs between two parameter signatures, in words (at most ``limit`` items)."""
    before, after = {e[0]: e for e in old}, {e[0]: e for e in new}
    items = [f"added {n!r} {list(after[n][2])}" for n in after if n not in before]
    items += [f"removed {n!r}" for n in before if n not in after]
    for n in after:
        if n not in before or before[n] == after[n]:
            continue
        (_, i0, s0, d0, v0, g0), (_, i1, s1, d1, v1, g1) = before[n], after[n]
        what = []
        if s0 != s1:
            what.append(f"shape {list(s0)} -> {list(s1)}")
        if d0 != d1:
            what.append(f"dtype {d0} -> {d1}".replace("torch.", ""))
        if v0 != v1:
            what.append(f"device {v0} -> {v1}")
        if g0 != g1:
            what.append("unfrozen" if g1 else "frozen")
        if i0 != i1 and not what:
            what.append("replaced by a new tensor")
        items.append(f"{n!r} {', '.join(what)}")
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _tensorboard_dirs(loggers: Any) -> list[str]:
    """The local log directories of the TensorBoard loggers (remote ones, ``s3://``..., are not checked)."""
    from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
    from lightning.pytorch.loggers import TensorBoardLogger

    dirs = []
    for logger in loggers:
        if isinstance(logger, (TensorBoardLogger, FabricTensorBoardLogger)):
            path = str(logger.log_dir)
            if "://" not in path or path.startswith("file://"):
                dirs.append(path[len("file://") :] if path.startswith("file://") else path)
    return dirs


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot take event files (``None`` when it can): created if missing, then a file written."""
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            return "no write permission"
        with tempfile.NamedTemporaryFile(dir=path, prefix=".shockmon_write_check_"):
            pass
    except OSError as err:
        return f"{err.strerror or type(err).__name__}: {err.filename or path!r}"
    return None


_SUPPORTED = (
    "SingleDeviceStrategy (one device), DDPStrategy ('ddp', 'ddp_spawn', 'ddp_fork', 'ddp_notebook') and"
    " ModelParallelStrategy with FSDP2 `fully_shard` in `configure_model` (tensor_parallel_size=1)"
)


def _check_strategy(strategy: Any) -> None:
    """Raise (at ``setup``) for a strategy whose parameters or collectives shockmon cannot follow yet."""
    from lightning.pytorch import strategies as S

    why = ""
    if isinstance(strategy, S.DeepSpeedStrategy):  # a DDPStrategy subclass: test it first
        why = "ZeRO keeps parameters and gradients in partitioned flat buffers"
    elif isinstance(strategy, S.XLAStrategy):  # a DDPStrategy subclass too
        why = "shockmon is not tested on multi-device XLA"
    elif isinstance(strategy, S.FSDPStrategy):
        why = (
            "FSDP1 flat parameters split weight rows across ranks, so per-head Gram blocks cannot be"
            " completed from partial sums without gathering parameters; use ModelParallelStrategy with FSDP2"
            " `fully_shard`"
        )
    elif isinstance(strategy, S.ModelParallelStrategy):
        try:
            mesh = strategy.device_mesh
        except RuntimeError:  # not set up: nothing to check yet
            mesh = None
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        tp = mesh["tensor_parallel"].size() if mesh is not None and "tensor_parallel" in names else 1
        if tp > 1:
            why = (
                f"tensor_parallel_size={tp} shards weights by columns; only data-parallel sharding by rows"
                " (tensor_parallel_size=1) is supported"
            )
    elif not isinstance(strategy, (S.SingleDeviceStrategy, S.DDPStrategy)):
        why = "it is none of the strategies shockmon follows"
    if why:
        raise MisconfigurationException(
            f"ShockMonitor does not support the strategy {type(strategy).__name__}: {why}."
            f" Supported: {_SUPPORTED}."
        )


def _check_kwargs(name: str, kw: Mapping[str, Any] | None, module: str, cls: str, own: tuple[str, ...]) -> None:
    """Keys of ``tracker_kwargs``/``observer_kwargs`` must be arguments of the class (values: checked by it)."""
    if not kw:
        return
    import importlib

    params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    valid = [k for k in params if k not in own and k != "self"]
    for key in kw:
        if key in own:
            where = f"pass `{key}` to ShockMonitor itself" if key != "model" else "the monitor passes the model"
            raise ValueError(f"Expected argument `{name}` not to contain {key!r} ({where}), but it does")
        if key not in valid:
            raise ValueError(
                f"Expected the keys of argument `{name}` to be arguments of {cls}, one of {', '.join(valid)},"
                f" but got {key!r}"
            )


#: optimizer steps after the start of training before the monitor times its own cost (warm-up), and steps timed
COST_SKIP, COST_STEPS = 10, 100


def overhead_advice(
    hook_s: float,
    span_s: float,
    steps: int,
    every_n_steps: int,
    threshold: float,
    window: int = 16,
    read_s: float = 0.0,
    log_every: int = 50,
    growth_updates: int = 36,
) -> str | None:
    """The warning :class:`ShockMonitor` gives when its own host time per training step exceeds ``threshold``
    times the rest of the step, with the ``every_n_steps`` that would bring it under; ``None`` when it does not.

    Args:
        hook_s: seconds spent in the monitor's hooks over ``steps`` optimizer steps; span_s: the wall time of
            those steps, hooks included; every_n_steps: the stride they were measured at; threshold: the
            allowed fraction; window: the tracker's window, in observations; read_s: the part of ``hook_s``
            spent reading back and logging at log steps, which a stride does not thin (the observations' share
            scales as ``1 / every_n_steps``, the reads' as ``1 / log_every``); log_every: the log interval they
            were measured at; growth_updates: the observations the tracker's instability test spans
            (``3 * growth_window``; 0 when it is off).

    Example:
        >>> overhead_advice(0.2, 0.36, 100, 1, 0.1) is not None   # 2 ms of hooks on a 1.6 ms step
        True
        >>> overhead_advice(0.01, 1.0, 100, 1, 0.1) is None        # 0.1 ms on a 10 ms step: 1 %
        True
    """
    if steps <= 0 or span_s <= 0 or hook_s <= 0:
        return None
    rest = max(span_s - hook_s, 1e-9)
    frac = hook_s / rest
    if frac <= threshold:
        return None
    read = min(max(read_s, 0.0), hook_s) / rest
    obs = frac - read
    head = (
        f"ShockMonitor takes {1e3 * hook_s / steps:.2f} ms of host time per training step, {frac:.0%} of the"
        f" rest of the step ({1e3 * rest / steps:.2f} ms; measured over {steps} steps at every_n_steps="
        f"{every_n_steps}, log-step reads {read:.0%})."
    )
    tail = " Pass `overhead_warning=None` to silence this."
    m = 1  # the log interval's factor: only when the reads alone exceed half the allowance
    if read > threshold / 2 and log_every > 0:
        while read / m > threshold / 2:
            m *= 2
    k = every_n_steps
    while obs * every_n_steps / k + read / m > threshold:
        k *= 2
    what = f"every_n_steps={k}" + (f", log_every_n_steps={log_every * m}" if m > 1 else "")
    return (
        f"{head} `ShockMonitor({what})` would bring it to about {obs * every_n_steps / k + read / m:.0%}, at a"
        f" price in what it sees: the tracker's fits then span {window * k} steps"
        + (f" and its instability test {growth_updates * k}" if growth_updates > 0 else "")
        + ", so transitions that build up faster than that are missed, not just seen"
        f" late. Measured on shockmon's detection benchmark (README, 'Choosing every_n_steps'): at"
        f" every_n_steps=2 every loss-spike alert was lost, at 8 every alert.{tail}"
    )


class ShockMonitor(Callback):
    r"""Forecast training phase transitions ("shocks") from symmetry-reduced observables, and log them.

    Every optimizer step (not every micro-batch under gradient accumulation; ``every_n_steps`` thins this),
    the monitor computes the model's observables on the parameters' device — gradient-side ones in
    ``on_before_optimizer_step``, before the step; parameter-side ones after it — and feeds the Burgers
    tracker. None of this reads anything back to the host, and what only a read needs (gradient observables,
    raw parameter norms, attention spectra) is computed only for observations that will be read: at log steps
    and at a step known to be the last (``max_steps``, last batch of ``max_epochs``); the other steps check
    the gradients for non-finite values only. Every ``log_every_n_steps`` it reads everything
    back in one transfer and logs it through Lightning's logger API (so CSV and other loggers get the
    scalars), writes the TensorBoard extras, puts the gating signals in ``trainer.callback_metrics`` and hands
    new events to listeners such as :class:`~shockmon.ShockEarlyStopping`. At the end of training a last read
    logs what happened after the last log step. Validation, test, predict and sanity checking are not
    observed.

    Faults. Non-finite parameters (from a NaN loss or gradient that the optimizer applied) are a
    ``divergence`` event at the step they appear; non-finite gradients alone are counted and warned about once
    (a loss scaler skips such steps). When the model's parameters change during fit (a layer added, removed or
    replaced, a parameter frozen or unfrozen, the model moved to another device or dtype), the change is seen
    from host metadata before the next observation (no sync), warned about with what changed, and the observer
    is rebuilt; tracked groups whose units changed restart their history. A local TensorBoard log directory that
    cannot take files is an error at ``setup``, before training.

    Distributed (``"ddp"``, ``"ddp_spawn"``, ``"ddp_fork"``; FSDP2 ``fully_shard`` in ``configure_model``
    under ``ModelParallelStrategy``): every rank computes the same observables and runs the same tracker, so
    events and decisions agree without communication, and only rank zero writes to the loggers. Under DDP the
    monitor communicates nothing; with sharded parameters each observation completes its partial sums with
    one all-reduce of O(units) bytes per round (``observer.rows`` counts bytes and rounds). Other strategies
    are refused at ``setup``.

    Logged tags (``<prefix>`` is ``shockmon`` by default; the step is ``trainer.global_step``):

    ============================================  ======================================================
    tag                                           meaning
    ============================================  ======================================================
    ``<prefix>/quotient/<family>/<module>/<n>``   a quotient (symmetry-invariant) observable
    ``<prefix>/quotient/<family>/<g>/grad_norm``  quotient gradient norm of a group (before the step)
    ``<prefix>/raw/<parameter or module>...``     the naive (not invariant) counterparts
    ``<prefix>/dynamics/...``                     observables that need history (drift, effective LR)
    ``<prefix>/forecast/<group>``                 steps until the group's forecast shock (inf: none)
    ``<prefix>/viscosity/<group>``                estimated viscosity of the group
    ``<prefix>/state/<group>``                    0 before, 1 shock imminent, 2 in shock
    ``<prefix>/growth/<group>``                   growth rate of the group's step length per update
                                                  (an ``instability`` event when it runs away)
    ``<prefix>/burgers_consistency``              how Burgers-like (Riccati-consistent) the run is
    ``<prefix>/steps_to_shock``                   minimum of the forecasts [#cm]_ (and the progress bar)
    ``<prefix>/shock``                            1 while a shock is active [#cm]_
    ``<prefix>/alerts``                           events so far [#cm]_
    ``<prefix>/alerts/<group>``                   events so far in the group
    ``<prefix>/nonfinite_grad_steps``             observed steps with a NaN/inf gradient so far
                                                  (counted on the device every step; a ``divergence`` event
                                                  fires only when non-finite values reach the parameters)
    ``<prefix>/particles/<group>``                tensor summary (plugin ``shockmon``), TensorBoard only: a
                                                  ``(k, 2)`` array of unit index and coordinate 0 of at most
                                                  ``snapshot_units`` units (a fixed evenly spaced subset)
    ``<prefix>/characteristics/<group>``          image, TensorBoard only, at the end of fit, for each
                                                  alerted group: its characteristic diagram (matplotlib)
    ============================================  ======================================================

    .. [#cm] also in ``trainer.callback_metrics`` (for ``EarlyStopping``, ``ModelCheckpoint``).

    TensorBoard loggers also get the texts ``<prefix>/alert_text`` (a markdown table of the new events at each
    log step: kind, group, view, forecast shock step, lead, strength, units) and ``<prefix>/symmetry_report``
    (at fit start), histograms ``<prefix>/quotient/.../sorted`` of per-unit invariants
    (``histogram_every_n_steps``) and a custom-scalars layout: quotient beside raw per module, forecast beside
    alerts per group.

    Args:
        log_every_n_steps: read back and log every this many optimizer steps; ``None``: the Trainer's
            ``log_every_n_steps``; ``0``: only at the end of training.
        histogram_every_n_steps: per-unit histograms at the first log step after each multiple of this;
            ``None``: ten log intervals; ``0``: never.
        every_n_steps: observe every this many optimizer steps (1: every step). A log step that is not observed
            reads the latest observation and logs it at the step it was made. A stride thins what the tracker
            sees, not only its cost: its windows count observations, so they span ``every_n_steps`` times more
            steps. Replayed on the detection benchmark's recordings (README, "Choosing every_n_steps"), 2 lost
            every loss-spike alert (recall 0.70 -> 0.07; condensation still seen), 8 and 16 every alert.
        horizon: the tracker's forecast horizon, in steps.
        window: the tracker's fitting window, in observations.
        prefix: tag prefix; also identifies the instance in checkpoints, so two monitors need two prefixes.
        progress_bar: show ``<prefix>/steps_to_shock`` on the progress bar.
        print_summary: print the symmetry summary at fit start (rank zero).
        max_events: how many past events :attr:`events` keeps (and checkpoints).
        snapshot_units: per group, how many units' coordinate 0 each log step writes to TensorBoard
            (``<prefix>/particles/<group>``, read by ``shockmon report`` for characteristic diagrams); taken
            from the log step's one device→host transfer; ``0``: none.
        overhead_warning: warn once (rank zero) when the monitor's host time per step, measured over optimizer
            steps 11-110 of the fit, exceeds this fraction of the rest of the step, naming the
            ``every_n_steps`` that would bring it under (a small model's step can be shorter than an
            observation); ``None``: never. It only warns: the monitor's behaviour does not depend on timing.
        tracker_kwargs: more keyword arguments for :class:`~shockmon.BurgersTracker`.
        observer_kwargs: keyword arguments for :class:`~shockmon.Observer`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from shockmon import ShockMonitor, ShockEarlyStopping
        >>> trainer = Trainer(callbacks=[ShockMonitor(), ShockEarlyStopping(monitor="val_loss")])
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        every_n_steps: int = 1,
        horizon: int = 200,
        window: int = 16,
        prefix: str = "shockmon",
        progress_bar: bool = True,
        print_summary: bool = True,
        max_events: int = 1000,
        snapshot_units: int = 64,
        overhead_warning: float | None = 0.1,
        tracker_kwargs: dict[str, Any] | None = None,
        observer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_int("log_every_n_steps", log_every_n_steps, 0, allow_none=True)
        _check_int("histogram_every_n_steps", histogram_every_n_steps, 0, allow_none=True)
        _check_int("every_n_steps", every_n_steps, 1)
        _check_int("horizon", horizon, 1)
        _check_int("window", window, 3)
        _check_int("max_events", max_events, 0)
        _check_int("snapshot_units", snapshot_units, 0)
        if not isinstance(prefix, str) or not prefix or prefix != prefix.strip("/ "):
            raise ValueError(
                "Expected argument `prefix` to be a non-empty string without leading or trailing '/',"
                f" but got {prefix!r}"
            )
        if overhead_warning is not None and (
            isinstance(overhead_warning, bool)
            or not isinstance(overhead_warning, (int, float))
            or not 0 < overhead_warning < math.inf
        ):
            raise ValueError(
                f"Expected argument `overhead_warning` to be a positive number or None, but got {overhead_warning!r}"
            )
        for name, value in (("progress_bar", progress_bar), ("print_summary", print_summary)):
            if not isinstance(value, bool):
                raise TypeError(f"Expected argument `{name}` to be a bool, but got {value!r}")
        for name, kw in (("tracker_kwargs", tracker_kwargs), ("observer_kwargs", observer_kwargs)):
            if kw is not None and not isinstance(kw, Mapping):
                raise TypeError(
                    f"Expected argument `{name}` to be a dict or None, but got {type(kw).__name__}"
                )
        _check_kwargs("tracker_kwargs", tracker_kwargs, "shockmon.tracker", "BurgersTracker", ("horizon", "window"))
        _check_kwargs("observer_kwargs", observer_kwargs, "shockmon.observer", "Observer", ("model",))
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.every_n_steps = every_n_steps
        self.horizon = horizon
        self.window = window
        self.prefix = prefix
        self.progress_bar = progress_bar
        self.print_summary = print_summary
        self.max_events = max_events
        self.snapshot_units = snapshot_units
        self.overhead_warning = None if overhead_warning is None else float(overhead_warning)
        self.tracker_kwargs = dict(tracker_kwargs or {})
        self.observer_kwargs = dict(observer_kwargs or {})
        self._make_tracker()  # validates the tracker's arguments now, not at fit time

        self._observer: Observer | None = None
        self._tracker: BurgersTracker | None = None
        self._listeners: list[Listener] = []
        self._pending_observer_state: dict[str, Any] | None = None
        self._pending_tracker_state: dict[str, Any] | None = None
        self._reset_run_state()

    # ------------------------------------------------------------------ state
    def _reset_run_state(self) -> None:
        self._log_every = 0
        self._hist_every = 0
        self._last_step = -1  # the last global_step seen at a batch end
        self._pending_grads: dict[str, Tensor] = {}
        self._drop_stale_groups = False  # after a rebuild: the tracker forgets groups the observer no longer has
        self._step_lr: float | None = None  # the learning rate the observed step applied (before a scheduler)
        self._values: dict[str, Tensor] | None = None  # the latest observation's values (device tensors)
        self._values_step = -1
        self._values_full = False  # whether the latest observation has the spectra and raw norms
        self._last_read_step = -1
        self._last_hist_step = -1
        self._layout_written = False
        self._lazy_wait = False  # lazy parameters at fit start: the observer is built after the first forward
        self._lazy_warned = False
        self._observations = 0
        self._events: deque[ShockEvent] = deque(maxlen=self.max_events)
        self._alerts = 0
        self._alerts_by_group: Counter[str] = Counter()
        self._latest: dict[str, float] = {}
        self._last_metrics: dict[str, float] = {}
        self._particles: dict[str, Tensor] = {}  # the latest observation's per-unit coordinates (device)
        self._param_signature: ParamSignature = ()
        self._followed_step = -1  # the optimizer step whose parameters were last checked (before it stepped)
        self._nonfinite_grads: Tensor | None = None  # device count of observed steps with non-finite gradients
        self._nonfinite_grads_base = 0  # the count restored from a checkpoint
        self._nonfinite_grads_read = 0  # base + the device count, at the last read
        self._nonfinite_grads_warned = False
        self._selector = snapshots.Selector(self.snapshot_units)
        # own cost, host clock: optimizer steps seen since train start, hook seconds, start of the timed span
        self._cost_steps = 0
        self._cost_hooks = 0.0
        self._cost_read = 0.0  # the part of _cost_hooks spent in log-step reads
        self._cost_start = 0.0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        observer_state = None
        if self._observer is not None and hasattr(self._observer, "state_dict"):
            observer_state = self._observer.state_dict()
        elif self._pending_observer_state is not None:
            observer_state = self._pending_observer_state
        tracker_state = (
            self._tracker.state_dict() if self._tracker is not None else self._pending_tracker_state
        )
        return {
            "version": STATE_VERSION,
            "nonfinite_grad_steps": self._nonfinite_grads_read,
            "tracker": tracker_state,
            "observer": observer_state,
            "observations": self._observations,
            "alerts": self._alerts,
            "alerts_by_group": dict(self._alerts_by_group),
            "events": [e.to_dict() for e in self._events],
            "latest": dict(self._latest),
            "last_read_step": self._last_read_step,
            "last_hist_step": self._last_hist_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint without a ``version`` field (version 0, written before it
        existed) has the same layout and loads; a newer version is refused with a clear error."""
        check_state_version("ShockMonitor", state_dict, STATE_VERSION)
        self._nonfinite_grads_base = self._nonfinite_grads_read = int(state_dict.get("nonfinite_grad_steps", 0))
        self._nonfinite_grads = None
        self._observations = int(state_dict.get("observations", 0))
        self._alerts = int(state_dict.get("alerts", 0))
        self._alerts_by_group = Counter(
            {str(k): int(v) for k, v in state_dict.get("alerts_by_group", {}).items()}
        )
        self._events = deque(
            (ShockEvent.from_dict(d) for d in state_dict.get("events", [])), maxlen=self.max_events
        )
        self._latest = {str(k): float(v) for k, v in state_dict.get("latest", {}).items()}
        self._last_read_step = int(state_dict.get("last_read_step", -1))
        self._last_hist_step = int(state_dict.get("last_hist_step", -1))
        tracker_state = state_dict.get("tracker")
        if tracker_state is not None:
            if self._tracker is not None:
                self._tracker.load_state_dict(tracker_state, settings="current")
            else:
                self._pending_tracker_state = tracker_state
        observer_state = state_dict.get("observer")
        if observer_state is not None:
            if self._observer is not None and hasattr(self._observer, "load_state_dict"):
                self._observer.load_state_dict(observer_state)
            else:
                self._pending_observer_state = observer_state

    # ------------------------------------------------------------- read-only
    @property
    def observer(self) -> Observer | None:
        """The observer (built at fit start; with lazy modules, after the first forward pass gave them shapes)."""
        return self._observer

    @property
    def tracker(self) -> BurgersTracker | None:
        """The tracker (built at setup)."""
        return self._tracker

    @property
    def report(self) -> Any:
        """The symmetry report of the observed model (``None`` before fit start)."""
        return None if self._observer is None else self._observer.report

    @property
    def events(self) -> list[ShockEvent]:
        """Events read so far (the last ``max_events``), oldest first."""
        return list(self._events)

    @property
    def alerts(self) -> int:
        """How many events have been read so far."""
        return self._alerts

    @property
    def num_observations(self) -> int:
        """How many optimizer steps have been observed."""
        return self._observations

    @property
    def latest(self) -> dict[str, float]:
        """The tracker summary at the last read (keys without prefix: ``steps_to_shock``, ``shock``,
        ``state/<g>``...)."""
        return dict(self._latest)

    @property
    def last_metrics(self) -> dict[str, float]:
        """The scalars of the last read, tags with prefix, as rank zero logs them (every rank has them)."""
        return dict(self._last_metrics)

    @property
    def shock_active(self) -> bool:
        """Whether a shock was active at the last read."""
        return self._latest.get("shock", 0.0) >= 1.0 or any(
            v >= 2.0 for k, v in self._latest.items() if k.startswith("state/")
        )

    @property
    def transition_active(self) -> bool:
        """Whether, at the last read, a shock was forecast within the horizon, imminent or active."""
        return (
            math.isfinite(self._latest.get("steps_to_shock", math.inf))
            or self.shock_active
            or any(v >= 1.0 for k, v in self._latest.items() if k.startswith("state/"))
        )

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(trainer, monitor, new_events)`` on every rank after each host read (idempotent)."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # ---------------------------------------------------------- construction
    def _make_tracker(self) -> BurgersTracker:
        """Build the tracker; override to customise."""
        from shockmon.tracker import BurgersTracker

        return BurgersTracker(horizon=self.horizon, window=self.window, **self.tracker_kwargs)

    def _make_observer(self, pl_module: pl.LightningModule) -> Observer:
        """Build the observer of ``pl_module``; override to customise."""
        from shockmon.observer import Observer

        return Observer(pl_module, **self.observer_kwargs)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer.strategy)
        same = [cb for cb in trainer.callbacks if isinstance(cb, ShockMonitor) and cb.prefix == self.prefix]
        if len(same) > 1:
            raise MisconfigurationException(
                f"{len(same)} ShockMonitor callbacks share the prefix {self.prefix!r}; give each its own"
                " `prefix` (it names their tags and their state in checkpoints)."
            )
        self._check_log_dirs(trainer)
        self._reset_run_state()
        self._log_every = (
            trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        )
        if self.histogram_every_n_steps is None:
            self._hist_every = 10 * self._log_every
        else:
            self._hist_every = self.histogram_every_n_steps
        self._observer = None
        self._tracker = self._make_tracker()
        if self._pending_tracker_state is not None:
            # the settings this callback was built with apply; the state's layout (window, ...) is kept, and
            # the tracker warns about every setting that differs from the checkpoint's
            self._tracker.load_state_dict(self._pending_tracker_state, settings="current")
            self._pending_tracker_state = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Built here, not in setup: `configure_model` and the strategy (device move, sharding) have run.
        lazy = _lazy_parameters(pl_module)
        if lazy:  # LazyLinear & co.: shapes are known after the first forward pass, the observer is built then
            rank_zero_info(
                f"ShockMonitor: {len(lazy)} parameters are not initialised yet (lazy modules: {', '.join(lazy[:4])}"
                f"{', ...' if len(lazy) > 4 else ''}); the observer is built after the first forward pass."
            )
            self._lazy_wait = True
            return
        self._build_observer(trainer, pl_module)

    def _build_observer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lazy_wait = False
        self._observer = self._make_observer(pl_module)
        self._param_signature = _param_signature(pl_module)
        if not any(e[5] for e in self._param_signature):
            rank_zero_warn(
                "ShockMonitor: the model has no trainable parameters at fit start; its frozen layers are observed"
                " (no gradient observables), and the observer is rebuilt when parameters are unfrozen."
            )
        if self._pending_observer_state is not None and hasattr(self._observer, "load_state_dict"):
            self._observer.load_state_dict(self._pending_observer_state)
        self._pending_observer_state = None
        report = self._observer.report
        if self.print_summary:
            rank_zero_info(str(report))
        if trainer.is_global_zero:
            for writer in tb.tensorboard_writers(trainer.loggers):
                writer.add_text(
                    f"{self.prefix}/symmetry_report", tb.report_markdown(report), trainer.global_step
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # after a restore, the resumed step
        self._pending_grads = {}
        self._cost_steps, self._cost_hooks, self._cost_read = 0, 0.0, 0.0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        t0 = time.perf_counter()
        self._before_optimizer_step(trainer, pl_module)
        self._cost_hooks += time.perf_counter() - t0

    def _before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lazy_wait and not trainer.sanity_checking:
            self._build_when_initialised(trainer, pl_module)
        if self._observer is None or trainer.sanity_checking:
            return
        if (trainer.global_step + 1) % self.every_n_steps != 0:
            return
        self._follow_parameters(trainer, pl_module)
        self._followed_step = trainer.global_step + 1
        with torch.inference_mode():  # see _observe
            if self._read_due(trainer, trainer.global_step + 1):  # only a read needs the gradient observables
                self._pending_grads.update(self._observer.grad_observables(check_finite=True))
            else:  # the non-finite count ("grads:finite") alone: one read of the gradients
                finite = self._observer.grads_finite()
                if finite is not None:
                    self._pending_grads["grads:finite"] = finite
        if self._step_lr is None:  # the first optimizer's, as it steps (a scheduler steps after the batch)
            self._step_lr = self._lr(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        t0 = time.perf_counter()
        stepped = self._batch_end(trainer, pl_module)
        t1 = time.perf_counter()
        self._cost_hooks += t1 - t0
        if stepped and self.overhead_warning is not None:
            self._check_cost(t1)

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """The batch-end work; whether this batch ended an optimizer step."""
        step = trainer.global_step
        if self._lazy_wait and step != self._last_step:  # manual optimisation may skip on_before_optimizer_step
            self._build_when_initialised(trainer, pl_module)
        if self._observer is None or step == self._last_step:
            return False  # not an optimizer step (accumulating, or the step was skipped)
        self._last_step = step
        if step % self.every_n_steps != 0:
            self._pending_grads, self._step_lr = {}, None
            if self._log_every > 0 and step % self._log_every == 0 and self._values_step > self._last_read_step:
                self._timed_read(trainer, pl_module, self._values_step)  # the latest, at its own step
            return True
        log_step = self._log_every > 0 and step % self._log_every == 0
        if self._followed_step != step:  # checked before this step's optimizer step already: once a step is enough
            self._follow_parameters(trainer, pl_module)  # (a walk of every parameter: 0.18 ms for 149 of them)
        self._observe(trainer, step, full=self._read_due(trainer, step))
        if log_step:
            self._timed_read(trainer, pl_module, step)
        return True

    def _timed_read(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        t0 = time.perf_counter()
        self._read(trainer, pl_module, step, in_loop=True)
        self._cost_read += time.perf_counter() - t0

    def _check_cost(self, now: float) -> None:
        """Time the monitor against the steps (host clock, no sync) over optimizer steps ``COST_SKIP + 1`` to
        ``COST_SKIP + COST_STEPS`` of the fit; then warn once if it costs more than ``overhead_warning``."""
        self._cost_steps += 1
        if self._cost_steps == COST_SKIP:
            self._cost_hooks, self._cost_read, self._cost_start = 0.0, 0.0, now
        elif self._cost_steps == COST_SKIP + COST_STEPS:
            assert self.overhead_warning is not None
            advice = overhead_advice(
                self._cost_hooks, now - self._cost_start, COST_STEPS, self.every_n_steps, self.overhead_warning,
                # the tracker's own window: a checkpoint's, when resumed with another (see load_state_dict)
                self._tracker.window if self._tracker is not None else self.window,
                read_s=self._cost_read, log_every=self._log_every, growth_updates=self._growth_updates(),
            )
            if advice is not None:
                rank_zero_warn(advice)

    def _growth_updates(self) -> int:
        """The observations the tracker's instability test spans (0 when it is off, or for a tracker from an
        overridden :meth:`_make_tracker` that has none), for the overhead advice."""
        from shockmon.tracker import _GROWTH_HISTORY

        window, growth = getattr(self._tracker, "growth_window", None), getattr(self._tracker, "growth", 0)
        return _GROWTH_HISTORY * window if isinstance(window, int) and isinstance(growth, float) and growth > 0 else 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._observer is not None and self._values_step > self._last_read_step:
            last = self._values_step == trainer.global_step  # the parameters have not moved since
            if not self._values_full and self._values is not None and last:
                # the last observation was not known to be read: add the spectra and raw norms for this read
                # (the gradient observables need the gradients before the step: this read goes without them)
                with torch.inference_mode():
                    full = self._observer.compute(lr=self._lr(trainer), spectra=True, raw=True)
                self._values.update({k: v for k, v in full.items() if k not in self._values})
            self._read(trainer, pl_module, self._values_step, in_loop=False)
        if trainer.is_global_zero:
            self._log_characteristics(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._values = None
            self._pending_grads = {}
            self._particles = {}

    # -------------------------------------------------------------- the work
    @staticmethod
    def _lr(trainer: pl.Trainer) -> float | None:
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                lr = group.get("lr")
                return float(lr) if isinstance(lr, (int, float)) else None  # a tensor lr would need a sync
        return None

    def _check_log_dirs(self, trainer: pl.Trainer) -> None:
        """At ``setup``: every local TensorBoard log directory must take files (checked on rank zero, agreed on
        all ranks), so an unwritable one stops the run before training, not at the first log step."""
        dirs = _tensorboard_dirs(getattr(trainer, "loggers", ()))  # the same loggers on every rank
        if not dirs:
            return
        problems = []
        if trainer.is_global_zero:
            for path in dirs:
                why = _unwritable(path)
                if why is not None:
                    problems.append(f"{path!r} ({why})")
        problems = trainer.strategy.broadcast(problems, src=0)
        if problems:
            raise MisconfigurationException(
                f"ShockMonitor cannot write TensorBoard event files to {', '.join(problems)}: expected a writable"
                " directory; give the TensorBoardLogger another `save_dir`."
            )

    def _build_when_initialised(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the observer once no parameter is lazy any more (host metadata only); say so once if some still
        are after the first optimizer step (a lazy module the forward pass never reached is never observed)."""
        lazy = _lazy_parameters(pl_module)
        if not lazy:
            self._build_observer(trainer, pl_module)
        elif not self._lazy_warned:
            self._lazy_warned = True
            rank_zero_warn(
                f"ShockMonitor: parameters still not initialised at optimizer step {trainer.global_step + 1}: "
                f"{', '.join(lazy[:6])}{', ...' if len(lazy) > 6 else ''}. Nothing is observed until every lazy "
                "module has run a forward pass (or initialise them before fit, e.g. in `setup`)."
            )

    def _follow_parameters(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rebuild the observer when the module's parameters changed since it was built (added, removed,
        replaced, reshaped, moved to another device or dtype, frozen or unfrozen): it holds references to the
        parameters it saw, and stale ones would give silently wrong numbers. Host metadata only, no sync."""
        signature = _param_signature(pl_module)
        if signature == self._param_signature:
            return
        rank_zero_warn(
            f"ShockMonitor: the model's parameters changed before step {trainer.global_step + 1}:"
            f" {_describe_change(self._param_signature, signature)}. Rebuilding the observer; tracked groups whose"
            " units changed restart their history."
        )
        self._param_signature = signature
        self._observer = self._make_observer(pl_module)
        self._drop_stale_groups = True
        self._pending_grads = {}  # computed from the old parameters
        self._values = None
        if self.print_summary:
            rank_zero_info(str(self._observer.report))

    def _read_due(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether the observation after optimizer step ``step`` will be read: the last observation at or before
        a log step (the log step itself when ``every_n_steps`` divides it), or a step known to be the last (host
        state only)."""
        log = self._log_every
        if log > 0 and -(-step // log) * log < step + self.every_n_steps:
            return True
        if trainer.max_steps is not None and 0 < trainer.max_steps <= step:
            return True
        max_epochs = trainer.max_epochs
        return bool(max_epochs is not None and 0 < max_epochs <= trainer.current_epoch + 1 and trainer.is_last_batch)

    def _observe(self, trainer: pl.Trainer, step: int, full: bool = True) -> None:
        """The per-step path: device tensors only, no host sync. ``full``: also what only a read needs (the
        attention spectra, the raw parameter norms): True where :meth:`_read_due`, False elsewhere.

        Under ``torch.inference_mode()``: no autograd bookkeeping on the few hundred small ops of an observation
        (about 10 % of the monitor's per-step time on a small model). The values it keeps are read only by this
        callback, which hands the user host numbers."""
        with torch.inference_mode():
            self._observe_values(trainer, step, full)

    def _observe_values(self, trainer: pl.Trainer, step: int, full: bool) -> None:
        assert self._observer is not None and self._tracker is not None
        lr = self._step_lr if self._step_lr is not None else self._lr(trainer)
        self._step_lr = None
        values = self._observer.compute(lr=lr, spectra=full, raw=full)
        self._values_full = full
        trajectory = self._observer.trajectory(values)
        finite = self._pending_grads.pop("grads:finite", None)
        if finite is not None:  # count steps whose gradients are non-finite (on device)
            bad = ~finite
            self._nonfinite_grads = bad.long() if self._nonfinite_grads is None else self._nonfinite_grads + bad
        values.update(self._pending_grads)
        self._pending_grads = {}
        groups = self._observer.units()
        if self._drop_stale_groups:  # host metadata only: the names the tracker has against those it gets now
            self._drop_stale_groups = False
            stale = [g for g in getattr(self._tracker, "groups", ()) if g not in groups]
            if stale:
                self._tracker.drop(stale)
        if self.snapshot_units:
            self._particles = groups
        trajectory = trajectory if trajectory.numel() else None  # shapes are host metadata: no sync
        if groups or trajectory is not None:  # a model with no symmetry has nothing to track, only raw values
            self._tracker.update(step, groups, trajectory=trajectory, lr=lr)
        self._values = values
        self._values_step = step
        self._observations += 1

    def _histogram_due(self, step: int) -> bool:
        if self._hist_every <= 0:
            return False
        return self._last_hist_step < 0 or step // self._hist_every > self._last_hist_step // self._hist_every

    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, in_loop: bool) -> None:
        """The log-step path: one host read, then logging, callback metrics and listeners."""
        assert self._tracker is not None
        values = self._values or {}
        summary = self._tracker.summary()
        # the tracker's events ride along in the one transfer; a tracker without poll_tensor (a custom one from
        # an overridden _make_tracker) is polled on its own
        one_copy = hasattr(self._tracker, "poll_tensor")
        events_blob = self._tracker.poll_tensor() if one_copy else None
        new_events = [] if one_copy else self._tracker.poll()
        histograms = self._histogram_due(step) and trainer.is_global_zero
        device_values: dict[str, Tensor] = {k: v for k, v in values.items() if v.ndim == 0}
        device_values.update({f"summary:{k}": v for k, v in summary.items()})
        if histograms:
            device_values.update({f"hist:{k}": v for k, v in values.items() if v.ndim == 1})
        particles = (
            self._selector.select(self._particles)
            if self._particles and trainer.is_global_zero and tb.tensorboard_writers(trainer.loggers)
            else {}
        )
        device_values.update({f"particles:{g}": v for g, v in particles.items()})
        if self._nonfinite_grads is not None:
            device_values["grads:nonfinite"] = self._nonfinite_grads
        if events_blob is not None:
            device_values["events:blob"] = events_blob
        host = to_host(device_values)  # the one device→host transfer (the tracker's events ride along)
        blob = host.pop("events:blob", None)
        if blob is not None:
            new_events = self._tracker.poll_host(blob)
        self._note_nonfinite_grads(step, host.pop("grads:nonfinite", None), new_events)

        for e in new_events:
            self._events.append(e)
            self._alerts_by_group[e.group] += 1
        self._alerts += len(new_events)
        self._latest = {k[len("summary:") :]: float(v) for k, v in host.items() if k.startswith("summary:")}
        self._last_read_step = step

        p = self.prefix
        metrics: dict[str, float] = {f"{p}/{k}": float(v) for k, v in host.items() if ":" not in k}
        metrics.update({f"{p}/{k}": v for k, v in self._latest.items()})
        groups = [k[len("forecast/") :] for k in self._latest if k.startswith("forecast/")]
        for g in dict.fromkeys([*groups, *self._alerts_by_group]):
            metrics[f"{p}/alerts/{g}"] = float(self._alerts_by_group.get(g, 0))
        metrics[f"{p}/alerts"] = float(self._alerts)
        metrics[f"{p}/nonfinite_grad_steps"] = float(self._nonfinite_grads_read)
        self._last_metrics = metrics
        if trainer.is_global_zero:  # the same values on every rank: loggers get them once
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

        if trainer.is_global_zero:
            self._write_tensorboard(trainer, step, metrics, groups, new_events, host if histograms else {})
        if histograms:
            self._last_hist_step = step
        if particles:
            self._write_particles(trainer, step, {g: host[f"particles:{g}"] for g in particles})

        if in_loop:  # `log` is not allowed in on_train_end
            steps_to_shock = self._latest.get("steps_to_shock", math.inf)
            pl_module.log(f"{p}/steps_to_shock", steps_to_shock, prog_bar=self.progress_bar, logger=False)
            pl_module.log(f"{p}/shock", self._latest.get("shock", 0.0), logger=False)
            pl_module.log(f"{p}/alerts", float(self._alerts), logger=False)
        for listener in list(self._listeners):
            listener(trainer, self, new_events)

    def _note_nonfinite_grads(self, step: int, count: Any, new_events: list[ShockEvent]) -> None:
        """Take the device count of non-finite gradient steps read at ``step``; warn the first time it grows,
        unless a divergence event already says more."""
        if count is None:
            return
        total = self._nonfinite_grads_base + int(count)
        diverged = any(e.kind is EventKind.DIVERGENCE for e in (*self._events, *new_events))
        if total > self._nonfinite_grads_read and not (self._nonfinite_grads_warned or diverged):
            self._nonfinite_grads_warned = True
            rank_zero_warn(
                f"ShockMonitor: non-finite gradients at {total} observed step(s) up to step {step}; logged as"
                f" `{self.prefix}/nonfinite_grad_steps`. While the parameters stay finite (a loss scaler skipping"
                " the step does this) it is no divergence; if they reach the parameters, a `divergence` event fires."
            )
        self._nonfinite_grads_read = total

    def _write_tensorboard(
        self,
        trainer: pl.Trainer,
        step: int,
        metrics: Mapping[str, float],
        groups: list[str],
        new_events: list[ShockEvent],
        host: Mapping[str, float | np.ndarray],
    ) -> None:
        writers = tb.tensorboard_writers(trainer.loggers)
        if not writers:
            return
        p = self.prefix
        for writer in writers:
            if not self._layout_written:
                writer.add_custom_scalars(tb.custom_scalars_layout(metrics, groups, p))
            if new_events:
                writer.add_text(f"{p}/alert_text", tb.alerts_markdown(new_events), step)
            for k, v in host.items():
                if k.startswith("hist:") and isinstance(v, np.ndarray) and v.size and np.isfinite(v).all():
                    writer.add_histogram(f"{p}/{k[len('hist:') :]}", v, step)
        self._layout_written = True

    def _write_particles(self, trainer: pl.Trainer, step: int, host: Mapping[str, Any]) -> None:
        """Write the log step's particle snapshots (``<prefix>/particles/<group>``) to TensorBoard."""
        sel = self._selector
        num_units = {g: sel.num_units(g) for g in host}
        try:
            for writer in tb.tensorboard_writers(trainer.loggers):
                snapshots.write(writer, self.prefix, host, sel.indices, num_units, step)
        except (ImportError, AttributeError, TypeError) as err:  # e.g. a tensorboardX writer
            rank_zero_warn(f"ShockMonitor: particle snapshots disabled, the writer cannot take them ({err})")
            self._particles = {}
            self.snapshot_units = 0

    def _log_characteristics(self, trainer: pl.Trainer) -> None:
        """At the end of fit: each alerted group's characteristic diagram as a TensorBoard image.

        The snapshots are read back from the run's own event files (the monitor keeps no history); needs
        matplotlib, and is skipped without it.
        """
        groups = list(dict.fromkeys(e.group for e in self._events))
        writers = tb.tensorboard_writers(trainer.loggers)
        if not (groups and writers and self.snapshot_units) or importlib.util.find_spec("matplotlib") is None:
            return
        from shockmon import plots

        for writer in writers:
            try:
                writer.flush()
                found = snapshots.read(snapshots.accumulator(writer.get_logdir(), tensors=1000), self.prefix)
                for g in groups:
                    if g in found:
                        fig = plots.characteristic_figure(found[g], [e for e in self._events if e.group == g])
                        writer.add_figure(
                            f"{self.prefix}/characteristics/{g}", fig, trainer.global_step, close=False
                        )
            except Exception as err:  # a figure must never break the end of training
                rank_zero_warn(f"ShockMonitor: no characteristic diagram ({type(err).__name__}: {err})")
