"""Reliability: the fault matrix. Each case ends in one of: handled correctly, a clear warning and degraded service,
or a clear error before training starts -- never a traceback from deep inside torch, never a silent wrong number,
never a lost alert.

Rows already proven elsewhere are named in the README's "Reliability" table (e.g. gradient accumulation in
``test_callbacks.py``, a truncated event file in ``test_report.py``); this file holds the rest.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from callback_models import TinyMLP, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.soak import tensor_bytes
from shockmon import BurgersTracker, Observer, ShockEarlyStopping, ShockMonitor, discover
from shockmon.callbacks import monitor as monitor_module
from shockmon.cli import main as cli_main
from shockmon.events import EventKind

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*LeafSpec.*",
)

CHANGED = "the model's parameters changed"


# ------------------------------------------------------------------------------------------------ helpers
def _fit(tmp_path: Path, model: pl.LightningModule, monitor: ShockMonitor | None = None, **kw: Any) -> ShockMonitor:
    monitor = monitor or ShockMonitor(log_every_n_steps=5, print_summary=False)
    opts: dict[str, Any] = dict(max_steps=20, limit_val_batches=0)
    opts.update(kw)
    trainer(tmp_path, [monitor, *opts.pop("callbacks", [])], **opts).fit(model)
    return monitor


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "ShockMonitor" in str(w.message) or "Group " in str(w.message)]


def _random_step(case: str) -> int:
    """A step in [3, 17] drawn from a generator seeded by the case (never a log step multiple by design)."""
    return random.Random(f"reliability:{case}").choice([s for s in range(3, 18) if s % 5])


def _divergences(monitor: ShockMonitor) -> list[int]:
    return sorted({e.step for e in monitor.events if e.kind is EventKind.DIVERGENCE})


def _mlp(hidden: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))




class Injecting(TinyMLP):
    """A NaN/inf ``value`` put at optimizer step ``at`` into a parameter, a gradient or the loss."""

    def __init__(self, where: str, at: int, value: float = math.nan, skip_nonfinite: bool = False) -> None:
        super().__init__()
        self.where, self.at, self.value, self.skip_nonfinite = where, at, value, skip_nonfinite

    def _now(self) -> bool:
        return self.global_step + 1 == self.at

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.where == "parameter" and self._now():
            with torch.no_grad():
                self.net[0].weight[0, 0] = self.value

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * self.value if self.where == "loss" and self._now() else loss

    def on_after_backward(self) -> None:
        if self.where == "gradient" and self._now():
            self.net[0].weight.grad[0, 0] = self.value

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if not self.skip_nonfinite:
            return super().configure_optimizers()
        return _SkippingSGD(self.parameters(), lr=self.lr)


class _SkippingSGD(torch.optim.SGD):
    """SGD that skips a step whose gradients are not finite, as a loss scaler does."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            super().step()
        return loss


