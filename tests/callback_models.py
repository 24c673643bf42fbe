"""Tiny LightningModules and helpers for the callback, early-stopping, TensorBoard and demo tests."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from shockmon.events import EventKind, ShockEvent

TRANSITION_STEP = 60  # the scripted modules' hidden units cross at this step


def trainer(tmp_path: Path, callbacks: list[pl.Callback], **kw: Any) -> pl.Trainer:
    """A quiet CPU Trainer for tests."""
    opts: dict[str, Any] = dict(
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        max_epochs=-1,
    )
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def loader(n: int = 16, batch_size: int | None = None, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or n, shuffle=False)


class TinyMLP(pl.LightningModule):
    """Linear–ReLU–Linear trained with SGD; ``nan_at`` puts a NaN into the first weight before that step."""

    def __init__(
        self,
        hidden: int = 8,
        lr: float = 0.1,
        nan_at: int | None = None,
        batches: int = 1,
        log_loss: bool = True,
    ) -> None:
        super().__init__()
        self.log_loss = log_loss
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.lr, self.nan_at, self.batches = lr, nan_at, batches

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.nan_at is not None and self.global_step + 1 == self.nan_at:
            with torch.no_grad():
                self.net[0].weight[0, 0] = math.nan

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.log_loss:
            self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def train_dataloader(self) -> DataLoader:
        return loader(16 * self.batches, batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return loader(16, seed=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ScriptedTransition(TinyMLP):
    """Hidden units driven together at a known step: characteristics that cross at ``transition``.

    Before each optimizer step the weights are set to their scripted value for the step about to complete; the
    optimizer has ``lr=0``, so what the monitor observes after step ``s`` is exactly the script at ``s``. The
    units share fixed directions (incoming row ``r_i u``, outgoing column ``r_i v``, biases zero) while each
    log scale moves on a straight line, ``log r_i(s) = (1 - s / transition) * log r_i(0)``: in the invariant
    coordinates (log path mass, directions) all units converge and cross at ``transition``, the picture of a
    shock.
    """

    def __init__(self, hidden: int = 8, transition: int = TRANSITION_STEP, noise: float = 1e-3) -> None:
        super().__init__(hidden=hidden, lr=0.0)
        self.transition = transition
        self.noise = noise
        g = torch.Generator().manual_seed(1)
        # one shared direction: the units differ only in scale
        u = torch.randn(1, 4, generator=g).expand(hidden, 4)
        v = torch.randn(2, 1, generator=g).expand(2, hidden)
        self.register_buffer("u", u / u.norm(dim=1, keepdim=True))
        self.register_buffer("v", v / v.norm(dim=0, keepdim=True))
        self.register_buffer("log_r0", torch.linspace(-1.0, 1.0, hidden)[torch.randperm(hidden, generator=g)])

    def scripted(self, step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(10_000 + step)
        log_r = (1.0 - step / self.transition) * self.log_r0 + self.noise * torch.randn(
            self.log_r0.shape, generator=g
        )
        r = log_r.exp()
        return r[:, None] * self.u, self.v * r[None, :]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        w_in, w_out = self.scripted(self.global_step + 1)
        with torch.no_grad():
            self.net[0].weight.copy_(w_in)
            self.net[2].weight.copy_(w_out)
            self.net[0].bias.zero_()
            self.net[2].bias.zero_()


class NoSymmetry(TinyMLP):
    """A single Linear layer: nothing for discovery to find."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 2))


