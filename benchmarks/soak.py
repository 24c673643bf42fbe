"""Soak: a long CPU run with every-step monitoring; memory and state must stay flat, alerts and checkpoints right.

Run ``python -m benchmarks.soak [--steps N]`` (default 100 000). Writes ``benchmarks/results/soak.json`` (``--out``).

The run. A tiny module with two ReLU MLPs: ``net`` (8-32-4) trained by SGD on a fixed batch, and ``probe`` (4-8-2)
whose weights follow a script (its learning rate is 0): quiet (each unit's log scale fixed, jittered by 1e-3) until
``steps - 80``, then the units' log scales move on straight lines that all cross at ``steps - 20`` (the scripted
transition of ``tests/callback_models.ScriptedTransition``, shifted to the end of the run). ``ShockMonitor``
observes every optimizer step and reads back every 50 steps (``log_every_n_steps=50``, horizon 100), logging to a
TensorBoard logger; the module logs its loss every step through ``self.log``. A checkpoint is written at ``steps -
100``.

Sampled every ``--sample-every`` steps (default: steps / 200): the process's resident set (``/proc/self/statm``,
after ``gc.collect()`` and glibc ``malloc_trim(0)``, so freed memory the allocator keeps cached does not count), the
tracker's state (bytes of every tensor of ``state_dict()``), the monitor's checkpointed state (``torch.save`` size
of ``state_dict()`` with its events left out: events are kept up to ``max_events`` and counted apart) and the
number of events. Reported: the RSS slope after warm-up (least squares over the samples after ``--warmup``, default
a fifth of the run) in bytes per 1000 steps, and the state sizes at the first sample after warm-up and at the end.

Checked at the end (``checks`` in the JSON; the exit status is 1 if one fails):

- the scripted transition is caught: a forecast for ``rescale/probe.0`` at least 20 steps before the cross and a
  shock within 6 steps after it; and exactly as a fresh run of the same script catches it (a 400-step run whose
  probe crosses at step 380, the noise seeded relative to the cross): the same events at the same steps relative to
  the cross, with the same forecasts (to 0.1 step) -- so nothing in the tracker drifts with the run's length;
- the bookkeeping agrees: ``alerts`` equals the events read, the per-group counts add up to it, and the last
  ``shockmon/alerts`` scalar in the TensorBoard file equals it;
- the checkpoint at ``steps - 100`` resumes, in a new Trainer, to the same events and the same last tracker summary
  as the uninterrupted run.

Events of the quiet phase (the tracker's false alarms over the run, or real ones of ``net``) are reported, not
judged.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import json
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from shockmon import ShockMonitor
from shockmon.events import EventKind

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
LOG_EVERY = 50
HORIZON = 100
LEAD, CROSS_BEFORE_END = 60, 20  # the probe's units start converging 60 steps before they cross, 20 before the end
CHECKPOINT_BEFORE_END = 100


# ------------------------------------------------------------------------------------------------------- the run
class _SameBatch(IterableDataset):
    """The same batch forever (one epoch for the whole run: no per-epoch overhead in the soak)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(64, 8, generator=g)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long() + 2 * (self.x[:, 2] > 0).long()

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.x, self.y


class SoakModule(pl.LightningModule):
    """``net`` trained by SGD; ``probe`` scripted: quiet, then units that cross at ``cross`` (see the module doc)."""

    def __init__(self, cross: int, lead: int = LEAD, noise: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.probe = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.cross, self.start, self.noise = cross, cross - lead, noise
        g = torch.Generator().manual_seed(1)
        u, v = torch.randn(1, 4, generator=g), torch.randn(2, 1, generator=g)
        self.register_buffer("u", (u / u.norm()).expand(8, 4).clone())
        self.register_buffer("v", (v / v.norm()).expand(2, 8).clone())
        self.register_buffer("log_r0", torch.linspace(-1.0, 1.0, 8)[torch.randperm(8, generator=g)])

    def scripted(self, step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(1_000_000 + step - self.cross)  # the same noise relative to the cross
        frac = max(0, step - self.start) / (self.cross - self.start)
        log_r = (1.0 - frac) * self.log_r0 + self.noise * torch.randn(8, generator=g)
        r = log_r.exp()
        return r[:, None] * self.u, self.v * r[None, :]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        w_in, w_out = self.scripted(self.global_step + 1)  # what the monitor sees after this step
        with torch.no_grad():
            self.probe[0].weight.copy_(w_in)
            self.probe[2].weight.copy_(w_out)
            self.probe[0].bias.zero_()
            self.probe[2].bias.zero_()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y) + 1e-3 * self.probe(x[:, :4]).square().mean()
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_SameBatch(), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [{"params": self.net.parameters(), "lr": 0.05}, {"params": self.probe.parameters(), "lr": 0.0}]
        )


