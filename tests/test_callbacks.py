"""ShockMonitor: when it observes, what it logs, what it keeps, and that it never syncs between log steps."""

from __future__ import annotations

import csv
import logging
import pickle
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from callback_models import (
    TRANSITION_STEP,
    NoSymmetry,
    ScriptedTransition,
    TinyMLP,
    TwoOptimizers,
    loader,
    trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from shockmon import ShockMonitor
from shockmon.callbacks.monitor import COST_SKIP, COST_STEPS, overhead_advice
from shockmon.events import EventKind

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*LeafSpec.*",
)


def _spy_updates(monitor: ShockMonitor) -> list[int]:
    """Record the steps the tracker is updated at (wraps the monitor's tracker factory)."""
    steps: list[int] = []
    make = monitor._make_tracker

    def make_spied():  # type: ignore[no-untyped-def]
        tracker = make()
        update = tracker.update

        def spied(step, *a, **k):  # type: ignore[no-untyped-def]
            steps.append(step)
            return update(step, *a, **k)

        tracker.update = spied
        return tracker

    monitor._make_tracker = make_spied  # type: ignore[method-assign]
    return steps


# ------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_steps": -1}, "`log_every_n_steps` to be an integer >= 0"),
        ({"histogram_every_n_steps": 1.5}, "`histogram_every_n_steps`"),
        ({"every_n_steps": 0}, "`every_n_steps` to be a positive integer, but got 0"),
        ({"horizon": 0}, "`horizon`"),
        ({"window": 2}, "`window`"),
        ({"prefix": "/shockmon"}, "`prefix`"),
        ({"max_events": -1}, "`max_events`"),
        ({"tracker_kwargs": {"alpha": 2.0}}, "`alpha`"),
        ({"overhead_warning": 0}, "`overhead_warning` to be a positive number or None, but got 0"),
        ({"overhead_warning": True}, "`overhead_warning`"),
        ({"overhead_warning": "10%"}, "`overhead_warning`"),
    ],
    ids=[
        "log_every",
        "histogram_every",
        "every_n_steps",
        "horizon",
        "window",
        "prefix",
        "max_events",
        "tracker",
        "overhead_zero",
        "overhead_bool",
        "overhead_str",
    ],
)
def test_shock_monitor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShockMonitor(**kwargs)


def test_shock_monitor_rejects_non_dict_kwargs():
    with pytest.raises(TypeError, match="`observer_kwargs` to be a dict or None"):
        ShockMonitor(observer_kwargs=[1])


def test_shock_monitor_two_instances_need_two_prefixes(tmp_path):
    # Lightning refuses two stateful callbacks with one state_key; the state_key is the prefix
    with pytest.raises(RuntimeError, match="state_key"):
        trainer(tmp_path, [ShockMonitor(), ShockMonitor()], max_steps=1)


# ---------------------------------------------------------------------------------- the scripted shock
def test_shock_monitor_forecasts_then_reports_the_scripted_shock(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=5, horizon=100)
    trainer(tmp_path, [monitor], max_steps=80).fit(ScriptedTransition())
    forecasts = [e for e in monitor.events if e.kind is EventKind.FORECAST and e.channel == "particle"]
    shocks = [e for e in monitor.events if e.kind is EventKind.SHOCK and e.channel == "particle"]
    assert forecasts and shocks, monitor.events
    first = forecasts[0]
    assert first.group == "rescale/net.0"
    assert first.step < TRANSITION_STEP - 20  # a real warning, well before
    assert abs(first.predicted_step - TRANSITION_STEP) <= 5
    assert TRANSITION_STEP <= shocks[0].step <= TRANSITION_STEP + 6
    assert monitor.alerts == len(monitor.events)
    assert not monitor.shock_active  # the shock has passed by step 80


