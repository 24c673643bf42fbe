"""The demo: grokking on modular addition, watched by :class:`~shockmon.ShockMonitor`.

A network trained with strong weight decay on half of the table ``(a + b) mod p`` first memorises its training
set, then — hundreds of steps later — suddenly generalises ("grokking", Power et al. 2022): a real training
phase transition, on a task that needs no download and runs on a CPU in about a minute.

``shockmon demo`` (see :mod:`shockmon.cli`) calls :func:`run_demo`. The same model and data are
LightningCLI-ready::

    python -m shockmon.demo fit --config configs/grokking_mlp.yaml
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from shockmon.events import ShockEvent

MODELS = ("mlp", "transformer")
DEVICES = ("auto", "cpu", "cuda")

#: Per-model defaults: hyper-parameters that grok, and enough steps to show the jump and its aftermath.
#: Measured here with seed 0 (full batch, CPU): the MLP fits its training set by step 260 and jumps (test
#: accuracy >= 0.9) at step 610; the transformer fits by step 200 and jumps at step 1750 (with lr 1e-3 it had
#: not jumped by step 3000).
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"lr": 3e-3, "weight_decay": 1.0, "train_fraction": 0.5, "steps": 1200},
    "transformer": {"lr": 3e-3, "weight_decay": 1.0, "train_fraction": 0.4, "steps": 2500},
}

FIT_ACC = 0.99  # "train accuracy fit"
JUMP_ACC = 0.9  # "test accuracy jumped"


# --------------------------------------------------------------------------------------------------- data
def modular_addition(p: int, train_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All pairs ``(a, b)`` with label ``(a + b) mod p``, split at random into train and test.

    Example:
        >>> xtr, ytr, xte, yte = modular_addition(7, 0.5, seed=0)
        >>> xtr.shape, xte.shape, bool(((xtr[:, 0] + xtr[:, 1]) % 7 == ytr).all())
        (torch.Size([24, 2]), torch.Size([25, 2]), True)
    """
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"Expected argument `p` to be an integer >= 2, but got {p!r}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"Expected argument `train_fraction` to be in (0, 1), but got {train_fraction!r}")
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    x = torch.stack([a, b], 1)
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n = int(train_fraction * p * p)
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


class _FullBatch(Dataset):
    """The same full batch, ``length`` times (``DataLoader(batch_size=None)`` yields it as is)."""

    def __init__(self, x: Tensor, y: Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


class ModularAddition(pl.LightningDataModule):
    """Full-batch modular addition: one training batch per step; validation on the train and the test split.

    Args:
        p: the modulus (and vocabulary size).
        train_fraction: fraction of the ``p²`` pairs used for training.
        seed: seed of the split.
        steps: training batches per epoch when the Trainer has no ``max_steps``.
    """

    def __init__(self, p: int = 97, train_fraction: float = 0.5, seed: int = 0, steps: int = 1000) -> None:
        super().__init__()
        self.p, self.train_fraction, self.seed, self.steps = p, train_fraction, seed, steps
        self.x_train, self.y_train, self.x_test, self.y_test = modular_addition(p, train_fraction, seed)

    def train_dataloader(self) -> DataLoader:
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        length = max_steps if max_steps and max_steps > 0 else self.steps
        return DataLoader(_FullBatch(self.x_train, self.y_train, length), batch_size=None)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(_FullBatch(self.x_train, self.y_train, 1), batch_size=None),
            DataLoader(_FullBatch(self.x_test, self.y_test, 1), batch_size=None),
        ]


# ------------------------------------------------------------------------------------------------- models
class GrokMLP(nn.Module):
    """Embeddings of ``a`` and ``b``, concatenated, then Linear–ReLU–Linear (ReLU rescaling and permutation
    symmetries in ``mlp``)."""

    def __init__(self, p: int, d: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(p, d)
        self.mlp = nn.Sequential(nn.Linear(2 * d, hidden), nn.ReLU(), nn.Linear(hidden, p))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.embed(x).flatten(1))


