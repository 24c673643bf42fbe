"""Record a benchmark run once: ``Trainer`` + default ``ShockMonitor``, plus what its tracker was fed.

Every case trains full batch through a plain :class:`BenchModule`. A :class:`Recorder` callback, placed after
the monitor, wraps the monitor's ``BurgersTracker.update`` to keep each observation's per-unit coordinates and
trajectory vector, and records the run's own metrics (loss, gradient norm, raw parameter norm, learning rate,
and the case's held-out / transition metrics every ``eval_every`` steps). The :class:`Recording` is cached as
an ``.npz``; :func:`replay` feeds it to any tracker offline and gives the events the live monitor would have
given (bit-identical for the same tracker, which the quick mode checks).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from shockmon.demo import _FullBatch  # the same full batch, once per step

Evaluate = Callable[[nn.Module, int], dict[str, float]]


class BenchModule(pl.LightningModule):
    """Full-batch training of ``net`` on ``(x, y)``: ``loss_fn(scale * net(x), y)`` with ``make_opt``.

    ``scale`` multiplies the network's output outside the observed ``nn.Module`` (an NTK output factor), so
    symmetry discovery sees a plain ``Sequential``.
    """

    def __init__(
        self,
        net: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        make_opt: Callable[[Any], torch.optim.Optimizer],
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.net, self.x, self.y = net, x, y
        self.loss_fn, self.make_opt, self.scale = loss_fn, make_opt, scale

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out * self.scale if self.scale != 1.0 else out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_opt(self.parameters())

    def loader(self, steps: int) -> DataLoader:
        return DataLoader(_FullBatch(self.x, self.y, steps), batch_size=None)


@dataclass
class Setup:
    """What a case builds for one seed: the module, the steps to run, the periodic evaluation."""

    module: BenchModule
    steps: int
    eval_every: int
    evaluate: Evaluate
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recording:
    """One run: metrics per step, evaluations, the tracker's inputs, the live monitor's events."""

    case: str
    seed: int
    steps: np.ndarray  # (T,) global step after each optimizer step
    loss: np.ndarray
    grad_norm: np.ndarray
    param_norm: np.ndarray
    lr: np.ndarray
    eval_steps: np.ndarray
    evals: dict[str, np.ndarray]
    feed_steps: np.ndarray  # steps at which the tracker was updated
    units: dict[str, np.ndarray]  # group -> (T_feed, n, D) float32
    trajectory: np.ndarray | None  # (T_feed, P) float32 or None
    feed_lr: np.ndarray
    events: list[dict[str, Any]]  # the live monitor's events (ShockEvent.to_dict)
    config: dict[str, Any]
    cpu_seconds: float
    wall_seconds: float

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "steps": self.steps,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "param_norm": self.param_norm,
            "lr": self.lr,
            "eval_steps": self.eval_steps,
            "feed_steps": self.feed_steps,
            "feed_lr": self.feed_lr,
        }
        for k, v in self.evals.items():
            arrays[f"eval|{k}"] = v
        for k, v in self.units.items():
            arrays[f"units|{k}"] = v
        if self.trajectory is not None:
            arrays["trajectory"] = self.trajectory
        meta = {
            "case": self.case,
            "seed": self.seed,
            "events": self.events,
            "config": self.config,
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "groups": list(self.units),
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Recording:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            get = {k: z[k] for k in z.files if k != "meta"}
        return cls(
            case=meta["case"],
            seed=meta["seed"],
            steps=get["steps"],
            loss=get["loss"],
            grad_norm=get["grad_norm"],
            param_norm=get["param_norm"],
            lr=get["lr"],
            eval_steps=get["eval_steps"],
            evals={k[5:]: v for k, v in get.items() if k.startswith("eval|")},
            feed_steps=get["feed_steps"],
            units={g: get[f"units|{g}"] for g in meta["groups"]},
            trajectory=get.get("trajectory"),
            feed_lr=get["feed_lr"],
            events=meta["events"],
            config=meta["config"],
            cpu_seconds=meta["cpu_seconds"],
            wall_seconds=meta["wall_seconds"],
        )

    def eval_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of an evaluated metric."""
        return self.eval_steps, self.evals[name]