# ------------------------------------------------------------------------------------------------- measurements
_LIBC: Any = None


def rss_bytes() -> int:
    """Resident set size now, after a full collection and returning the allocator's free memory to the OS."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak instead
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state dict."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def monitor_state_bytes(monitor: ShockMonitor) -> int:
    """``torch.save`` size of the monitor's checkpointed state, its events left out (they are counted apart)."""
    state = dict(monitor.state_dict(), events=[])
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.tell()


class Sampler(pl.Callback):
    """Every ``every`` optimizer steps: RSS, tracker and monitor state sizes, events."""

    def __init__(self, monitor: ShockMonitor, every: int) -> None:
        self.monitor, self.every = monitor, every
        self.samples: list[dict[str, Any]] = []
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        tracker = self.monitor.tracker
        self.samples.append(
            {
                "step": step,
                "seconds": round(time.perf_counter() - self._t0, 3),
                "rss_bytes": rss_bytes(),
                "tracker_state_bytes": tensor_bytes(tracker.state_dict()) if tracker is not None else 0,
                "monitor_state_bytes": monitor_state_bytes(self.monitor),
                "events": len(self.monitor.events),
            }
        )


def slope_per_1000(samples: list[dict[str, Any]], key: str) -> float:
    """Least-squares slope of ``key`` against the step, per 1000 steps."""
    xs = [s["step"] for s in samples]
    ys = [s[key] for s in samples]
    if len(xs) < 2:
        return math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else math.nan


def _trainer(root: Path, callbacks: list[pl.Callback], steps: int, logger: Any = False, **kw: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        callbacks=callbacks,
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=LOG_EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def _monitor() -> ShockMonitor:
    return ShockMonitor(log_every_n_steps=LOG_EVERY, horizon=HORIZON, print_summary=False)


def _event_rows(monitor: ShockMonitor) -> list[tuple[str, str, str, int, float]]:
    return [(e.kind.value, e.group, e.channel, e.step, round(e.predicted_step, 3)) for e in monitor.events]


def probe_events(monitor: ShockMonitor, cross: int) -> list[tuple[str, str, int, float]]:
    """The probe's events from the onset of its motion on, steps relative to the scripted cross."""
    return [
        (e.kind.value, e.channel, e.step - cross, round(e.predicted_step - cross, 1))
        for e in monitor.events
        if e.group == "rescale/probe.0" and e.step >= cross - LEAD
    ]


def reference_probe_events(steps: int = 400) -> list[tuple[str, str, int, float]]:
    """The probe's events on a fresh short run of the same script (cross ``steps - 20``)."""
    monitor = _monitor()
    with tempfile.TemporaryDirectory(prefix="shockmon_soak_ref_") as root:
        _trainer(Path(root), [monitor], steps).fit(SoakModule(steps - CROSS_BEFORE_END))
    return probe_events(monitor, steps - CROSS_BEFORE_END)


def _last_tensorboard_scalar(log_dir: str, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 1, "images": 1, "histograms": 1})
    acc.Reload()
    return float(acc.Scalars(tag)[-1].value)


