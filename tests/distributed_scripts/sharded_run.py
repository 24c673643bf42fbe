"""FSDP2 worker script for ``tests/test_distributed.py``: ``ModelParallelStrategy`` on CPU (gloo).

``python sharded_run.py OUT --devices 2`` trains :class:`ShardedPair` under
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, with ``fully_shard`` applied in
``configure_model``; Lightning launches rank 1 itself. ``--devices 1`` is the unsharded single-process
reference. ``DTensor.full_tensor`` raises for the whole run (a gathered parameter fails it). Writes
``OUT/sharded.rank<r>.json`` (:class:`~dist_common.Recorder`) and ``OUT/parts.rank<r>.json``: the bytes and
rounds one observation of each part (the MLP, the Transformer block) all-reduces, and their parameter counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from dist_common import CollectiveLog, KeyLogger, Recorder, exit_cleanly
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

LOG_EVERY = 2
STEPS = 12


class ShardedPair(pl.LightningModule):
    """A Transformer encoder block (4 heads) feeding an MLP with two hidden ReLU layers, trained by SGD.

    With a device mesh (``ModelParallelStrategy``), ``configure_model`` shards every ``Linear`` and the
    attention module with FSDP2 ``fully_shard`` (DTensor ``Shard(0)``: rows split across ranks, a unit's
    incoming and outgoing weights on different ranks), then each part as a whole; without one it leaves the
    model alone. The data: 16 sequences; each of ``world`` ranks gets ``16 / world`` of them per step.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3))
        self.double()  # ModelParallelStrategy takes no "64-true": float64 by hand, see the test module

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.block(x).mean(1))

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        done: list[str] = []
        for path, mod in self.named_modules():
            inside = any(path.startswith(d + ".") for d in done)
            if isinstance(mod, (nn.MultiheadAttention, nn.Linear)) and not inside:
                fully_shard(mod, mesh=mesh)
                done.append(path)
        fully_shard(self.block, mesh=mesh)
        fully_shard(self.mlp, mesh=mesh)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(16, 5, 16, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=16 // self.trainer.world_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MeasureParts(pl.Callback):
    """At the end of training, one observation (``compute`` + ``grad_observables``) of each part on its own:
    the bytes and rounds it all-reduces, and its parameter count, into the rank's record."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from shockmon import Observer

        parts: dict[str, Any] = {}
        for name in ("mlp", "block"):
            module = getattr(pl_module, name)
            obs = Observer(module)
            obs.compute()
            compute_bytes, compute_rounds = obs.rows.bytes, obs.rows.rounds
            obs.grad_observables()
            parts[name] = {
                "params": sum(p.numel() for p in module.parameters()),
                "units": {g: int(u.shape[0]) for g, u in obs.units().items()},
                "compute_bytes": compute_bytes,
                "compute_rounds": compute_rounds,
                "grad_bytes": obs.rows.bytes - compute_bytes,
                "grad_rounds": obs.rows.rounds - compute_rounds,
            }
        (self.out / f"parts.rank{trainer.global_rank}.json").write_text(json.dumps(parts))


def main(out: str | Path, devices: int, collectives: CollectiveLog | None = None) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from shockmon import ShockEarlyStopping, ShockMonitor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    strategy: Any = "auto"
    if devices > 1:
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=STEPS,
        max_epochs=-1,
        logger=[KeyLogger()],
        log_every_n_steps=LOG_EVERY,
        default_root_dir=out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[
            ShockMonitor(log_every_n_steps=LOG_EVERY, print_summary=False),
            ShockEarlyStopping(stop_on="divergence"),
            Recorder(out, "sharded", collectives),
            MeasureParts(out),
        ],
    )
    trainer.fit(ShardedPair())


if __name__ == "__main__":
    import warnings

    from torch.distributed.tensor import DTensor

    def no_gather(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("DTensor.full_tensor called: a full parameter was gathered")

    DTensor.full_tensor = no_gather  # type: ignore[method-assign]
    torch.set_num_threads(1)
    warnings.filterwarnings(
        "ignore", message=".*(many workers|LeafSpec|smaller than the logging|returned a view tensor).*"
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    main(args.out, args.devices, CollectiveLog().install())
    exit_cleanly()