# ----------------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["parameter", "gradient", "loss"])
def test_reliability_nonfinite_reaching_the_parameters_is_a_divergence_at_its_step(tmp_path, where, value):
    at = _random_step(f"{where}/{value}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, Injecting(where, at, value))
    assert monitor.num_observations == 20  # training went on; nothing raised
    assert _divergences(monitor)[0] == at, (at, monitor.events)  # at its step, though read at the next log step
    assert any(e.group == "rescale/net.0" for e in monitor.events if e.kind is EventKind.DIVERGENCE)
    assert monitor.alerts == len(monitor.events)
    # the divergence event says it; no second warning about the gradients on top of it
    assert not [m for m in _ours(caught) if "non-finite gradients" in m]


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_reliability_nonfinite_gradient_skipped_by_the_optimizer_is_counted_and_warned_once(tmp_path, value):
    at = _random_step(f"skipped/{value}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, Injecting("gradient", at, value, skip_nonfinite=True))
    assert monitor.events == []  # the parameters stayed finite: no divergence
    assert monitor.last_metrics["shockmon/nonfinite_grad_steps"] == 1.0
    ours = [m for m in _ours(caught) if "non-finite gradients" in m]
    assert len(ours) == 1 and "shockmon/nonfinite_grad_steps" in ours[0], _ours(caught)
    assert all(math.isfinite(p.sum().item()) for p in monitor.observer.model.parameters())
    state = monitor.state_dict()
    assert state["nonfinite_grad_steps"] == 1  # and it is checkpointed


def _all_zero(m: nn.Sequential) -> None:
    for p in m.parameters():
        p.zero_()


def _dead_layer(m: nn.Sequential) -> None:  # every hidden unit dead: no incoming weight, no bias
    m[0].weight.zero_()
    m[0].bias.zero_()


def _denormal(m: nn.Sequential) -> None:
    for p in m.parameters():
        p.copy_(torch.sign(p) * 1e-40)  # subnormal in float32


DEGENERATE = {"all_zero": _all_zero, "dead_layer": _dead_layer, "denormal": _denormal}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_reliability_degenerate_weights_give_finite_observables_and_a_silent_tracker(case):
    model = _mlp()
    with torch.no_grad():
        DEGENERATE[case](model)
    observer, tracker = Observer(model), BurgersTracker(window=4)
    for step in range(30):
        values = observer.compute(lr=0.1)
        tracker.update(step, observer.units(), trajectory=observer.trajectory(values), lr=0.1)
        nonfinite = [k for k, v in values.items() if not torch.isfinite(v).all()]
        # the one NaN by contract: a drift has no previous value at the first call
        assert nonfinite == (["dynamics/rescale/0/balancedness_drift"] if step == 0 else []), nonfinite
        assert all(torch.isfinite(u).all() for u in observer.units().values())
        assert torch.isfinite(observer.trajectory(values)).all()
    assert tracker.poll() == []
    assert all(math.isinf(v.item()) for v in tracker.forecast().values())


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_reliability_degenerate_weights_under_the_monitor(tmp_path, case):
    class Degenerate(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            with torch.no_grad():
                DEGENERATE[case](self.net)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, Degenerate(), max_steps=10)
    assert monitor.events == [] and _ours(caught) == []
    assert monitor.latest["steps_to_shock"] == math.inf
    logged = {k: v for k, v in monitor.last_metrics.items() if "/quotient/" in k or "/raw/" in k}
    assert logged and all(math.isfinite(v) for v in logged.values()), logged


# ----------------------------------------------------------------------------------------- shapes and models
class NoParameters(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.steps += 1

    def train_dataloader(self) -> Any:
        return loader()

    def configure_optimizers(self) -> None:
        return None


def test_reliability_empty_model_is_a_clear_error_before_training(tmp_path):
    model = NoParameters()
    with pytest.raises(ValueError, match="Expected argument `model` to have at least one parameter, but"):
        _fit(tmp_path, model, max_steps=3)
    assert model.steps == 0


class FrozenThenUnfrozen(TinyMLP):
    """Every parameter frozen (manual optimisation: the optimizer steps, nothing moves) until ``unfreeze_at``."""

    def __init__(self, unfreeze_at: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.unfreeze_at = unfreeze_at
        self.requires_grad_(False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        if self.global_step + 1 == self.unfreeze_at:
            self.requires_grad_(True)
        if self.net[0].weight.requires_grad:
            x, y = batch
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(x), y))
        opt.step()


def test_reliability_model_with_only_frozen_parameters_is_observed_and_followed_when_unfrozen(tmp_path):
    model = FrozenThenUnfrozen(unfreeze_at=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = ShockMonitor(log_every_n_steps=5, print_summary=False)
        seen: list[tuple[int, bool]] = []
        listener = lambda tr, mon, ev: seen.append(  # noqa: E731
            (tr.global_step, "shockmon/quotient/rescale/net.0/grad_norm" in mon.last_metrics)
        )
        monitor.add_listener(listener)
        _fit(tmp_path, model, monitor, max_steps=15)
    ours = _ours(caught)
    assert sum("no trainable parameters at fit start" in m for m in ours) == 1, ours
    assert sum(CHANGED in m and "unfrozen" in m for m in ours) == 1, ours
    assert monitor.num_observations == 15
    assert seen == [(5, False), (10, True), (15, True)]  # gradient observables once something trains


class LazyMLP(TinyMLP):
    """``nn.LazyLinear`` first layer (its shape is known after the first forward pass); ``unused`` adds a lazy head
    that the forward pass never reaches."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
        if unused:
            self.spare = nn.LazyLinear(3)


@pytest.mark.parametrize("unused", [False, True], ids=["lazy", "lazy-never-run"])
def test_reliability_lazy_modules_are_observed_once_their_first_forward_gave_them_shapes(tmp_path, unused):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, LazyMLP(unused), max_steps=12)  # built at fit start, this was a ValueError from torch
    ours = _ours(caught)
    if unused:  # the lazy head never gets a shape: one warning that names it, and nothing observed
        assert sum("still not initialised at optimizer step 1: spare.weight, spare.bias" in m for m in ours) == 1
        assert monitor.observer is None and monitor.num_observations == 0
    else:
        assert not ours and monitor.num_observations == 12
        assert [g.name for g in monitor.observer.report.rescale_groups()] == ["net.0"]
        assert "shockmon/quotient/rescale/net.0/path_norm" in monitor.last_metrics


def _add_head(m: TinyMLP) -> None:
    m.head2 = nn.Linear(4, 2)
    m.trainer.optimizers[0].add_param_group({"params": list(m.head2.parameters())})


def _replace_layer(m: TinyMLP) -> None:
    m.net[2] = nn.Linear(8, 2)
    m.trainer.optimizers[0].param_groups[0]["params"] = list(m.parameters())


def _widen(m: TinyMLP) -> None:  # the group's unit count changes: 8 -> 12
    m.net[0], m.net[2] = nn.Linear(4, 12), nn.Linear(12, 2)
    m.trainer.optimizers[0].param_groups[0]["params"] = list(m.parameters())


def _remove_head(m: TinyMLP) -> None:
    del m.aux


def _freeze(m: TinyMLP) -> None:
    m.net[0].weight.requires_grad_(False)


def _to_double(m: TinyMLP) -> None:
    m.double()


def _linear_only(m: TinyMLP) -> None:  # the hidden layer goes, and with it the rescaling group
    m.net = nn.Sequential(nn.Linear(4, 2))


CHANGES: dict[str, tuple[Callable[[TinyMLP], None], str]] = {
    "add_head": (_add_head, "added 'head2.weight' [2, 4]"),
    "replace_layer": (_replace_layer, "'net.2.weight' replaced by a new tensor"),
    "widen_group": (_widen, "'net.0.weight' shape [8, 4] -> [12, 4]"),
    "remove_head": (_remove_head, "removed 'aux.weight'"),
    "freeze": (_freeze, "'net.0.weight' frozen"),
    "to_double": (_to_double, "'net.0.weight' dtype float32 -> float64"),
    "drop_group": (_linear_only, "removed 'net.2.weight'"),
}


class Changing(TinyMLP):
    """Applies ``change`` before optimizer step ``at``; an ``aux`` head (in the loss) exists until removed."""

    def __init__(self, change: Callable[[TinyMLP], None], at: int = 8) -> None:
        super().__init__()
        self.change, self.at = change, at
        self.aux = nn.Linear(4, 2)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step + 1 == self.at:
            self.change(self)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = x.to(self.net[0].weight.dtype)
        loss = F.cross_entropy(self.net(x), y)
        for name in ("aux", "head2"):
            if hasattr(self, name):
                loss = loss + 0.1 * getattr(self, name)(x).square().mean()
        return loss


@pytest.mark.parametrize("case", list(CHANGES))
def test_reliability_parameters_changed_during_fit_rebuild_the_observer_without_stale_numbers(tmp_path, case):
    change, expected = CHANGES[case]
    model = Changing(change)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, model, max_steps=15)
    ours = _ours(caught)
    changed = [m for m in ours if CHANGED in m]
    assert len(changed) == 1 and "before step 8" in changed[0] and expected in changed[0], ours
    if case == "widen_group":  # the tracker restarts the group's history
        assert any("Group 'rescale/net.0' changed size from 8x9 to 12x9" in m for m in ours), ours
    assert monitor.num_observations == 15
    # the tracker follows the rebuilt observer: no forecast of a group that is no longer observed
    now = set(monitor._observer.units())
    assert {k[len("shockmon/forecast/") :] for k in monitor.last_metrics if k.startswith("shockmon/forecast/")} == {
        *now,
        "trajectory",
    }
    assert monitor._tracker.groups == [g for g in monitor._tracker.groups if g in now]
    # the last read (step 15) shows the parameters as they are now, not as the observer first saw them
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    raw = {k[len("shockmon/raw/") :]: v for k, v in monitor.last_metrics.items() if k.startswith("shockmon/raw/")}
    assert {k for k in raw if "/" not in k} == set(trainable)
    for name, p in trainable.items():
        assert raw[name] == pytest.approx(p.detach().double().norm().item(), rel=1e-5), name
    fresh = Observer(model).compute()
    for key, v in fresh.items():
        if key.startswith("quotient/") and v.ndim == 0:
            assert monitor.last_metrics[f"shockmon/{key}"] == pytest.approx(v.item(), rel=1e-4), key


def test_reliability_observer_survives_a_dtype_move_of_its_model():
    model = _mlp()
    observer = Observer(model)
    observer.compute()
    model.double()
    values = observer.compute()  # was a crash inside torch._foreach_norm (float64 under a float32 accumulator)
    fresh = Observer(model, dtype=torch.float32).compute()
    for key, v in fresh.items():
        if "dynamics/" not in key:
            torch.testing.assert_close(values[key], v, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reliability_model_moved_between_cpu_and_cuda_mid_run(tmp_path):
    class Moving(TinyMLP):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if self.global_step + 1 == 8:
                self.cuda()
            if self.global_step + 1 == 14:
                self.cpu()

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = (t.to(self.net[0].weight.device) for t in batch)
            return F.cross_entropy(self.net(x), y)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = _fit(tmp_path, Moving(), max_steps=20)
    changed = [m for m in _ours(caught) if CHANGED in m]
    assert len(changed) == 2 and "device cpu -> cuda" in changed[0] and "-> cpu" in changed[1], changed
    assert monitor.num_observations == 20 and monitor.events == []


@pytest.mark.parametrize("case", ["mlp", "cnn", "gpt"])
def test_reliability_per_step_path_runs_where_the_host_cannot_read_values(case):
    """The per-step path on the ``meta`` device, whose tensors have no values: a host sync (``.item()``,
    ``bool()``, ``.cpu()``, ``.tolist()``) raises there, and so does a tensor made on the CPU and mixed in (a
    0-d CPU tensor is a scalar, as on a GPU). The CPU stand-in for the GPU checks no machine here can run."""
    from benchmarks.overhead import cases

    with torch.device("meta"):
        net = cases(True, "cpu")[case].net()
    for p in net.parameters():
        p.grad = torch.empty_like(p)
    observer, tracker = Observer(net), BurgersTracker()
    steps = 4 * tracker.window  # past full windows: every stage of the tracker runs
    for step in range(steps + 8):
        read = step % 5 == 0  # a log step: the gradient observables, spectra and raw norms too
        with _host_to_device_copies() as copies:
            grads = observer.grad_observables(check_finite=True) if read else {"grads:finite": observer.grads_finite()}
            values = observer.compute(lr=1e-3, spectra=read, raw=read)
            tracker.update(step, observer.units(), trajectory=observer.trajectory(values), lr=1e-3)
        outputs = [*grads.values(), *values.values(), *tracker.forecast().values(), *tracker.summary().values()]
        assert {t.device.type for t in outputs} == {"meta"}
        if step >= steps:  # once the first windows' designs are cached: no blocking host->device copy at all
            assert copies == [], (step, copies)
    assert len(tracker.groups) == len(observer.units()) > 0


class _CopyCounter(TorchDispatchMode):
    def __init__(self, copies: list[str]) -> None:
        super().__init__()
        self.copies = copies

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            blocking = not kwargs.get("non_blocking", args[2] if name == "copy_" and len(args) > 2 else False)
            if blocking and src.device.type == "cpu" and src.dim() > 0 and out.device.type != "cpu":
                self.copies.append(f"{name} {tuple(src.shape)}")
        return out


@contextlib.contextmanager
def _host_to_device_copies() -> Iterator[list[str]]:
    """Blocking host->device copies made inside: each synchronises a GPU stream (the host waits for the queued
    step), so the per-step path must make none. ``torch.tensor(data, device=...)`` copies below the dispatcher:
    it is watched by wrapping it (and ``as_tensor``); ``.to(device)`` of a CPU tensor through the dispatcher."""
    copies: list[str] = []
    real = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}

    def watched(name: str) -> Callable[..., Tensor]:
        def make(data: Any, *args: Any, **kwargs: Any) -> Tensor:
            out = real[name](data, *args, **kwargs)
            already = isinstance(data, Tensor) and data.device == out.device
            if out.device.type != "cpu" and not already:
                copies.append(f"torch.{name} {tuple(out.shape)}")
            return out

        return make

    with pytest.MonkeyPatch.context() as mp, _CopyCounter(copies):
        for name in real:
            mp.setattr(torch, name, watched(name))
        yield copies


def test_reliability_tracker_state_moves_to_the_device_of_its_inputs():
    """A tracker that ran on the CPU, fed tensors on another device (``meta`` here, CUDA for a user whose
    checkpoint was saved on the CPU), moves its state there once and goes on without touching the host."""
    g = torch.Generator().manual_seed(0)
    tracker = BurgersTracker()
    for step in range(30):
        tracker.update(step, {"a": torch.randn(64, 3, generator=g), "b": torch.randn(40, generator=g)},
                       trajectory=torch.randn(5, generator=g))
    meta = {"a": torch.empty(64, 3, device="meta"), "b": torch.empty(40, device="meta")}
    for step in range(30, 50):
        tracker.update(step, meta, trajectory=torch.empty(5, device="meta"))
    assert {t.device.type for t in tracker.summary().values()} == {"meta"}
    sd = tracker.state_dict()
    assert {t.device.type for t in sd["g"].values()} == {"meta"}
    assert {t.device.type for b in sd["buckets"] for t in b.values() if torch.is_tensor(t)} == {"meta"}


def test_reliability_one_unit_groups(tmp_path):
    observer = Observer(_mlp(hidden=1))
    values = observer.compute()
    assert observer.units()["rescale/0"].shape == (1, 9)
    assert all(torch.isfinite(v).all() for k, v in values.items() if "dynamics/" not in k)
    tracker = BurgersTracker(window=4)
    g = torch.Generator().manual_seed(0)
    for step in range(40):  # one particle drifting, and a 1x3 group
        tracker.update(step, {"one": torch.tensor([0.1 * step]), "one_3d": torch.randn(1, 3, generator=g)})
        assert all(math.isfinite(v.item()) or math.isinf(v.item()) for v in tracker.forecast().values())
    assert tracker.poll() == []
    monitor = _fit(tmp_path, TinyMLP(hidden=1), max_steps=10)
    assert monitor.num_observations == 10 and monitor.events == []


def test_reliability_tracker_groups_of_shape_n_and_n_by_1_together():
    # found by test_property_tracker_never_raises_and_roundtrips: both are (n, D=1), so they share a bucket, and
    # stacking them raised inside torch.stack
    tracker = BurgersTracker()
    x0 = torch.linspace(-3.0, 3.0, 64)
    for step in range(40):
        x = x0 - 0.01 * step * torch.sin(x0)
        tracker.update(step, {"flat": x, "column": x[:, None]})
    events = tracker.poll()
    by_group = {g: [(e.kind, e.step, e.predicted_step) for e in events if e.group == g] for g in ("flat", "column")}
    assert by_group["flat"] and by_group["flat"] == by_group["column"]


def test_reliability_a_group_of_100k_units_is_subsampled_at_a_fixed_state_size():
    sizes = []
    for n in (20_000, 100_000):
        model = _mlp(hidden=n)
        observer, tracker = Observer(model), BurgersTracker(max_particles=4096)
        for step in range(4):
            with torch.no_grad():
                model[0].weight.mul_(1.01)
            observer.compute(spectra=False)
            units = observer.units()
            tracker.update(step, units)
        assert units["rescale/0"].shape == (n, 9)
        (bucket,) = tracker._buckets
        assert bucket.n == 4096 and bucket.sub is not None and int(bucket.sub.max()) < n
        sizes.append(tensor_bytes(tracker.state_dict()))
        assert tracker.poll() == []
    assert sizes[0] == sizes[1] < 8 * 2**20  # O(max_particles x window), not O(units)


@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "16-true"])
def test_reliability_true_low_and_double_precision_parameters(tmp_path, precision):
    monitor = _fit(tmp_path, TinyMLP(), max_steps=10, precision=precision)
    assert monitor.observer.dtype == (torch.float64 if precision == "64-true" else torch.float32)
    assert monitor.events == []
    logged = [v for k, v in monitor.last_metrics.items() if "/quotient/" in k]
    assert logged and all(math.isfinite(v) for v in logged)


# ------------------------------------------------------------------------------------------- training set-ups
class Recording(TinyMLP):
    """Records, before each optimizer step, the rescale grad norm of ``net.0`` from the unclipped gradients and
    the learning rate the step applies; optional per-step scheduler."""

    def __init__(self, scheduler: bool = False) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.grad_norms: dict[int, float] = {}
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        w, b = self.net[0].weight, self.net[0].bias
        sq = (w.double() * w.grad.double()).square().sum() + (b.double() * b.grad.double()).square().sum()
        self.grad_norms[self.global_step + 1] = sq.sqrt().item()
        self.lrs[self.global_step + 1] = optimizer.param_groups[0]["lr"]

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_reliability_gradient_clipping_observes_the_gradient_before_clipping(tmp_path):
    model = Recording()
    monitor = _fit(tmp_path, model, max_steps=10, gradient_clip_val=1e-3)
    logged = monitor.last_metrics["shockmon/quotient/rescale/net.0/grad_norm"]
    assert logged == pytest.approx(model.grad_norms[10], rel=1e-5)
    assert logged > 1e-3  # so it was not the clipped gradient


def test_reliability_lr_scheduler_effective_learning_rate_uses_the_lr_each_step_applied(tmp_path):
    model = Recording(scheduler=True)
    monitor = ShockMonitor(log_every_n_steps=1, print_summary=False)
    passed: dict[int, float] = {}
    make = monitor._make_observer

    def spied(pl_module):  # type: ignore[no-untyped-def]
        observer = make(pl_module)
        compute = observer.compute

        def recording(lr=None, **kw):  # type: ignore[no-untyped-def]
            passed[pl_module.global_step] = lr
            return compute(lr=lr, **kw)

        observer.compute = recording
        return observer

    monitor._make_observer = spied  # type: ignore[method-assign]
    _fit(tmp_path, model, monitor, max_steps=10)
    assert passed == model.lrs  # 0.1, 0.1, 0.1, 0.05, ... as applied, not one scheduler step ahead
    assert len(set(passed.values())) == 4


def test_reliability_max_steps_smaller_than_the_tracker_window(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=50, window=16, print_summary=False)
    _fit(tmp_path, TinyMLP(), monitor, max_steps=5)
    assert monitor.num_observations == 5 and monitor.events == []
    assert monitor.latest["steps_to_shock"] == math.inf  # too short to forecast: inf, not a guess
    assert "shockmon/alerts" in monitor.last_metrics  # the end-of-fit read still logged


def _strip_versions(state: dict[str, Any]) -> dict[str, Any]:
    """Today's layout minus the fields added with the version (what a version-0 checkpoint holds)."""
    return {k: v for k, v in state.items() if k not in ("version", "nonfinite_grad_steps")}


def test_reliability_state_dicts_carry_a_version_and_read_version_0():
    monitor = ShockMonitor(log_every_n_steps=5)
    stopper = ShockEarlyStopping("val_loss")
    for cb in (monitor, stopper):
        assert cb.state_dict()["version"] == 1
    old = _strip_versions(monitor.state_dict())
    old.update(alerts=3, observations=40)
    fresh = ShockMonitor(log_every_n_steps=5)
    fresh.load_state_dict(old)
    assert (fresh.alerts, fresh.num_observations) == (3, 40)
    fresh_stopper = ShockEarlyStopping("val_loss")
    fresh_stopper.load_state_dict({**_strip_versions(stopper.state_dict()), "wait_count": 2})
    assert fresh_stopper.wait_count == 2


@pytest.mark.parametrize("version", [2, 99, "1", None])
def test_reliability_state_dict_of_an_unknown_version_is_a_clear_error(version):
    state = ShockMonitor().state_dict()
    with pytest.raises(ValueError, match=f"ShockMonitor state version {version!r} is not supported"):
        ShockMonitor().load_state_dict({**state, "version": version})
    stopper_state = ShockEarlyStopping("val_loss").state_dict()
    with pytest.raises(ValueError, match=f"ShockEarlyStopping state version {version!r} is not supported"):
        ShockEarlyStopping("val_loss").load_state_dict({**stopper_state, "version": version})


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_reliability_resume_from_a_checkpoint_of_the_older_layout(tmp_path):
    def callbacks() -> list[pl.Callback]:
        return [ShockMonitor(log_every_n_steps=5, print_summary=False), ShockEarlyStopping("train_loss")]

    first = callbacks()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    trainer(tmp_path / "a", [*first, ckpt], max_steps=10, enable_checkpointing=True, limit_val_batches=0).fit(
        TinyMLP()
    )
    (path,) = (tmp_path / "ckpt").glob("*step=10*.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    for key in [k for k in checkpoint["callbacks"] if "ShockMonitor" in k or "ShockEarlyStopping" in k]:
        checkpoint["callbacks"][key] = _strip_versions(checkpoint["callbacks"][key])
        assert "version" not in checkpoint["callbacks"][key]
    old = tmp_path / "old_layout.ckpt"
    torch.save(checkpoint, old)
    resumed = callbacks()
    trainer(tmp_path / "b", resumed, max_steps=20, limit_val_batches=0).fit(TinyMLP(), ckpt_path=old)
    assert resumed[0].num_observations == 20  # 10 restored + 10 observed
    assert resumed[0].state_dict()["version"] == 1


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_reliability_resume_with_other_tracker_settings_uses_them_and_says_so(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    first = ShockMonitor(horizon=50, log_every_n_steps=5, print_summary=False)
    trainer(tmp_path / "a", [first, ckpt], max_steps=10, enable_checkpointing=True, limit_val_batches=0).fit(TinyMLP())
    (path,) = (tmp_path / "ckpt").glob("*step=10*.ckpt")
    resumed = ShockMonitor(horizon=80, window=12, log_every_n_steps=5, print_summary=False)
    with pytest.warns(UserWarning, match="other settings") as caught:
        trainer(tmp_path / "b", [resumed], max_steps=20, limit_val_batches=0).fit(TinyMLP(), ckpt_path=path)
    (message,) = [str(w.message) for w in caught if "other settings" in str(w.message)]
    assert "horizon=80.0 (saved: 50.0)" in message and "saved window=16 (yours: 12)" in message
    assert resumed.tracker is not None and (resumed.tracker.horizon, resumed.tracker.window) == (80.0, 16)
    assert resumed.num_observations == 20


# ---------------------------------------------------------------------------------------------------- files
class Counting(TinyMLP):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_reliability_tensorboard_dir_that_cannot_be_created_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    model = Counting()
    # Lightning creates the writer before any callback's setup; the OS error names the path
    with pytest.raises(OSError, match="a_file"):
        _fit(tmp_path, model, logger=TensorBoardLogger(tmp_path / "a_file" / "tb"))
    assert model.steps == 0


def test_reliability_tensorboard_dir_not_writable_is_an_error_at_setup(tmp_path, monkeypatch):
    # root may write anywhere, so the permission is taken away where the monitor asks for it
    monkeypatch.setattr(monitor_module.os, "access", lambda path, mode: False)
    model = Counting()
    logger = TensorBoardLogger(tmp_path / "tb")
    with pytest.raises(MisconfigurationException, match="ShockMonitor cannot write TensorBoard event files to '.*tb"):
        _fit(tmp_path, model, logger=logger)
    assert model.steps == 0


def test_reliability_tensorboard_dir_check_reports_the_os_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert monitor_module._unwritable(str(tmp_path / "ok")) is None
    assert "Not a directory" in (monitor_module._unwritable(str(tmp_path / "a_file" / "tb")) or "")


# ------------------------------------------------------------------------------------------------ arguments
def _mlp_report() -> Any:
    return discover(_mlp())


# Covered elsewhere (not repeated): Observer `model` type, `proj_dim` 0, `dtype` float16, `report` type
# (test_observer_bad_arguments); discover `model` type/empty, bad declarations (test_discover_bad_input); every
# BurgersTracker range (test_tracker_invalid_arguments); ShockMonitor ranges (test_shock_monitor_rejects_bad_arguments,
# test_shock_monitor_rejects_non_dict_kwargs); ShockEarlyStopping `stop_on` values, `hold_during_forecast` type
# (test_shock_early_stopping_rejects_bad_stop_on); CLI `demo --steps 0`, `--model cnn` (test_cli_rejects_bad_arguments),
# `report RUN_DIR` (test_report_bad_input_one_line_and_exit_2).
BAD_ARGUMENTS: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    # Observer
    "Observer/model-range": (lambda: Observer(nn.ReLU()), ValueError, "`model` to have at least one parameter"),
    "Observer/extra-type": (lambda: Observer(_mlp(), extra=3), TypeError, "`extra`"),  # type: ignore[arg-type]
    "Observer/dtype-type": (lambda: Observer(_mlp(), dtype="float32"), ValueError, "`dtype`"),  # type: ignore
    "Observer/proj_dim-type": (lambda: Observer(_mlp(), proj_dim=2.0), ValueError, "`proj_dim`"),  # type: ignore
    "Observer/balance_sweeps-range": (lambda: Observer(_mlp(), balance_sweeps=0), ValueError, "`balance_sweeps`"),
    "Observer/balance_sweeps-type": (lambda: Observer(_mlp(), balance_sweeps="2"), ValueError, "`balance_sweeps`"),
    "Observer/angular_step-type": (lambda: Observer(_mlp(), angular_step="yes"), TypeError, "`angular_step`"),
    "Observer/seed-type": (lambda: Observer(_mlp(), seed="0"), TypeError, "`seed`"),  # type: ignore[arg-type]
    "Observer/reduce-type": (lambda: Observer(_mlp(), reduce=3), TypeError, "`reduce`"),  # type: ignore[arg-type]
    # discover
    "discover/extra-type": (lambda: discover(_mlp(), extra=3), TypeError, "`extra`"),  # type: ignore[arg-type]
    "discover/extra-range": (lambda: discover(_mlp(), extra="no/such.yaml"), ValueError, "does not exist"),
    # BurgersTracker: wrong types (its ranges: test_tracker_invalid_arguments)
    **{
        f"BurgersTracker/{name}-type": (
            (lambda name=name: BurgersTracker(**{name: "3"})),
            ValueError,
            f"`{name}`",
        )
        for name in (
            "horizon window neighbors alpha rank quantile method time n_on n_off disarm_horizon cooldown warmup"
            " shock_updates riccati_window trajectory_window growth growth_window max_particles knn_every units"
            " capacity seed"
        ).split()
    },
    # ShockMonitor
    "ShockMonitor/log_every_n_steps-type": (lambda: ShockMonitor(log_every_n_steps="5"), ValueError, "`log_every"),
    "ShockMonitor/histogram_every_n_steps-range": (
        lambda: ShockMonitor(histogram_every_n_steps=-1),
        ValueError,
        "`histogram_every_n_steps`",
    ),
    "ShockMonitor/every_n_steps-type": (lambda: ShockMonitor(every_n_steps=1.5), ValueError, "`every_n_steps`"),
    "ShockMonitor/horizon-type": (lambda: ShockMonitor(horizon="200"), ValueError, "`horizon`"),
    "ShockMonitor/window-type": (lambda: ShockMonitor(window=16.0), ValueError, "`window`"),
    "ShockMonitor/prefix-type": (lambda: ShockMonitor(prefix=3), ValueError, "`prefix`"),
    "ShockMonitor/prefix-range": (lambda: ShockMonitor(prefix=""), ValueError, "`prefix`"),
    "ShockMonitor/progress_bar-type": (lambda: ShockMonitor(progress_bar="no"), TypeError, "`progress_bar`"),
    "ShockMonitor/print_summary-type": (lambda: ShockMonitor(print_summary=1), TypeError, "`print_summary`"),
    "ShockMonitor/max_events-type": (lambda: ShockMonitor(max_events=1.5), ValueError, "`max_events`"),
    "ShockMonitor/snapshot_units-range": (lambda: ShockMonitor(snapshot_units=-1), ValueError, "`snapshot_units`"),
    "ShockMonitor/snapshot_units-type": (lambda: ShockMonitor(snapshot_units="64"), ValueError, "`snapshot_units`"),
    "ShockMonitor/tracker_kwargs-type": (lambda: ShockMonitor(tracker_kwargs=[1]), TypeError, "`tracker_kwargs`"),
    "ShockMonitor/tracker_kwargs-key": (
        lambda: ShockMonitor(tracker_kwargs={"nope": 1}),
        ValueError,
        "keys of argument `tracker_kwargs` to be arguments of BurgersTracker, one of .*neighbors.*'nope'",
    ),
    "ShockMonitor/tracker_kwargs-own": (
        lambda: ShockMonitor(tracker_kwargs={"horizon": 5}),
        ValueError,
        "pass `horizon` to ShockMonitor itself",
    ),
    "ShockMonitor/observer_kwargs-key": (
        lambda: ShockMonitor(observer_kwargs={"proj": 2}),
        ValueError,
        "keys of argument `observer_kwargs` to be arguments of Observer, one of .*proj_dim.*'proj'",
    ),
    "ShockMonitor/observer_kwargs-own": (
        lambda: ShockMonitor(observer_kwargs={"model": None}),
        ValueError,
        "`observer_kwargs` not to contain 'model'",
    ),
    # ShockEarlyStopping (Lightning's EarlyStopping checks only `mode`)
    "ShockEarlyStopping/monitor-type": (lambda: ShockEarlyStopping(3), TypeError, "`monitor`"),  # type: ignore
    "ShockEarlyStopping/min_delta-type": (lambda: ShockEarlyStopping("m", min_delta="x"), ValueError, "`min_delta`"),
    "ShockEarlyStopping/min_delta-range": (
        lambda: ShockEarlyStopping("m", min_delta=math.nan),
        ValueError,
        "`min_delta`",
    ),
    "ShockEarlyStopping/patience-range": (lambda: ShockEarlyStopping("m", patience=-1), ValueError, "`patience`"),
    "ShockEarlyStopping/patience-type": (lambda: ShockEarlyStopping("m", patience=2.5), ValueError, "`patience`"),
    "ShockEarlyStopping/mode-range": (lambda: ShockEarlyStopping("m", mode="maxx"), MisconfigurationException, "mode"),
    "ShockEarlyStopping/stopping_threshold-type": (
        lambda: ShockEarlyStopping("m", stopping_threshold="a"),
        ValueError,
        "`stopping_threshold`",
    ),
    "ShockEarlyStopping/divergence_threshold-range": (
        lambda: ShockEarlyStopping("m", divergence_threshold=math.nan),
        ValueError,
        "`divergence_threshold`",
    ),
    **{
        f"ShockEarlyStopping/{flag}-type": (
            (lambda flag=flag: ShockEarlyStopping("m", **{flag: "no"})),
            TypeError,
            f"`{flag}` to be a bool",
        )
        for flag in ("verbose", "strict", "check_finite", "check_on_train_epoch_end", "log_rank_zero_only")
    },
    "ShockEarlyStopping/stop_on-type": (lambda: ShockEarlyStopping(stop_on=3), TypeError, "`stop_on`"),
    "ShockEarlyStopping/shock_monitor-type": (
        lambda: ShockEarlyStopping(shock_monitor=3),
        TypeError,
        "`shock_monitor`",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_reliability_bad_arguments_name_the_argument(case):
    make, error, match = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=match):
        make()


def test_reliability_bad_observer_kwargs_values_fail_at_fit_start_before_training(tmp_path):
    model = Counting()
    with pytest.raises(ValueError, match="`proj_dim` to be an integer >= 1, but got 0"):
        _fit(tmp_path, model, ShockMonitor(observer_kwargs={"proj_dim": 0}))
    assert model.steps == 0


def test_reliability_shock_early_stopping_unknown_monitor_prefix_fails_at_setup(tmp_path):
    model = Counting()
    with pytest.raises(MisconfigurationException, match="shock_monitor='nope'.*valid values: 'shockmon'"):
        _fit(tmp_path, model, callbacks=[ShockEarlyStopping(shock_monitor="nope")])
    assert model.steps == 0


CLI_BAD = {
    "demo --steps x": (["demo", "--steps", "x"], "argument --steps: expected a positive integer, got 'x'"),
    "demo --seed -1": (["demo", "--seed", "-1"], "argument --seed: expected an integer in [0, 2**32 - 1], got '-1'"),
    "demo --seed x": (["demo", "--seed", "x"], "argument --seed"),
    "demo --device tpu": (["demo", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    "demo --eval-every 0": (["demo", "--eval-every", "0"], "argument --eval-every: expected a positive integer"),
    "demo --log-every x": (["demo", "--log-every", "x"], "argument --log-every: expected a positive integer"),
    "demo --threads 0": (["demo", "--threads", "0"], "argument --threads: expected a positive integer"),
    "report --format xml": (["report", ".", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
    "no subcommand": ([], "required"),
}


@pytest.mark.parametrize("case", list(CLI_BAD))
def test_reliability_cli_bad_flags_exit_2_naming_the_flag(case, capsys):
    argv, expected = CLI_BAD[case]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_reliability_cli_demo_unwritable_out_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "runs"
    code = cli_main(["demo", "--steps", "2", "--out", str(out), "--no-progress-bar", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("shockmon demo: error: "), err
    assert str(out) in err and "--out" in err


def test_reliability_cli_report_unwritable_out_is_one_line_exit_2(tmp_path, capsys):
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    _fit(tmp_path, TinyMLP(), max_steps=5, logger=logger)
    (tmp_path / "a_file").write_text("x")
    code = cli_main(["report", logger.log_dir, "--out", str(tmp_path / "a_file" / "png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("shockmon report: error: "), err
    assert "a_file" in err