class TwoOptimizers(TinyMLP):
    """Manual optimisation with two optimizers (one per layer); the second layer's bias frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net[2].bias.requires_grad_(False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt in (opt_a, opt_b):
            loss = F.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD([self.net[2].weight], lr=0.1),
        ]


class ScriptedTracker:
    """A stand-in for ``BurgersTracker`` whose events and forecast follow a script (for the callback
    mechanics).

    ``forecast_from``..``shock_at``: a forecast for group ``g`` (first group seen) is active, a FORECAST event
    fires at ``forecast_from``, a SHOCK event at ``shock_at``, and the shock stays active for ``shock_len``
    steps. A non-finite input fires a DIVERGENCE event (detected on the device, read at ``poll``).
    """

    def __init__(self, forecast_from: int = 20, shock_at: int = 40, shock_len: int = 5, **_: Any) -> None:
        self.forecast_from, self.shock_at, self.shock_len = forecast_from, shock_at, shock_len
        self.updates: list[int] = []
        self._groups: list[str] = []
        self._step = 0
        self._nonfinite: Tensor | None = None
        self._nonfinite_step: Tensor | None = None
        self._pending: list[ShockEvent] = []
        self._device = torch.device("cpu")

    def update(
        self, step: int, groups: Mapping[str, Tensor], trajectory: Tensor | None = None, lr: Any = None
    ):
        self.updates.append(step)
        self._step = step
        if not self._groups:
            self._groups = list(groups)
        bad = torch.stack([~torch.isfinite(x).all() for x in groups.values()]).any()
        self._device = bad.device
        if self._nonfinite is None:
            self._nonfinite = bad
            self._nonfinite_step = torch.where(bad, step, -1)
        else:
            self._nonfinite_step = torch.where(bad & ~self._nonfinite, step, self._nonfinite_step)
            self._nonfinite = self._nonfinite | bad
        g = self._groups[0] if self._groups else "g"
        if step == self.forecast_from:
            self._pending.append(
                ShockEvent(EventKind.FORECAST, g, "particle", step, float(self.shock_at), 3.0, (0, 1))
            )
        if step == self.shock_at:
            self._pending.append(
                ShockEvent(EventKind.SHOCK, g, "particle", step, float(self.shock_at), 5.0, (0, 1))
            )

    def _phase(self) -> tuple[float, float]:
        s = self._step
        if self.forecast_from <= s < self.shock_at:
            return float(self.shock_at - s), 1.0
        if self.shock_at <= s < self.shock_at + self.shock_len:
            return 0.0, 2.0
        return math.inf, 0.0

    def forecast(self) -> dict[str, Tensor]:
        steps, _ = self._phase()
        return {g: torch.tensor(self._step + steps, device=self._device) for g in self._groups}

    def summary(self) -> dict[str, Tensor]:
        steps, state = self._phase()
        t = lambda v: torch.tensor(float(v), device=self._device)  # noqa: E731
        out: dict[str, Tensor] = {}
        for g in self._groups:
            out[f"forecast/{g}"] = t(steps)
            out[f"viscosity/{g}"] = t(0.01)
            out[f"state/{g}"] = t(state)
        out["burgers_consistency"] = t(0.5)
        out["steps_to_shock"] = t(steps)
        out["shock"] = t(1.0 if state == 2.0 else 0.0)
        return out

    def poll(self) -> list[ShockEvent]:
        events, self._pending = self._pending, []
        if self._nonfinite is not None and bool(self._nonfinite):
            step = int(self._nonfinite_step)
            events.insert(0, ShockEvent(EventKind.DIVERGENCE, self._groups[0], "input", step))
            self._nonfinite = torch.zeros((), dtype=torch.bool)
            self._nonfinite_step = torch.tensor(-1)
        return events

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "groups": list(self._groups),
            "pending": [e.to_dict() for e in self._pending],
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self._step = d["step"]
        self._groups = list(d["groups"])
        self._pending = [ShockEvent.from_dict(e) for e in d["pending"]]


def scripted_monitor_class(**script: Any) -> type:
    """A ``ShockMonitor`` subclass that uses :class:`ScriptedTracker`."""
    from shockmon.callbacks import ShockMonitor

    class ScriptedMonitor(ShockMonitor):
        def _make_tracker(self) -> Any:
            return ScriptedTracker(**script)

    return ScriptedMonitor