class GrokTransformer(nn.Module):
    """A one-layer transformer without LayerNorm on ``a b =`` (head Q/K, V/O and MLP rescaling symmetries)."""

    def __init__(self, p: int, d: int = 64, heads: int = 4, d_mlp: int = 256) -> None:
        super().__init__()
        self.p = p
        self.embed = nn.Embedding(p + 1, d)
        self.pos = nn.Parameter(torch.randn(3, d) / math.sqrt(d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, d_mlp), nn.ReLU(), nn.Linear(d_mlp, d))
        self.unembed = nn.Linear(d, p, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        eq = torch.full_like(x[:, :1], self.p)
        h = self.embed(torch.cat([x, eq], 1)) + self.pos
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.unembed(h[:, -1])


class GrokkingModule(pl.LightningModule):
    """Trains :class:`GrokMLP` or :class:`GrokTransformer` with AdamW; logs ``train_loss``, ``train_acc``,
    ``val_acc``.

    Args:
        model: ``"mlp"`` or ``"transformer"``.
        p: the modulus.
        lr: AdamW learning rate (``None``: the model's default).
        weight_decay: AdamW weight decay (decoupled; what makes it grok).
        betas: AdamW betas.
        init_seed: seed of the weights' initialisation.

    Attributes:
        history: ``(step, train accuracy, test accuracy)`` at each validation.
    """

    def __init__(
        self,
        model: str = "mlp",
        p: int = 97,
        lr: float | None = None,
        weight_decay: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.98),
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        if model not in MODELS:
            raise ValueError(
                f"Expected argument `model` to be one of {', '.join(map(repr, MODELS))}, but got {model!r}"
            )
        self.save_hyperparameters()
        self.lr = DEFAULTS[model]["lr"] if lr is None else lr
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.net: nn.Module = GrokMLP(p) if model == "mlp" else GrokTransformer(p)
        self.history: list[tuple[int, float, float]] = []
        self._acc: dict[int, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self.net(x)
        acc = (logits.argmax(-1) == y).float().mean()
        self._acc[dataloader_idx] = acc
        name = "train_acc" if dataloader_idx == 0 else "val_acc"
        self.log(name, acc, prog_bar=True, add_dataloader_idx=False)
        if dataloader_idx == 1:
            self.log("val_loss", F.cross_entropy(logits, y), add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or len(self._acc) < 2:
            return
        # one host read per validation (the module's business, not the monitor's)
        self.history.append((self.global_step, float(self._acc[0]), float(self._acc[1])))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(),
            lr=self.lr,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class DemoResult:
    """What :func:`run_demo` found."""

    model: str
    steps: int
    device: str
    seconds: float
    fit_step: int | None
    jump_step: int | None
    final_train_acc: float
    final_test_acc: float
    events: list[ShockEvent] = field(default_factory=list)
    log_dir: str = ""
    symmetry_report: str = ""
    horizon: int = 200

    def leads(self) -> list[tuple[ShockEvent, int | None]]:
        """Each event with how many steps before the jump it fired (negative: after; ``None``: no jump)."""
        return [(e, None if self.jump_step is None else self.jump_step - e.step) for e in self.events]

    def warnings_before(self, step: int | None) -> list[tuple[ShockEvent, int]]:
        """Forecast and shock alerts that fired within the monitor's horizon before ``step``, with their lead.

        Alerts long before it (an earlier transition's) are not counted.
        """
        if step is None:
            return []
        return [
            (e, step - e.step)
            for e in self.events
            if 0 <= step - e.step <= self.horizon and e.kind.value != "divergence"
        ]

    def warnings_before_jump(self) -> list[tuple[ShockEvent, int]]:
        """:meth:`warnings_before` the jump of test accuracy."""
        return self.warnings_before(self.jump_step)


def _first(history: list[tuple[int, float, float]], column: int, threshold: float) -> int | None:
    return next((row[0] for row in history if row[column] >= threshold), None)


def default_threads() -> int:
    """CPU threads for the demo: half the cores (at most 4), one on machines of one or two cores.

    A tiny model gains little from many threads and suffers badly from oversubscribed ones.
    """
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else min(4, cores // 2)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device not in DEVICES:
        raise ValueError(
            f"Expected argument `device` to be one of {', '.join(map(repr, DEVICES))}, but got {device!r}"
        )
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "`device='cuda'` was asked for, but torch.cuda.is_available() is False; use 'cpu' or 'auto'"
        )
    return device


def run_demo(
    steps: int | None = None,
    seed: int = 0,
    out: str = "./shockmon_runs",
    device: str = "auto",
    model: str = "mlp",
    eval_every: int = 10,
    log_every: int = 10,
    progress_bar: bool = True,
    threads: int | None = None,
) -> DemoResult:
    """Train the grokking model with :class:`~shockmon.ShockMonitor` and TensorBoard logging.

    Process-wide settings, all restored on return: ``torch.set_flush_denormal(True)`` while training (weight
    decay drives weights into subnormal floats, ~10x slower without it), the intra-op thread count
    (``threads``) and the demo's warning filters.

    Returns:
        A :class:`DemoResult`: when train accuracy fit, when test accuracy jumped, the alerts.
    """
    if model not in MODELS:
        raise ValueError(
            f"Expected argument `model` to be one of {', '.join(map(repr, MODELS))}, but got {model!r}"
        )
    steps = DEFAULTS[model]["steps"] if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected argument `steps` to be a positive integer, but got {steps!r}")
    accelerator = resolve_device(device)
    flush_before = flush_denormal_on()
    torch.set_flush_denormal(True)  # weight decay drives weights subnormal: ~10x slower without this
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        with warnings.catch_warnings():
            for pattern in (".*does not have many workers.*", ".*`isinstance.*treespec.*", ".*LeafSpec.*"):
                warnings.filterwarnings("ignore", message=pattern)
            return _train(steps, seed, out, accelerator, model, eval_every, log_every, progress_bar)
    finally:
        torch.set_num_threads(threads_before)
        torch.set_flush_denormal(flush_before)


def flush_denormal_on() -> bool:
    """Whether ``torch.set_flush_denormal`` is on in this process (torch has no getter): a subnormal float
    multiplied on the CPU reads as zero when it is. One tiny host operation.

    Example:
        >>> import torch
        >>> torch.set_flush_denormal(True), flush_denormal_on(), torch.set_flush_denormal(False), flush_denormal_on()
        (True, True, True, False)
    """
    return bool((torch.tensor([1e-39]) * 1.0)[0] == 0)


def _train(
    steps: int,
    seed: int,
    out: str,
    accelerator: str,
    model: str,
    eval_every: int,
    log_every: int,
    progress_bar: bool,
) -> DemoResult:
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from shockmon.callbacks import ShockMonitor

    pl.seed_everything(seed, verbose=False)

    data = ModularAddition(p=97, train_fraction=DEFAULTS[model]["train_fraction"], seed=seed, steps=steps)
    module = GrokkingModule(model=model, init_seed=seed)
    monitor = ShockMonitor(log_every_n_steps=log_every)
    logger = TensorBoardLogger(out, name=f"grokking_{model}", default_hp_metric=False)
    callbacks: list[pl.Callback] = [monitor]
    if progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, min(10, steps // 100))))
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator=accelerator,
        devices=1,
        logger=logger,
        callbacks=callbacks,
        val_check_interval=min(eval_every, steps),
        num_sanity_val_steps=0,
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start

    history = module.history
    last = history[-1] if history else (0, math.nan, math.nan)
    return DemoResult(
        model=model,
        steps=trainer.global_step,
        device=accelerator,
        seconds=seconds,
        fit_step=_first(history, 1, FIT_ACC),
        jump_step=_first(history, 2, JUMP_ACC),
        final_train_acc=last[1],
        final_test_acc=last[2],
        events=monitor.events,
        log_dir=str(logger.log_dir),
        symmetry_report=str(monitor.report),
        horizon=monitor.horizon,
    )


def format_summary(r: DemoResult, max_events: int = 12) -> str:
    """The demo's final summary, as printed by ``shockmon demo``."""
    lines = [
        f"shockmon demo: grokking (a + b) mod 97 with a {r.model}, {r.steps} steps on {r.device}"
        f" in {r.seconds:.1f} s",
        f"  train accuracy >= {FIT_ACC:.2f} (fit):     "
        + (f"step {r.fit_step}" if r.fit_step is not None else "not reached"),
        f"  test accuracy  >= {JUMP_ACC:.2f} (jumped):  "
        + (f"step {r.jump_step}" if r.jump_step is not None else "not reached (run longer: --steps)"),
        f"  final accuracy: train {r.final_train_acc:.3f}, test {r.final_test_acc:.3f}",
    ]
    if not r.events:
        lines.append("  alerts: none")
    else:
        kinds: dict[str, int] = {}
        for e in r.events:
            kinds[e.kind.value] = kinds.get(e.kind.value, 0) + 1
        lines.append(f"  alerts: {len(r.events)} (" + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")")
        for e, lead in r.leads()[:max_events]:
            when = ""
            if lead is not None:
                when = f"{lead} steps before the jump" if lead >= 0 else f"{-lead} steps after the jump"
            predicted = (
                f", predicted shock at step {e.predicted_step:.0f}" if math.isfinite(e.predicted_step) else ""
            )
            lines.append(
                f"    step {e.step:>5}  {e.kind.value:<10} {e.group} ({e.channel}){predicted}  {when}"
            )
        if len(r.events) > max_events:
            lines.append(f"    ... {len(r.events) - max_events} more (TensorBoard: text shockmon/alert_text)")
    for name, step in (("the fit", r.fit_step), ("the jump", r.jump_step)):
        if step is None:
            continue
        warned = r.warnings_before(step)
        if not warned:
            lines.append(f"  warned before {name} (step {step}): no alert in the {r.horizon} steps before it")
            continue
        e, lead = warned[0]
        line = (
            f"  warned before {name} (step {step}): {len(warned)} alert(s) within {r.horizon} steps,"
            f" the first a {e.kind.value} at step {e.step} ({lead} steps ahead)"
        )
        predicted = [x.predicted_step for x, _ in warned if math.isfinite(x.predicted_step)]
        if predicted:
            line += f"; closest predicted step {min(predicted, key=lambda p: abs(p - step)):.0f}"
        lines.append(line)
    lines.append(f"  TensorBoard: tensorboard --logdir {os.path.dirname(r.log_dir.rstrip('/')) or r.log_dir}")
    return "\n".join(lines)


def cli_main(args: list[str] | None = None, run: bool = True) -> Any:
    """``python -m shockmon.demo fit --config configs/grokking_mlp.yaml``: the demo through ``LightningCLI``.

    Needs ``jsonargparse[signatures]`` (Lightning's CLI extra). ``run=False`` only builds the objects.
    """
    from lightning.pytorch.cli import LightningCLI

    torch.set_flush_denormal(True)
    return LightningCLI(
        GrokkingModule, ModularAddition, args=args, run=run, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":  # pragma: no cover
    cli_main()
