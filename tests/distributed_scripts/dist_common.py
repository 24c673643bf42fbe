"""Helpers shared by the distributed worker scripts that ``tests/test_distributed.py`` runs as subprocesses.

:class:`Recorder` writes what every rank saw (each read's logged scalars, the events, the stop decision, the
bytes the observer all-reduced) to ``<out>/<run>.rank<r>.json``; :class:`CollectiveLog` counts the
``torch.distributed`` collectives that shockmon code calls, with the global step of each.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # callback_models, symmetry_models, proc_exit

from proc_exit import exit_cleanly  # noqa: E402, F401  (re-exported for the worker scripts)

#: every collective of ``torch.distributed`` a callback could call
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "monitored_barrier",
)


def rank() -> int:
    """This process's rank, known before the Trainer launches (Lightning sets ``LOCAL_RANK`` in the
    children)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


class CollectiveLog:
    """Wraps the ``torch.distributed`` collectives; records each call made with shockmon code on the stack.

    A record is ``{"run", "op", "step", "where"}``: ``step`` is ``trainer.global_step`` at the call, ``where``
    the innermost shockmon frame (``file:function``). Lightning's own collectives (epoch-end stop agreement,
    DDP's gradient all-reduce in C++) are not shockmon's and are not recorded.
    """

    def __init__(self) -> None:
        import shockmon

        self.root = os.path.dirname(os.path.abspath(shockmon.__file__))
        self.calls: list[dict[str, Any]] = []
        self.trainer: pl.Trainer | None = None
        self.run = ""

    def install(self) -> CollectiveLog:
        import torch.distributed as dist

        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))
        return self

    def _where(self) -> str | None:
        f = sys._getframe(2)
        while f is not None:
            if os.path.abspath(f.f_code.co_filename).startswith(self.root):
                return f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}"
            f = f.f_back  # type: ignore[assignment]
        return None

    def _wrap(self, name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            where = self._where()
            if where is not None:
                step = self.trainer.global_step if self.trainer is not None else -1
                self.calls.append({"run": self.run, "op": name, "step": step, "where": where})
            return fn(*args, **kwargs)

        return wrapper


class KeyLogger(Logger):
    """A logger *without* ``rank_zero_only``: counts, on every rank, the shockmon scalars it is given."""

    def __init__(self, prefix: str = "shockmon/") -> None:
        super().__init__()
        self.prefix = prefix
        self.shockmon_calls = 0

    @property
    def name(self) -> str:
        return "keys"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(k.startswith(self.prefix) for k in metrics):
            self.shockmon_calls += 1


class Recorder(Callback):
    """Writes ``<out>/<run>.rank<r>.json`` at teardown: every read's step, logged scalars and new events
    (through a listener on the ``ShockMonitor``), the final events and summary, the stop decision and the
    observer's communication counters."""

    def __init__(self, out: str | Path, run: str, collectives: CollectiveLog | None = None) -> None:
        self.out, self.run, self.collectives = Path(out), run, collectives
        self.reads: list[dict[str, Any]] = []

    def _monitor(self, trainer: pl.Trainer) -> Any:
        from shockmon import ShockMonitor

        return next(cb for cb in trainer.callbacks if isinstance(cb, ShockMonitor))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._monitor(trainer).add_listener(self._listen)
        if self.collectives is not None:
            self.collectives.trainer, self.collectives.run = trainer, self.run

    def _listen(self, trainer: pl.Trainer, monitor: Any, events: list[Any]) -> None:
        self.reads.append(
            {
                "step": trainer.global_step,
                "metrics": monitor.last_metrics,
                "events": [e.to_dict() for e in events],
            }
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from shockmon import ShockEarlyStopping

        monitor = self._monitor(trainer)
        stopper = next((cb for cb in trainer.callbacks if isinstance(cb, ShockEarlyStopping)), None)
        keys = next((lg for lg in trainer.loggers if isinstance(lg, KeyLogger)), None)
        obs = monitor.observer
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "global_step": trainer.global_step,
            "reads": self.reads,
            "events": [e.to_dict() for e in monitor.events],
            "alerts": monitor.alerts,
            "latest": monitor.latest,
            "observations": monitor.num_observations,
            "stopping_reason": None
            if stopper is None
            else str(getattr(stopper.stopping_reason, "value", "")),
            "stopping_event": stopper is not None and stopper.stopping_event is not None,
            "stopped_step": None if stopper is None else stopper.stopped_step,
            "keylogger_shockmon_calls": None if keys is None else keys.shockmon_calls,
            "sharded": bool(obs is not None and obs.rows.sharded),
            "bytes": 0 if obs is None else obs.rows.bytes,
            "rounds": 0 if obs is None else obs.rows.rounds,
            "collectives": []
            if self.collectives is None
            else [c for c in self.collectives.calls if c["run"] == self.run],
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{self.run}.rank{trainer.global_rank}.json").write_text(json.dumps(record))
        monitor.remove_listener(self._listen)


def load(out: str | Path, run: str, world: int) -> list[dict[str, Any]]:
    """The records of ``run``, one per rank."""
    return [json.loads((Path(out) / f"{run}.rank{r}.json").read_text()) for r in range(world)]
