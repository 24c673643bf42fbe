"""DDP worker script for ``tests/test_distributed.py``.

``python ddp_run.py OUT --devices 2`` trains under ``strategy="ddp"`` on CPU (gloo); Lightning launches rank 1
itself by running this script again. ``--devices 1`` is the single-process reference. Runs, in order
(``--runs``):

``full``
    80 steps of :class:`TrainedBiases` with a ``ShockMonitor`` (log every 5 steps), a ``ShockEarlyStopping``
    on divergence, a TensorBoard logger writing to ``OUT/tb_rank<r>`` and a :class:`~dist_common.KeyLogger`.
``first``, ``resumed``
    the same run cut at step 33 by a checkpoint, then resumed from it to step 80.
``diverge``
    a NaN put into rank 1's parameters after optimizer step 7 (log every step): both ranks must stop at 7.

Each run writes ``OUT/<run>.rank<r>.json`` (see :class:`~dist_common.Recorder`), with the shockmon
collectives.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

# isort: off
from dist_common import CollectiveLog, KeyLogger, Recorder, exit_cleanly, rank  # first: puts tests/ on sys.path
from callback_models import ScriptedTransition, loader
# isort: on

LOG_EVERY = 5
STEPS = 80
CUT = 33


class TrainedBiases(ScriptedTransition):
    """``ScriptedTransition``'s crossing in the weights, while SGD trains the biases on the data.

    The path masses include the biases, so what the monitor observes depends on the all-reduced gradients (and
    the gradient observables are those gradients), while the scripted weights still drive the units to a
    shock. The data: 16 samples; each of ``world`` ranks gets ``16 / world`` of them per step (Lightning's
    distributed sampler, no shuffling), so every step's mean gradient is the single-process gradient of the
    same 16 samples.
    """

    def __init__(self, nan_rank: int | None = None, nan_step: int | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.lr, self.nan_rank, self.nan_step = lr, nan_rank, nan_step
        with torch.no_grad():
            self.net[0].bias.zero_()
            self.net[2].bias.zero_()
        # float64 by hand, not precision="64-true": that converts the module after a checkpoint is restored
        # into it, which rounds the restored float64 parameters through float32
        self.double()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return x.double(), y

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        w_in, w_out = self.scripted(self.global_step + 1)
        with torch.no_grad():
            self.net[0].weight.copy_(w_in)
            self.net[2].weight.copy_(w_out)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.global_rank == self.nan_rank and self.global_step + 1 == self.nan_step:
            with torch.no_grad():
                self.net[0].bias[0] = math.nan

    def train_dataloader(self) -> DataLoader:
        return loader(16, batch_size=16 // self.trainer.world_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # the weights in a group of their own with lr 0, so that zero_grad clears their gradients too
        biases = {"params": [self.net[0].bias, self.net[2].bias], "lr": self.lr}
        return torch.optim.SGD([biases, {"params": [self.net[0].weight, self.net[2].weight], "lr": 0.0}])


def fit(
    out: Path,
    run: str,
    devices: int,
    collectives: CollectiveLog | None,
    max_steps: int = STEPS,
    log_every: int = LOG_EVERY,
    tensorboard: bool = False,
    checkpoint_every: int | None = None,
    ckpt_path: str | None = None,
    **model_kw: Any,
) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from shockmon import ShockEarlyStopping, ShockMonitor

    callbacks: list[pl.Callback] = [
        ShockMonitor(log_every_n_steps=log_every, horizon=100, print_summary=False),
        ShockEarlyStopping(stop_on="divergence"),
        Recorder(out, run, collectives),
    ]
    if checkpoint_every:
        callbacks.append(
            ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=checkpoint_every, save_top_k=-1)
        )
    loggers: list[Any] = [KeyLogger()]
    if tensorboard:
        loggers.append(TensorBoardLogger(out / f"tb_rank{rank()}", name=run, version=0))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=max_steps,
        max_epochs=-1,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(checkpoint_every),
        limit_val_batches=0,
        log_every_n_steps=log_every,
    )
    trainer.fit(TrainedBiases(**model_kw), ckpt_path=ckpt_path)


def main(
    out: str | Path,
    devices: int,
    runs: tuple[str, ...] = ("full", "first", "resumed", "diverge"),
    collectives: CollectiveLog | None = None,
) -> None:
    out = Path(out)
    if "full" in runs:
        fit(out, "full", devices, collectives, tensorboard=True)
    if "first" in runs:
        fit(out, "first", devices, collectives, max_steps=CUT, checkpoint_every=CUT)
    if "resumed" in runs:
        path = next((out / "ckpt").glob(f"*step={CUT}*.ckpt"))
        fit(out, "resumed", devices, collectives, ckpt_path=str(path))
    if "diverge" in runs:
        fit(out, "diverge", devices, collectives, max_steps=40, log_every=1, nan_rank=1, nan_step=7)


if __name__ == "__main__":
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings(
        "ignore", message=".*(many workers|LeafSpec|ckpt_path|smaller than the logging).*"
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--runs", default="full,first,resumed,diverge")
    args = parser.parse_args()
    main(args.out, args.devices, tuple(args.runs.split(",")), CollectiveLog().install())
    exit_cleanly()
