"""``ShockEarlyStopping``: Lightning's ``EarlyStopping``, gated by the shock tracker."""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from shockmon.callbacks._state import check_state_version
from shockmon.callbacks.monitor import ShockMonitor
from shockmon.events import EventKind, ShockEvent

_PRIORITY = {EventKind.DIVERGENCE: 0, EventKind.SHOCK: 1, EventKind.FORECAST: 2, EventKind.INSTABILITY: 3}


#: version of the layout of :meth:`ShockEarlyStopping.state_dict` (a checkpoint without the field is version 0: the
#: same layout, written before the field existed)
STATE_VERSION = 1


def _check_arguments(
    monitor: Any,
    min_delta: Any,
    patience: Any,
    stopping_threshold: Any,
    divergence_threshold: Any,
    flags: dict[str, Any],
    check_on_train_epoch_end: Any,
    stop_on: Any,
) -> None:
    """Validate the arguments Lightning's ``EarlyStopping`` takes on trust (``mode`` it checks itself)."""
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise TypeError(
            f"Expected argument `monitor` to be a metric name (a non-empty string) or None, but got {monitor!r}"
        )
    if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not math.isfinite(min_delta):
        raise ValueError(f"Expected argument `min_delta` to be a finite number, but got {min_delta!r}")
    if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
        raise ValueError(f"Expected argument `patience` to be an integer >= 0, but got {patience!r}")
    for name, value in (("stopping_threshold", stopping_threshold), ("divergence_threshold", divergence_threshold)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)):
            raise ValueError(f"Expected argument `{name}` to be a number or None, but got {value!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"Expected argument `{name}` to be a bool, but got {value!r}")
    if check_on_train_epoch_end is not None and not isinstance(check_on_train_epoch_end, bool):
        raise TypeError(
            f"Expected argument `check_on_train_epoch_end` to be a bool or None, but got {check_on_train_epoch_end!r}"
        )
    if not isinstance(stop_on, (str, Sequence)):
        raise TypeError(
            "Expected argument `stop_on` to be an event kind or a list of them, one or more of"
            f" {', '.join(repr(k.value) for k in EventKind)}, but got {stop_on!r}"
        )


class ShockStoppingReason(str, enum.Enum):
    """Why :class:`ShockEarlyStopping` stopped training because of a tracker event.

    It is the callback's ``stopping_reason`` then; the reasons of Lightning's ``EarlyStopping`` (patience,
    thresholds, non-finite metric) keep their own Enum.
    """

    DIVERGENCE = "divergence"
    SHOCK = "shock"
    FORECAST = "forecast"
    INSTABILITY = "instability"

    def __str__(self) -> str:
        return self.value


class ShockEarlyStopping(EarlyStopping):
    r"""``EarlyStopping`` that also acts on the :class:`~shockmon.ShockMonitor`'s events.

    Keeps every argument of Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping` (``monitor`` may
    be ``None``: then only events stop training) and adds:

    - ``stop_on``: event kinds that stop training at once -- at the next host read of the monitor (its log
      step), not only at an epoch's end. The decision is agreed across ranks (any rank's event stops all).
    - ``hold_during_forecast``: while the monitor reports a shock forecast within its horizon, imminent or
      active, checks without improvement do not count against ``patience``: the plateau before a grokking
      jump does not end the run. Improvements, thresholds and non-finite checks still apply.

    It needs a :class:`~shockmon.ShockMonitor` among the Trainer's callbacks (``shock_monitor`` names its
    ``prefix`` when there are several). It logs nothing itself.

    Args:
        monitor: the metric to watch for improvement, as in ``EarlyStopping``; ``None`` to stop on events
            only.
        stop_on: one or more of ``"divergence"``, ``"shock"``, ``"forecast"``, ``"instability"`` (or an empty
            list: never).
        hold_during_forecast: freeze patience while a transition is forecast or active.
        shock_monitor: the ``prefix`` of the ``ShockMonitor`` to follow; ``None``: the only one.
        \**kwargs: the other arguments of ``EarlyStopping``.

    Attributes:
        stopping_reason: an ``EarlyStoppingReason`` or a :class:`ShockStoppingReason`.
        stopping_reason_message: names the event, group, step and forecast.
        stopped_step: the global step at which an event stopped training (0 if none did).
        stopping_event: the event that stopped training, if any.
        held_checks: how many checks had their patience held.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from shockmon import ShockMonitor, ShockEarlyStopping
        >>> trainer = Trainer(callbacks=[ShockMonitor(), ShockEarlyStopping("val_loss", patience=5)])
    """

    STOP_ON = tuple(k.value for k in EventKind)

    def __init__(
        self,
        monitor: str | None = None,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        stop_on: str | Sequence[str] = "divergence",
        hold_during_forecast: bool = True,
        shock_monitor: str | None = None,
    ) -> None:
        _check_arguments(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            flags=dict(
                verbose=verbose, strict=strict, check_finite=check_finite, log_rank_zero_only=log_rank_zero_only
            ),
            check_on_train_epoch_end=check_on_train_epoch_end,
            stop_on=stop_on,
        )
        super().__init__(
            monitor=monitor or "",
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.monitor: str | None = monitor  # type: ignore[assignment]
        kinds = [stop_on] if isinstance(stop_on, str) else list(stop_on)
        bad = [k for k in kinds if not isinstance(k, str) or k not in self.STOP_ON]
        if bad:
            raise ValueError(
                f"Expected argument `stop_on` to be one or more of {', '.join(repr(v) for v in self.STOP_ON)}"
                f" (or an empty list), but got {stop_on!r}"
            )
        if not isinstance(hold_during_forecast, bool):
            raise TypeError(
                f"Expected argument `hold_during_forecast` to be a bool, but got {hold_during_forecast!r}"
            )
        if shock_monitor is not None and not isinstance(shock_monitor, str):
            raise TypeError(
                f"Expected argument `shock_monitor` to be a prefix string or None, but got {shock_monitor!r}"
            )
        self.stop_on = tuple(dict.fromkeys(kinds))
        self.hold_during_forecast = hold_during_forecast
        self.shock_monitor = shock_monitor
        self.stopped_step = 0
        self.stopping_event: ShockEvent | None = None
        self.held_checks = 0
        self._monitor: ShockMonitor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, shock_monitor=self.shock_monitor
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, ShockMonitor)]
        prefixes = [m.prefix for m in monitors]
        if self.shock_monitor is not None:
            monitors = [m for m in monitors if m.prefix == self.shock_monitor]
        if not monitors:
            if prefixes:
                raise MisconfigurationException(
                    f"ShockEarlyStopping(shock_monitor={self.shock_monitor!r}) found no ShockMonitor with"
                    f" that prefix; valid values: {', '.join(repr(p) for p in prefixes)}."
                )
            raise MisconfigurationException(
                "ShockEarlyStopping needs a ShockMonitor among the Trainer's callbacks, e.g."
                " `Trainer(callbacks=[ShockMonitor(), ShockEarlyStopping(...)])`."
            )
        if len(monitors) > 1:
            raise MisconfigurationException(
                "ShockEarlyStopping found several ShockMonitor callbacks; choose one with `shock_monitor=`,"
                f" valid values: {', '.join(repr(p) for p in prefixes)}."
            )
        self._monitor = monitors[0]
        self._monitor.add_listener(self._on_monitor_read)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._monitor is not None:
            self._monitor.remove_listener(self._on_monitor_read)

    # ----------------------------------------------------------- event stops
    def _on_monitor_read(self, trainer: pl.Trainer, monitor: ShockMonitor, events: list[ShockEvent]) -> None:
        """Called by the monitor on every rank after each host read: stop at once on a ``stop_on`` event."""
        if self._should_skip_check(trainer) or not self.stop_on:
            return
        hits = sorted((e for e in events if e.kind.value in self.stop_on), key=lambda e: _PRIORITY[e.kind])
        should_stop = trainer.strategy.reduce_boolean_decision(bool(hits), all=False)
        if not should_stop or trainer.should_stop:
            trainer.should_stop = trainer.should_stop or should_stop
            return
        trainer.should_stop = True
        self.stopped_epoch = trainer.current_epoch
        self.stopped_step = trainer.global_step
        if hits:
            event = hits[0]
            self.stopping_event = event
            self.stopping_reason = ShockStoppingReason(event.kind.value)
            message = f"Stopping on {event.kind.value}: {event.message}."
        else:
            self.stopping_reason = ShockStoppingReason(self.stop_on[0])
            message = f"Stopping: another rank's ShockMonitor reported one of {list(self.stop_on)}."
        self.stopping_reason_message = message + " Signaling Trainer to stop."
        self._log_info(trainer, self.stopping_reason_message, self.log_rank_zero_only)

    # ------------------------------------------------------- patience checks
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if self.monitor is None:
            return  # events only
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        wait_before, reason_before = self.wait_count, self.stopping_reason
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        counted = self.wait_count == wait_before + 1  # the "no improvement" branch
        monitor = self._monitor
        if counted and self.hold_during_forecast and monitor is not None and monitor.transition_active:
            self.wait_count = wait_before
            self.held_checks += 1
            if should_stop:
                should_stop, self.stopping_reason = False, reason_before
            steps = monitor.latest.get("steps_to_shock", math.inf)
            when = f"shock forecast in {steps:.0f} steps" if math.isfinite(steps) else "shock active"
            reason = (
                f"Patience held ({when}): {self.monitor} did not improve, wait count stays at"
                f" {self.wait_count} of {self.patience}."
            )
        return should_stop, reason

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            version=STATE_VERSION,
            stopped_step=self.stopped_step,
            held_checks=self.held_checks,
            stopping_event=None if self.stopping_event is None else self.stopping_event.to_dict(),
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint without a ``version`` field (version 0, written before it
        existed) has the same layout and loads; a newer version is refused with a clear error."""
        check_state_version("ShockEarlyStopping", state_dict, STATE_VERSION)
        value = state_dict.get("stopping_reason", EarlyStoppingReason.NOT_STOPPED.value)
        shock_reason = isinstance(value, str) and value in self.STOP_ON
        if shock_reason:
            state_dict = {**state_dict, "stopping_reason": EarlyStoppingReason.NOT_STOPPED.value}
        super().load_state_dict(state_dict)
        if shock_reason:
            self.stopping_reason = ShockStoppingReason(value)  # type: ignore[assignment]
        self.stopped_step = int(state_dict.get("stopped_step", 0))
        self.held_checks = int(state_dict.get("held_checks", 0))
        event = state_dict.get("stopping_event")
        self.stopping_event = None if event is None else ShockEvent.from_dict(event)