def test_shock_monitor_logs_every_tag_through_the_logger_api(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=10)
    logger = CSVLogger(tmp_path, name="csv")
    tr = trainer(tmp_path, [monitor], max_steps=70, logger=logger, log_every_n_steps=10)
    tr.fit(ScriptedTransition())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for tag in (
        "shockmon/quotient/rescale/net.0/path_mass_max",
        "shockmon/quotient/rescale/net.0/grad_norm",
        "shockmon/raw/net.0.weight",
        "shockmon/dynamics/rescale/net.0/balancedness_drift",
        "shockmon/forecast/rescale/net.0",
        "shockmon/forecast/trajectory",
        "shockmon/viscosity/rescale/net.0",
        "shockmon/state/rescale/net.0",
        "shockmon/burgers_consistency",
        "shockmon/steps_to_shock",
        "shockmon/shock",
        "shockmon/alerts",
        "shockmon/alerts/rescale/net.0",
    ):
        assert tag in columns, tag
    logged_steps = sorted({int(r["step"]) for r in rows if r["shockmon/alerts"] != ""})
    assert logged_steps == [10, 20, 30, 40, 50, 60, 70]
    # the gating signals are in callback_metrics (for EarlyStopping / ModelCheckpoint) and on the progress bar
    for key in ("shockmon/steps_to_shock", "shockmon/shock", "shockmon/alerts"):
        assert key in tr.callback_metrics
    assert "shockmon/steps_to_shock" in tr.progress_bar_metrics
    assert float(tr.callback_metrics["shockmon/alerts"]) == monitor.alerts >= 2