# --------------------------------------------------------------------------------------------------------- main
def run(steps: int, sample_every: int | None = None, warmup: int | None = None, root: Path | None = None,
        resume_check: bool = True) -> dict[str, Any]:
    """The soak of ``steps`` optimizer steps; returns the result dict (see the module doc)."""
    if steps < CHECKPOINT_BEFORE_END + LEAD + 100:
        raise ValueError(f"Expected argument `steps` to be at least {CHECKPOINT_BEFORE_END + LEAD + 100}, "
                         f"but got {steps}")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    sample_every = sample_every or max(LOG_EVERY, steps // 200)
    warmup = steps // 5 if warmup is None else warmup
    cross = steps - CROSS_BEFORE_END
    ckpt_step = steps - CHECKPOINT_BEFORE_END
    own = root is None
    tmp = tempfile.TemporaryDirectory(prefix="shockmon_soak_") if own else None
    root = Path(tmp.name) if tmp is not None else Path(root)  # type: ignore[arg-type]
    try:
        monitor = _monitor()
        sampler = Sampler(monitor, sample_every)
        logger = TensorBoardLogger(root, name="soak", default_hp_metric=False)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=ckpt_step, save_top_k=-1)
        t0 = time.perf_counter()
        _trainer(root, [monitor, ckpt, sampler], steps, logger=logger).fit(SoakModule(cross))
        seconds = time.perf_counter() - t0
        samples = sampler.samples
        after = [s for s in samples if s["step"] >= warmup]
        quiet = [s for s in after if s["step"] < cross - LEAD]  # before the probe's units move

        # --- alerts at the end
        probe = "rescale/probe.0"
        forecasts = [e for e in monitor.events if e.kind is EventKind.FORECAST and e.group == probe
                     and e.channel == "particle" and e.step >= cross - LEAD]
        shocks = [e for e in monitor.events if e.kind is EventKind.SHOCK and e.group == probe
                  and e.channel == "particle" and e.step >= cross - LEAD]
        quiet_events = [e for e in monitor.events if e.step < cross - LEAD]
        checks: dict[str, bool] = {
            "forecast_at_least_20_steps_ahead": bool(forecasts) and forecasts[0].step <= cross - 20,
            "shock_within_6_steps": bool(shocks) and cross <= shocks[0].step <= cross + 6,
            "alerts_equal_events_read": monitor.alerts == len(monitor.events)
            or len(monitor.events) == monitor.max_events,
            "per_group_alerts_add_up": sum(
                v for k, v in monitor.last_metrics.items() if k.startswith("shockmon/alerts/")
            ) == monitor.alerts,
            "tensorboard_alerts_equal": _last_tensorboard_scalar(logger.log_dir, "shockmon/alerts")
            == monitor.alerts,
        }

        reference = reference_probe_events()
        checks["same_probe_events_as_a_fresh_run"] = probe_events(monitor, cross) == reference

        # --- checkpoint round trip: resume from steps - 100 in a new Trainer
        if resume_check:
            (path,) = (root / "ckpt").glob(f"*step={ckpt_step}*.ckpt")
            resumed = _monitor()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*ckpt_path.*")
                _trainer(root / "resumed", [resumed], steps).fit(SoakModule(cross), ckpt_path=path)
            checks["checkpoint_resumes_to_the_same_events"] = _event_rows(resumed) == _event_rows(monitor)
            checks["checkpoint_resumes_to_the_same_summary"] = all(
                (a == b) or (math.isnan(a) and math.isnan(b))
                for a, b in zip(resumed.latest.values(), monitor.latest.values())
            ) and list(resumed.latest) == list(monitor.latest)

        first, last = (after[0] if after else samples[0]), samples[-1]
        result = {
            "benchmark": "soak",
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "steps": steps,
            "log_every_n_steps": LOG_EVERY,
            "sample_every": sample_every,
            "warmup_steps": warmup,
            "seconds": round(seconds, 1),
            "ms_per_step": round(1e3 * seconds / steps, 3),
            "observations": monitor.num_observations,
            "rss_slope_bytes_per_1000_steps": slope_per_1000(after, "rss_bytes"),
            "rss_bytes": {"start": samples[0]["rss_bytes"], "after_warmup": first["rss_bytes"],
                          "end": last["rss_bytes"], "max_after_warmup": max(s["rss_bytes"] for s in after)},
            "tracker_state_bytes": {"after_warmup": first["tracker_state_bytes"], "end": last["tracker_state_bytes"],
                                    "distinct_after_warmup": sorted({s["tracker_state_bytes"] for s in after})},
            "monitor_state_bytes": {"after_warmup": first["monitor_state_bytes"], "end": last["monitor_state_bytes"],
                                    "distinct_quiet": sorted({s["monitor_state_bytes"] for s in quiet})},
            "monitor_state_slope_bytes_per_1000_steps": slope_per_1000(quiet, "monitor_state_bytes"),
            "events": [e.to_dict() for e in monitor.events],
            "quiet_phase_events": len(quiet_events),
            "alerts": monitor.alerts,
            "scripted_cross_step": cross,
            "probe_events_relative_to_cross": probe_events(monitor, cross),
            "fresh_run_probe_events_relative_to_cross": reference,
            "checks": checks,
            "samples": samples,
        }
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="optimizer steps (default: 100000)")
    parser.add_argument("--sample-every", type=int, default=None, help="steps between samples (default: steps/200)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before the slope is fitted (default: 1/5)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*")
    res = run(args.steps, args.sample_every, args.warmup)
    print(f"soak: {res['steps']} steps in {res['seconds']:.0f} s ({res['ms_per_step']:.2f} ms/step), "
          f"{res['observations']} observations, {res['alerts']} alerts ({res['quiet_phase_events']} before the"
          " scripted transition)")
    rss = res["rss_bytes"]
    print(f"RSS: start {rss['start'] / 2**20:.1f} MiB, after warm-up {rss['after_warmup'] / 2**20:.1f} MiB, "
          f"end {rss['end'] / 2**20:.1f} MiB; slope after warm-up "
          f"{res['rss_slope_bytes_per_1000_steps']:.0f} bytes per 1000 steps")
    ts, ms = res["tracker_state_bytes"], res["monitor_state_bytes"]
    print(f"tracker state: {ts['after_warmup']} -> {ts['end']} bytes; monitor state (events apart): "
          f"{ms['after_warmup']} -> {ms['end']} bytes")
    for name, ok in res["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    if not all(res["checks"].values()):
        raise SystemExit(1)
    return res


if __name__ == "__main__":
    main()