class Recorder(pl.Callback):
    """Records the run's metrics and, by wrapping ``monitor.tracker.update``, the tracker's inputs."""

    def __init__(self, monitor: pl.Callback, evaluate: Evaluate, eval_every: int) -> None:
        self.monitor, self.evaluate, self.eval_every = monitor, evaluate, eval_every
        self.rows: list[tuple[int, float, float, float, float]] = []
        self.eval_rows: list[tuple[int, dict[str, float]]] = []
        self.feed: list[tuple[int, dict[str, np.ndarray], np.ndarray | None, float]] = []
        self._grad_norm = math.nan

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracker = self.monitor.tracker  # type: ignore[attr-defined]
        original = tracker.update

        def update(step: int, groups: Any, trajectory: Tensor | None = None, lr: Any = None) -> None:
            self.feed.append(
                (
                    int(step),
                    {g: x.detach().cpu().numpy().copy() for g, x in groups.items()},
                    None if trajectory is None else trajectory.detach().cpu().numpy().copy(),
                    math.nan if lr is None else float(lr),
                )
            )
            original(step, groups, trajectory=trajectory, lr=lr)

        tracker.update = update  # an instance attribute: this run's tracker only
        self._evaluate(pl_module, 0)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self._grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        params = [p.detach() for p in pl_module.parameters()]
        pnorm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params))))
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows.append((step, float(loss), self._grad_norm, pnorm, lr))
        if step % self.eval_every == 0:
            self._evaluate(pl_module, step)

    def _evaluate(self, pl_module: pl.LightningModule, step: int) -> None:
        was = pl_module.training
        pl_module.eval()
        try:
            self.eval_rows.append((step, self.evaluate(pl_module, step)))
        finally:
            pl_module.train(was)


def run_case(name: str, seed: int, setup: Setup, monitor_kwargs: dict[str, Any] | None = None) -> Recording:
    """Train ``setup`` through ``Trainer`` + ``ShockMonitor`` (defaults) and record everything."""
    from shockmon import ShockMonitor

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    for pattern in (".*does not have many workers.*", ".*`isinstance.*treespec.*", ".*LeafSpec.*",
                    ".*No symmetry.*", ".*no symmetr.*"):
        warnings.filterwarnings("ignore", message=pattern)
    monitor = ShockMonitor(print_summary=False, progress_bar=False, **(monitor_kwargs or {}))
    rec = Recorder(monitor, setup.evaluate, setup.eval_every)
    trainer = pl.Trainer(
        max_steps=setup.steps,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[monitor, rec],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=10,
    )
    c0, w0 = time.process_time(), time.perf_counter()
    trainer.fit(setup.module, train_dataloaders=setup.module.loader(setup.steps))
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    rows = np.array(rec.rows, dtype=np.float64).reshape(-1, 5)
    ev_steps = np.array([s for s, _ in rec.eval_rows], dtype=np.int64)
    keys = list(rec.eval_rows[0][1]) if rec.eval_rows else []
    evals = {k: np.array([d.get(k, math.nan) for _, d in rec.eval_rows], dtype=np.float64) for k in keys}
    groups = list(rec.feed[0][1]) if rec.feed else []
    same = all(list(f[1]) == groups for f in rec.feed)
    if not same:
        raise RuntimeError(f"{name}: the tracker's groups changed during the run; the recorder cannot stack them")
    units = {g: np.stack([f[1][g] for f in rec.feed]).astype(np.float32) for g in groups}
    trajs = [f[2] for f in rec.feed]
    trajectory = np.stack(trajs).astype(np.float32) if trajs and all(t is not None for t in trajs) else None
    return Recording(
        case=name,
        seed=seed,
        steps=rows[:, 0].astype(np.int64),
        loss=rows[:, 1],
        grad_norm=rows[:, 2],
        param_norm=rows[:, 3],
        lr=rows[:, 4],
        eval_steps=ev_steps,
        evals=evals,
        feed_steps=np.array([f[0] for f in rec.feed], dtype=np.int64),
        units=units,
        trajectory=trajectory,
        feed_lr=np.array([f[3] for f in rec.feed], dtype=np.float64),
        events=[e.to_dict() for e in monitor.events],
        config=setup.config,
        cpu_seconds=cpu,
        wall_seconds=wall,
    )


def replay(
    rec: Recording, make_tracker: Callable[[], Any] | None = None, poll_every: int = 10, every_n_steps: int = 1
) -> list[dict[str, Any]]:
    """Feed a recording to a fresh tracker (default: the monitor's default one) and return its events.

    ``every_n_steps``: feed only the observations of steps that are multiples of it, which is what a live
    ``ShockMonitor(every_n_steps=...)`` observes (the observations do not depend on the ones before).
    """
    from shockmon import ShockMonitor

    if not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"Expected `every_n_steps` to be an int >= 1, but got {every_n_steps!r}")
    tracker = make_tracker() if make_tracker is not None else ShockMonitor(print_summary=False)._make_tracker()
    events: list[dict[str, Any]] = []
    fed = [i for i, s in enumerate(rec.feed_steps) if int(s) % every_n_steps == 0]
    T = len(fed)
    if T == 0:
        return events
    units = {g: torch.from_numpy(v) for g, v in rec.units.items()}
    traj = None if rec.trajectory is None else torch.from_numpy(rec.trajectory)
    for n, i in enumerate(fed):
        lr = rec.feed_lr[i]
        tracker.update(
            int(rec.feed_steps[i]),
            {g: u[i] for g, u in units.items()},
            trajectory=None if traj is None else traj[i],
            lr=None if math.isnan(lr) else float(lr),
        )
        if (n + 1) % poll_every == 0 or n == T - 1:
            events += [e.to_dict() for e in tracker.poll()]
    return events