def test_shock_monitor_prints_the_symmetry_summary_at_fit_start(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(tmp_path, [ShockMonitor()], max_steps=2).fit(TinyMLP())
    assert "shockmon symmetry summary" in caplog.text
    assert "net.0.weight -> net.2.weight" in caplog.text


# ------------------------------------------------------------------------------------- host syncs
@contextmanager
def _no_host_sync():
    """Make every host read of a tensor raise (on CPU they would be free; on a GPU each is a sync)."""

    def forbid(name):  # type: ignore[no-untyped-def]
        def raiser(self, *a, **k):  # type: ignore[no-untyped-def]
            raise AssertionError(f"host sync: Tensor.{name} called between log steps")

        return raiser

    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, forbid(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_shock_monitor_does_not_sync_between_log_steps(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=10)
    guarded = Counter()

    def guard(hook, is_log_step):  # type: ignore[no-untyped-def]
        original = getattr(monitor, hook)

        def wrapped(trainer, *args):  # type: ignore[no-untyped-def]
            if is_log_step(trainer):
                return original(trainer, *args)
            guarded[hook] += 1
            with _no_host_sync():
                return original(trainer, *args)

        setattr(monitor, hook, wrapped)  # Lightning calls the instance's attribute

    guard("on_before_optimizer_step", lambda tr: False)
    guard("on_train_batch_end", lambda tr: tr.global_step % 10 == 0)
    trainer(tmp_path, [monitor], max_steps=30).fit(ScriptedTransition())
    assert guarded == {"on_before_optimizer_step": 30, "on_train_batch_end": 27}
    assert monitor.num_observations == 30


def test_shock_monitor_reads_the_device_once_per_log_step(tmp_path, monkeypatch):
    """A log step copies one tensor to the host: the values, summary and the tracker's new events together."""
    monitor = ShockMonitor(log_every_n_steps=10, horizon=100)
    copies: list[int] = []
    cpu = torch.Tensor.cpu
    read = monitor._read

    def counting_read(trainer, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls = [0]

        def counted(self, *a, **k):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return cpu(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, "cpu", counted)
        try:
            return read(trainer, *args, **kwargs)
        finally:
            monkeypatch.setattr(torch.Tensor, "cpu", cpu)
            copies.append(calls[0])

    monitor._read = counting_read
    trainer(tmp_path, [monitor], max_steps=80).fit(ScriptedTransition())
    assert copies == [1] * 8
    assert any(e.kind is EventKind.FORECAST for e in monitor.events)  # the events still arrive


# ---------------------------------------------------------------------------- when it observes
def test_shock_monitor_observes_once_per_optimizer_step_under_accumulation(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=2)
    steps = _spy_updates(monitor)
    tr = trainer(tmp_path, [monitor], max_epochs=2, accumulate_grad_batches=4)
    tr.fit(TinyMLP(batches=8))
    assert tr.global_step == 4
    assert steps == [1, 2, 3, 4]
    assert monitor.num_observations == 4


def test_shock_monitor_every_n_steps_thins_observations(tmp_path):
    monitor = ShockMonitor(every_n_steps=3, log_every_n_steps=6)
    steps = _spy_updates(monitor)
    trainer(tmp_path, [monitor], max_steps=12).fit(TinyMLP())
    assert steps == [3, 6, 9, 12]


@pytest.mark.parametrize(
    ("hook_ms", "read_ms", "step_ms", "every", "threshold"),
    [(2.0, 0.0, 3.6, 1, 0.1), (2.0, 0.05, 3.6, 1, 0.1), (2.0, 0.1, 3.6, 4, 0.1), (0.5, 0.0, 10.0, 1, 0.01),
     (30.0, 0.01, 31.0, 2, 0.05)],
)
def test_overhead_advice_names_a_stride_that_meets_the_threshold(hook_ms, read_ms, step_ms, every, threshold):
    steps = 100
    advice = overhead_advice(hook_ms * steps / 1e3, step_ms * steps / 1e3, steps, every, threshold, window=16,
                             read_s=read_ms * steps / 1e3)
    rest = step_ms - hook_ms
    frac, read = hook_ms / rest, read_ms / rest
    assert advice is not None and f"{frac:.0%} of the rest of the step" in advice
    k = int(advice.split("ShockMonitor(every_n_steps=")[1].split(")")[0].split(",")[0])
    assert k % every == 0 and (k // every) & (k // every - 1) == 0  # the stride times a power of two

    def at(stride: int) -> float:  # the observations thin with the stride, the log-step reads do not
        return (frac - read) * every / stride + read

    assert at(k) <= threshold and (k == every or at(k // 2) > threshold)
    # what the stride costs in detection is said too: the windows' span in steps, and that alerts are lost
    assert f"span {16 * k} steps and its instability test {36 * k}," in advice and "missed" in advice
    quiet = overhead_advice(hook_ms * steps / 1e3, step_ms * steps / 1e3, steps, every, threshold, window=16,
                            read_s=read_ms * steps / 1e3, growth_updates=0)  # no instability test (growth=0)
    assert quiet is not None and f"span {16 * k} steps, so" in quiet and "instability" not in quiet


def test_overhead_advice_is_given_the_instability_tests_span_from_the_monitors_tracker():
    monitor = ShockMonitor(tracker_kwargs={"growth_window": 10})
    monitor._tracker = monitor._make_tracker()
    assert monitor._growth_updates() == 30  # 3 windows: the fit and the history it must stand out of
    off = ShockMonitor(tracker_kwargs={"growth": 0})
    off._tracker = off._make_tracker()
    assert off._growth_updates() == 0

    class Minimal:  # a tracker from an overridden _make_tracker need not have the growth test
        window = 16

    monitor._tracker = Minimal()
    assert monitor._growth_updates() == 0


def test_overhead_advice_also_thins_the_log_steps_when_their_reads_take_much():
    # 2 ms of hooks on a 1.6 ms step, 0.5 ms of them reads (31 %): no stride alone gets under 10 %
    advice = overhead_advice(0.2, 0.36, 100, 1, 0.1, read_s=0.05, log_every=50)
    assert advice is not None and "log_every_n_steps=400" in advice  # 31 % / 8 < 5 %
    k = int(advice.split("ShockMonitor(every_n_steps=")[1].split(",")[0])
    assert (1.25 - 0.3125) / k + 0.3125 / 8 <= 0.1 < (1.25 - 0.3125) / (k // 2) + 0.3125 / 8


def test_overhead_advice_is_silent_under_the_threshold_and_on_empty_input():
    assert overhead_advice(0.01, 1.0, 100, 1, 0.1) is None  # 1 % of the step
    assert overhead_advice(0.0, 1.0, 100, 1, 0.1) is None
    assert overhead_advice(0.1, 0.0, 0, 1, 0.1) is None


def test_shock_monitor_warns_once_when_it_costs_more_than_overhead_warning(tmp_path, monkeypatch):
    # a fake clock, not a timing: every reading of it is 1 ms after the previous one, so each hook "takes" 1 ms and
    # each step 4 ms (two hooks, two readings each; a log step's read adds two more): the monitor costs 100 % of
    # the rest of the step, reads included (50 % at log steps)
    import types

    import shockmon.callbacks.monitor as monitor_module

    ticks = iter(range(10**9))
    monkeypatch.setattr(monitor_module, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-3))
    steps = COST_SKIP + COST_STEPS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [ShockMonitor(overhead_warning=0.5, log_every_n_steps=50)], max_steps=steps + 20).fit(
            TinyMLP()
        )
    advice = [str(w.message) for w in caught if "of host time per training step" in str(w.message)]
    assert len(advice) == 1
    assert "ShockMonitor takes 2.04 ms" in advice[0] and "measured over 100 steps at every_n_steps=1" in advice[0]
    assert "ShockMonitor(every_n_steps=4)" in advice[0]  # 100 % -> 25 % of observations + 2 % of reads < 50 %
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [ShockMonitor(overhead_warning=None)], max_steps=steps).fit(TinyMLP())
        trainer(tmp_path, [ShockMonitor(overhead_warning=1.5)], max_steps=steps).fit(TinyMLP())  # under it
        trainer(tmp_path, [ShockMonitor(overhead_warning=0.5)], max_steps=steps - 1).fit(TinyMLP())  # not timed
    assert not [w for w in caught if "of host time per training step" in str(w.message)]


def test_shock_monitor_every_n_steps_still_logs_at_every_log_step(tmp_path):
    # 16 does not divide 50: each log step reads the latest observation, logged at its own step, with the
    # observables only a read computes (gradient norms, raw norms)
    monitor = ShockMonitor(every_n_steps=16, log_every_n_steps=50)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [monitor], max_steps=120, logger=logger).fit(TinyMLP())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = sorted({int(r["step"]) for r in rows if r.get("shockmon/steps_to_shock")})
    assert steps == [48, 96, 112]
    grad = [k for k in rows[0] if k.endswith("grad_norm") and k.startswith("shockmon/quotient")]
    assert grad
    for step in (48, 96):
        assert [r for r in rows if int(r["step"]) == step and r[grad[0]] not in ("", "nan")]


def test_shock_monitor_manual_optimization_two_optimizers_frozen_bias(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=2)
    steps = _spy_updates(monitor)
    tr = trainer(tmp_path, [monitor], max_steps=8)
    tr.fit(TwoOptimizers())
    assert tr.global_step == 8  # each optimizer's step counts
    assert steps == [2, 4, 6, 8]  # one observation per batch, after both optimizers stepped
    assert "shockmon/steps_to_shock" in tr.callback_metrics


def test_shock_monitor_ignores_sanity_check_validation_test_and_predict(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=1)
    steps = _spy_updates(monitor)
    model = TinyMLP()
    tr = trainer(tmp_path, [monitor], max_steps=3, num_sanity_val_steps=2, val_check_interval=1)
    tr.fit(model)
    assert steps == [1, 2, 3]
    tr.validate(model, dataloaders=loader(seed=2), verbose=False)
    tr.test(model, dataloaders=loader(seed=3), verbose=False)
    tr.predict(model, dataloaders=loader(seed=4))
    assert steps == [1, 2, 3] and monitor.num_observations == 3


def test_shock_monitor_fast_dev_run(tmp_path):
    monitor = ShockMonitor()
    tr = pl.Trainer(
        default_root_dir=tmp_path,
        fast_dev_run=True,
        callbacks=[monitor],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    tr.fit(TinyMLP())
    assert monitor.num_observations == 1


def test_shock_monitor_bf16_mixed(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=5)
    tr = trainer(tmp_path, [monitor], max_steps=10, precision="bf16-mixed")
    tr.fit(TinyMLP())
    assert monitor.num_observations == 10
    assert torch.isfinite(tr.callback_metrics["shockmon/alerts"])
    assert monitor.latest["state/rescale/net.0"] == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a GPU")
def test_shock_monitor_16_mixed_on_gpu(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=5)
    trainer(tmp_path, [monitor], max_steps=10, precision="16-mixed", accelerator="gpu").fit(TinyMLP())
    assert monitor.num_observations == 10


def test_shock_monitor_torch_compiled_module(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=5)
    compiled = torch.compile(TinyMLP(log_loss=False), backend="eager")  # dynamo cannot trace self.log
    trainer(tmp_path, [monitor], max_steps=5).fit(compiled)
    assert monitor.num_observations == 5
    assert monitor.report is not None and not monitor.report.is_empty


def test_shock_monitor_model_without_symmetry_gets_raw_only_and_one_warning(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=5)
    logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [monitor], max_steps=5, logger=logger).fit(NoSymmetry())
    ours = [w for w in caught if "shockmon" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "no symmetry found" in str(ours[0].message)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        columns = set(next(csv.DictReader(f)))
    assert "shockmon/raw/net.0.weight" in columns
    assert not any(c.startswith("shockmon/quotient/") for c in columns)
    assert monitor.num_observations == 5


# ---------------------------------------------------------------------------------------- state
def test_shock_monitor_state_dict_round_trip_and_pickle(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=5, horizon=100)
    trainer(tmp_path, [monitor], max_steps=70).fit(ScriptedTransition())
    state = monitor.state_dict()
    fresh = ShockMonitor(log_every_n_steps=5, horizon=100)
    fresh.load_state_dict(state)
    assert fresh.events == monitor.events and fresh.alerts == monitor.alerts
    assert fresh.latest == monitor.latest
    again = fresh.state_dict()
    assert again["events"] == state["events"] and again["tracker"].keys() == state["tracker"].keys()
    clone = pickle.loads(pickle.dumps(ShockMonitor(horizon=50, prefix="x")))
    assert (clone.horizon, clone.prefix) == (50, "x")


def test_shock_monitor_state_key_lets_two_instances_coexist(tmp_path):
    a, b = (
        ShockMonitor(log_every_n_steps=5),
        ShockMonitor(log_every_n_steps=5, prefix="shockmon_slow", horizon=30),
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tr = trainer(tmp_path, [a, b, ckpt], max_steps=10, enable_checkpointing=True)
    tr.fit(TinyMLP())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert a.state_key != b.state_key and {a.state_key, b.state_key} <= set(saved)
    assert "shockmon_slow/steps_to_shock" in tr.callback_metrics


def _alerts(events):  # type: ignore[no-untyped-def]
    return [(e.kind.value, e.group, e.step, round(e.predicted_step, 3)) for e in events]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_shock_monitor_resumed_run_logs_the_same_alerts(tmp_path):
    kw = dict(log_every_n_steps=5, horizon=100)
    full = ShockMonitor(**kw)
    trainer(tmp_path / "a", [full], max_steps=80).fit(ScriptedTransition())
    assert len(full.events) >= 2

    first = ShockMonitor(**kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=33, save_top_k=-1)
    trainer(tmp_path / "b", [first, ckpt], max_steps=33, enable_checkpointing=True).fit(ScriptedTransition())
    path = next((tmp_path / "ckpt").glob("*step=33*.ckpt"))
    resumed = ShockMonitor(**kw)
    trainer(tmp_path / "c", [resumed], max_steps=80).fit(ScriptedTransition(), ckpt_path=path)
    assert _alerts(resumed.events) == _alerts(full.events)
    assert resumed.alerts == full.alerts
    assert resumed.latest == pytest.approx(full.latest, nan_ok=True)
