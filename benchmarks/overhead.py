"""Overhead of monitoring, per training step: no callback, ``ShockMonitor`` and peer monitors, side by side.

Every arm is a real ``Trainer.fit`` of its own copy of the same model (same initial weights, same batches),
built once, in a process of its own (forked on CPU, spawned on CUDA: no interpreter lock, allocator or peak
memory shared between arms). The arms never run at the same time: the parent hands out turns, one chunk of a
few optimizer steps each (A B C D E, B C D E A, ...: the order rotates each round), after a warm-up each. So
load changes on a shared machine hit all arms alike, and no ``Trainer`` is rebuilt or restarted between
chunks: every fit is one continuous run, its callbacks' state carried on.

A step's time is the interval between consecutive ``on_train_batch_start`` calls of a timing callback that
comes first in the callback list: it holds everything Lightning does per step (forward, backward, optimizer
step, every callback and module hook, logging, fetching the next batch). On CPU it is the thread's CPU time
(``time.thread_time``; one intra-op thread, so all of a step's work): on a machine shared with other jobs wall
time mostly measures the waits for a core; wall-clock ratios are reported alongside. On CUDA: CUDA events.
Reported per arm: the median step between log steps, the median log step, the cost per step over a log interval
(the median step plus the log step's extra cost spread over the interval) and its ratio to the no-callback arm,
with the min-max over the rounds of the ratio of chunk medians; the same ratio in wall time; the time spent
inside the arm's own per-step hooks (its callbacks' hooks, the module's ``on_before_optimizer_step`` for
``grad_norm``; thread CPU time, host time on CUDA), per step over a log interval and as a fraction of the
no-callback step: a direct measure of the monitor's own work, much less noisy than a difference of step times;
memory; the host reads in the arm's own hooks between log steps.

Arms (the Trainer logs every ``log_every_n_steps=50`` steps, its default, to a TensorBoard logger):

``none``
    no callback.
``shockmon``
    ``ShockMonitor()``: defaults (observes every optimizer step, reads back and logs every 50 steps).
``shockmon_all``
    ``ShockMonitor`` with everything on: per-unit histograms at every log step, angular steps of norm-scaled
    weights.
``shockmon_n16``
    ``ShockMonitor(every_n_steps=16)``: a stride of the size the monitor's overhead warning names for a model
    whose step is about as short as an observation (the tiny MLP); still reads back and logs every 50 steps. What
    it costs in detection is not measured here: replayed at this stride, the detection benchmark's runs raised
    no alert before any transition (``python -m benchmarks.detection --replay --every-n-steps 16``).
``grad_norm``
    Lightning's documented way to log gradient norms: ``self.log_dict(grad_norm(self, norm_type=2))`` in
    ``on_before_optimizer_step``, every step.
``spike``
    Lightning's ``SpikeDetection`` callback (defaults).

Memory. Peak: per arm, the peak growth of its process from just before ``fit`` to the end of the timed and
instrumented chunks: on CPU the resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after
``malloc_trim``; Linux only, else n/a), on CUDA ``max_memory_allocated`` over ``memory_allocated``. State: the
tensor storage an arm keeps across steps, reachable from its callbacks and Lightning's logged results (not the
model, its gradients, the optimizer state or the data). Host reads: during one more chunk after the timed
rounds, at steps that are not log steps, the arm's own per-step hooks run with ``Tensor.item``, ``tolist``,
``cpu``, ``numpy``, ``__bool__``, ``__float__``, ``__int__`` and ``__index__`` counted (on CPU; each would be a
sync on a GPU) or, on CUDA, under ``torch.cuda.set_sync_debug_mode("warn")`` with each warning counted.

Models: a tiny MLP (784-256-256-10, batch 64, MNIST-sized random data), a CNN with BatchNorm (3 conv blocks on
28x28 random images, batch 64), the GPT-like ``TinyGPT`` (6 layers, d=256, 8 heads, vocab 10k, batch 8x128)
and, with ``--device cuda``, a GPT-2-small-sized one (12 layers, d=768, 12 heads, vocab 50257, batch 8x1024,
bf16-mixed). AdamW, one CPU thread, ``torch.set_flush_denormal(True)``.

Run: ``python -m benchmarks.overhead`` (``--quick``: tiny models, a few steps, to check the pipeline; it
asserts nothing about speed; ``--models mlp,gpt``; ``--device cuda``). Writes
``benchmarks/results/overhead.json`` (``overhead_cuda.json`` on CUDA; nothing for ``--quick`` unless ``--out``
is given).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback, SpikeDetection  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

# the modules the monitor imports lazily, imported here: every arm's forked process runs the code of the commit
# recorded at the start, whatever happens to the working tree during a long run
import shockmon.observer  # noqa: E402, F401
import shockmon.tracker  # noqa: E402, F401
from benchmarks.models import TinyGPT, n_params  # noqa: E402
from shockmon import ShockMonitor  # noqa: E402

ARMS = ("none", "shockmon", "shockmon_all", "shockmon_n16", "grad_norm", "spike")
#: the observation stride of each arm (its steps are not alike: costs are averaged over the stride's residues)
STRIDE = {"shockmon_n16": 16}
LOG_EVERY = 50  # the Trainer's default log_every_n_steps (4 with --quick)
#: the per-step hooks whose host reads are counted (a callback's, or the module's for ``grad_norm``)
STEP_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
              "on_before_zero_grad", "on_train_batch_end")
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Case:
    """A model to benchmark: a network factory and a pool of batches it cycles through."""

    name: str
    describe: str
    net: Callable[[], nn.Module]
    batches: Callable[[torch.Generator], list[tuple[torch.Tensor, torch.Tensor]]]
    precision: str = "32-true"


def _mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def _cnn(c: int = 32) -> nn.Module:
    def block(i: int, o: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(1, c, 1), *block(c, 2 * c, 2), *block(2 * c, 2 * c, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10))


def _images(n: int, shape: tuple[int, ...], classes: int, batch: int) -> Callable[[torch.Generator], list]:
    def make(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
                for _ in range(n)]

    return make


def _tokens(n: int, vocab: int, batch: int, ctx: int) -> Callable[[torch.Generator], list]:
    def make(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _ in range(n):
            t = torch.randint(0, vocab, (batch, ctx + 1), generator=g)
            out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
        return out

    return make


def cases(quick: bool, device: str) -> dict[str, Case]:
    if quick:
        return {
            "mlp": Case("mlp", "MLP 784-32-32-10, batch 16", lambda: _mlp(32), _images(4, (784,), 10, 16)),
            "cnn": Case("cnn", "CNN 3x(conv+BN+ReLU) c=4, 12x12, batch 8", lambda: _cnn(4),
                        _images(4, (1, 12, 12), 10, 8)),
            "gpt": Case("gpt", "GPT 2 layers d=32 4 heads vocab 200, batch 2x16",
                        lambda: TinyGPT(vocab=200, d=32, heads=4, layers=2, ctx=16), _tokens(4, 200, 2, 16)),
        }
    out = {
        "mlp": Case("mlp", "MLP 784-256-256-10, batch 64", _mlp, _images(16, (784,), 10, 64)),
        "cnn": Case("cnn", "CNN 3x(conv+BN+ReLU) 32-64-64, 28x28, batch 64", _cnn,
                    _images(16, (1, 28, 28), 10, 64)),
        "gpt": Case("gpt", "TinyGPT 6 layers d=256 8 heads vocab 10k, batch 8x128", TinyGPT,
                    _tokens(16, 10_000, 8, 128)),
    }
    if device == "cuda":
        out["gpt2"] = Case("gpt2", "GPT-2-small size: 12 layers d=768 12 heads vocab 50k, batch 8x1024, bf16",
                           lambda: TinyGPT(vocab=50257, d=768, heads=12, layers=12, ctx=1024),
                           _tokens(8, 50257, 8, 1024), precision="bf16-mixed")
    return out


class _Cycle(IterableDataset):
    """An endless stream of ready-made batches (no sampling cost in the step)."""

    def __init__(self, pool: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pool = pool

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.pool


class BenchModule(pl.LightningModule):
    """Cross-entropy training of ``net`` with AdamW; ``log_grad_norm``: log Lightning's ``grad_norm`` every
    step."""

    def __init__(self, net: nn.Module, pool: list[tuple[torch.Tensor, torch.Tensor]],
                 log_grad_norm: bool = False) -> None:
        super().__init__()
        self.net = net
        self.pool = pool
        self.log_grad_norm = log_grad_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.log_grad_norm:  # as in Lightning's docs (lightning.pytorch.utilities.grad_norm)
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Cycle(self.pool), batch_size=None)


def arm_callbacks(arm: str, log_every: int) -> list[Callback]:
    if arm == "shockmon":
        return [ShockMonitor()]
    if arm == "shockmon_n16":
        return [ShockMonitor(every_n_steps=16)]
    if arm == "shockmon_all":
        return [ShockMonitor(histogram_every_n_steps=log_every, observer_kwargs={"angular_step": True})]
    if arm == "spike":
        return [SpikeDetection()]
    return []


def make_trainer(arm: str, case: Case, root: str, device: str, log_every: int, max_steps: int,
                 first: list[Callback] | None = None) -> pl.Trainer:
    """The same Trainer for every arm: only the arm's callbacks differ (``first`` comes before them)."""
    return pl.Trainer(
        callbacks=[*(first or []), *arm_callbacks(arm, log_every)],
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=case.precision,
        max_steps=max_steps,
        max_epochs=-1,
        log_every_n_steps=log_every,
        logger=TensorBoardLogger(root, name=f"{case.name}-{arm}"),
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _fit_quietly(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)


# ---------------------------------------------------------------------------------------------- measuring
class _Memory:
    """Peak memory growth over a span: CUDA allocator statistics, or the resident set on Linux."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self._libc: Any = None
        proc = sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)
        self.available = self.cuda or proc
        if self.available and not self.cuda:
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None
        self._base = 0

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"no {field} in /proc/self/status")

    def start(self) -> None:
        if not self.available:
            return
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self._base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed memory back, so what this span reuses counts again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        self._base = self._status_kb("VmRSS") * 1024

    def stop(self) -> float | None:
        """Peak growth since :meth:`start`, in MiB (None when not measurable here)."""
        if not self.available:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = self._status_kb("VmHWM") * 1024
        return max(peak - self._base, 0) / 2**20


class _HostReads:
    """Counts host reads inside wrapped hooks at non-log steps (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.count = 0
        self.steps: set[int] = set()

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self.cuda:
            return self._guard_cuda(fn)
        return self._guard_cpu(fn)

    def _guard_cpu(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(name: str) -> Callable[..., Any]:
            orig = getattr(torch.Tensor, name)

            def wrapper(t: torch.Tensor, *a: Any, **k: Any) -> Any:
                self.count += 1
                return orig(t, *a, **k)

            return wrapper

        def call(*a: Any, **k: Any) -> Any:
            saved = {n: getattr(torch.Tensor, n) for n in HOST_READS}
            try:
                for n in HOST_READS:
                    setattr(torch.Tensor, n, counted(n))
                return fn(*a, **k)
            finally:
                for n, f in saved.items():
                    setattr(torch.Tensor, n, f)

        return call

    def _guard_cuda(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return fn(*a, **k)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                    self.count += sum("synchroniz" in str(w.message).lower() for w in caught)

        return call


def _own_hooks(arm: str, trainer: pl.Trainer, module: pl.LightningModule) -> list[tuple[Any, str]]:
    """``(object, hook name)``: the per-step hooks an arm adds (its callbacks' overrides, or the module's)."""
    if arm == "grad_norm":
        return [(module, "on_before_optimizer_step")]
    out = []
    for cb in arm_callbacks_of(trainer):
        for name in STEP_HOOKS:
            if getattr(type(cb), name) is not getattr(Callback, name):
                out.append((cb, name))
    return out


def arm_callbacks_of(trainer: pl.Trainer) -> list[Callback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, (ShockMonitor, SpikeDetection))]


class _Run(Callback):
    """The arm's side, in its own process: the timing callback (first in the callback list) that stops at each
    chunk boundary and waits for its turn, the instrumented chunk, memory and state."""

    def __init__(self, conn: Any, arm: str, device: str, log_every: int, bounds: list[int]) -> None:
        super().__init__()
        self.conn, self.arm, self.device, self.log_every = conn, arm, device, log_every
        self.bounds = bounds  # steps at which chunks start; the last chunk is instrumented, the last bound closes it
        self.trainer: pl.Trainer | None = None
        self.module: BenchModule | None = None
        #: per timed chunk: (step completed, wall seconds, thread CPU seconds or None on CUDA, seconds in the arm's
        #: own per-step hooks: thread CPU time, host time on CUDA)
        self.chunk_times: list[list[tuple[int, float, float | None, float]]] = []
        self.hook_seconds = 0.0
        self.memory = _Memory(device)
        self.mem_mib: float | None = None
        self.state_kib = math.nan
        self.reads = _HostReads(device)
        self._index = -1  # the chunk running (-1: none)
        self._marks: list[tuple[int, Any, float | None, float]] = []
        self._instrumented = False
        self._saved_hooks: list[tuple[Any, str, Any]] = []

    def wait_turn(self, where: int) -> None:
        self.conn.send(("at", where))
        if self.conn.recv() != "go":
            raise RuntimeError("benchmark aborted")

    # -- timing
    def _mark(self, step: int) -> tuple[int, Any, float | None, float]:
        if self.device == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return step, ev, None, self.hook_seconds
        return step, time.perf_counter(), time.thread_time(), self.hook_seconds

    def _close_chunk(self) -> None:
        marks = self._marks
        if self.device == "cuda":
            torch.cuda.synchronize()
            secs = [(s + 1, a.elapsed_time(b) / 1e3, None, hb - ha)
                    for (s, a, _, ha), (_, b, _, hb) in zip(marks, marks[1:])]
        else:
            secs = [(s + 1, b - a, cb - ca, hb - ha)  # type: ignore[operator]
                    for (s, a, ca, ha), (_, b, cb, hb) in zip(marks, marks[1:])]
        if self._instrumented:
            self._uninstrument()
        else:
            self.chunk_times.append(secs)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps done so far
        if self._index >= 0:
            self._marks.append(self._mark(step))
        if step not in self.bounds:
            return
        if self._index >= 0:
            self._close_chunk()
        index = self.bounds.index(step)
        if index == len(self.bounds) - 1:  # measured: the peak so far and what the arm keeps
            self.mem_mib = self.memory.stop()
            self.state_kib = self._retained_kib()
        self.wait_turn(index)  # the next chunk, or the closing step and the end of fit
        self._index = index if index < len(self.bounds) - 1 else -1
        if self._index < 0:
            return
        if self._index == 0:
            self._time_hooks(trainer)
        self._instrumented = self._index == len(self.bounds) - 2
        if self._instrumented:
            self._instrument(trainer)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self._marks = [self._mark(step)]

    # -- the arm's own hooks, timed from the first timed chunk on
    def _time_hooks(self, trainer: pl.Trainer) -> None:
        assert self.module is not None
        clock = time.perf_counter if self.device == "cuda" else time.thread_time  # CUDA: host time

        for obj, name in _own_hooks(self.arm, trainer, self.module):
            original = getattr(obj, name)

            def timed(*a: Any, _orig: Any = original, **k: Any) -> Any:
                t0 = clock()
                try:
                    return _orig(*a, **k)
                finally:
                    self.hook_seconds += clock() - t0

            setattr(obj, name, timed)  # stays for the rest of the fit

    # -- host reads, on the instrumented chunk
    def _instrument(self, trainer: pl.Trainer) -> None:
        assert self.module is not None
        for obj, name in _own_hooks(self.arm, trainer, self.module):
            original = getattr(obj, name)
            guarded = self.reads.guard(original)
            after = name == "on_train_batch_end"  # global_step already counts the step

            def hook(*a: Any, _orig: Any = original, _guarded: Any = guarded, _after: bool = after,
                     **k: Any) -> Any:
                done = trainer.global_step + (0 if _after else 1)
                if done % self.log_every == 0:
                    return _orig(*a, **k)
                self.reads.steps.add(done)
                return _guarded(*a, **k)

            self._saved_hooks.append((obj, name, obj.__dict__.get(name)))
            setattr(obj, name, hook)  # Lightning calls the instance's attribute

    def _uninstrument(self) -> None:
        for obj, name, before in self._saved_hooks:
            if before is None:
                delattr(obj, name)
            else:
                setattr(obj, name, before)
        self._saved_hooks = []

    def _retained_kib(self) -> float:
        assert self.trainer is not None and self.module is not None
        roots: list[Any] = list(arm_callbacks_of(self.trainer))
        roots.append(self.trainer.fit_loop.epoch_loop._results)  # what self.log/log_dict keep
        return _retained_kib(roots, self.module, self.module.pool)

    def results(self) -> dict[str, Any]:
        return {"chunk_times": self.chunk_times, "mem_mib": self.mem_mib, "state_kib": self.state_kib,
                "reads": self.reads.count, "read_steps": len(self.reads.steps)}


def _child(conn: Any, spec: dict[str, Any]) -> None:
    """One arm, in a process of its own (no GIL, allocator or peak memory shared with the other arms)."""
    try:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
        arm, device = spec["arm"], spec["device"]
        case = cases(spec["quick"], device)[spec["model"]]
        torch.manual_seed(spec["seed"])
        net = case.net()  # the same initial weights in every arm
        pool = case.batches(torch.Generator().manual_seed(spec["seed"]))
        if device == "cuda":
            pool = [(x.cuda(), y.cuda()) for x, y in pool]
        run = _Run(conn, arm, device, spec["log_every"], spec["bounds"])
        run.module = BenchModule(net, pool, log_grad_norm=arm == "grad_norm")
        run.trainer = make_trainer(arm, case, spec["root"], device, spec["log_every"], spec["bounds"][-1] + 1,
                                   first=[run])
        conn.send(("ready", -1))
        if conn.recv() != "go":
            return
        run.memory.start()
        _fit_quietly(run.trainer, run.module)
        conn.send(("done", run.results()))
    except BaseException:  # noqa: BLE001 - reported by the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run_case(name: str, quick: bool, device: str, log_every: int, warmup: int, chunk: int, rounds: int,
              seed: int) -> dict[str, Any]:
    """One process per arm; turns handed out so that exactly one runs at a time: a warm-up each, ``rounds``
    timed chunks of ``chunk`` steps (the order rotating), one instrumented chunk holding a log step, the end."""
    import multiprocessing as mp

    bounds = [warmup + i * chunk for i in range(rounds + 1)]
    next_log = (bounds[-1] // log_every + 1) * log_every
    bounds.append(bounds[-1] + max(chunk, next_log - bounds[-1] + 1))  # the instrumented chunk holds a log step
    ctx = mp.get_context("fork" if device == "cpu" and hasattr(os, "fork") else "spawn")
    if ctx.get_start_method() == "fork":  # what every arm imports at some point, imported once and shared
        import torchmetrics.wrappers  # noqa: F401

        import shockmon.tracker  # noqa: F401
    procs: dict[str, Any] = {}
    conns: dict[str, Any] = {}

    def turn(arm: str, expect: str) -> Any:
        conns[arm].send("go")
        return receive(arm, expect)

    def receive(arm: str, expect: str) -> Any:
        kind, payload = conns[arm].recv()
        if kind == "error":
            raise RuntimeError(f"arm {arm!r} failed:\n{payload}")
        if kind != expect:
            raise RuntimeError(f"arm {arm!r}: expected {expect!r}, got {kind!r}")
        return payload

    with tempfile.TemporaryDirectory() as root:
        try:
            for arm in ARMS:
                parent, child = ctx.Pipe()
                spec = {"arm": arm, "model": name, "quick": quick, "device": device, "seed": seed,
                        "log_every": log_every, "bounds": bounds, "root": root}
                procs[arm] = ctx.Process(target=_child, args=(child, spec), name=f"arm-{arm}", daemon=True)
                procs[arm].start()
                child.close()
                conns[arm] = parent
                receive(arm, "ready")  # built one after the other, before any timing
            for arm in ARMS:  # warm-up, one arm after the other
                turn(arm, "at")
            order = list(ARMS)
            for r in range(len(bounds) - 1):
                for arm in order[r % len(order):] + order[: r % len(order)]:
                    turn(arm, "at")
            results = {arm: turn(arm, "done") for arm in ARMS}  # the closing step and the end of fit
        finally:
            for arm, proc in procs.items():
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.terminate()
                conns[arm].close() if arm in conns else None
    case = cases(quick, device)[name]
    return _summarise(case, results, log_every)


def _retained_kib(roots: list[Any], module: pl.LightningModule, pool: list) -> float:
    """KiB of tensor storage reachable from ``roots`` (an arm's callbacks, Lightning's logged results): what the
    arm keeps across steps. The model's parameters, gradients, buffers and optimizer state and the data do not
    count (an observer holds the model: it is not walked)."""
    own = [*module.parameters(), *module.buffers(), *(p.grad for p in module.parameters() if p.grad is not None)]
    for opt in module.trainer.optimizers:
        own += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    own += [t for batch in pool for t in batch]
    seen_storage = {t.untyped_storage().data_ptr() for t in own}
    total = 0
    for t in _tensors_in(roots, {id(m) for m in module.modules()}):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen_storage:
            seen_storage.add(ptr)
            total += t.untyped_storage().nbytes()
    return total / 1024


def _tensors_in(roots: list[Any], skip_ids: set[int]) -> Iterator[torch.Tensor]:
    stack, seen = list(roots), set(skip_ids)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (pl.Trainer, torch.optim.Optimizer, threading.Thread)) or callable(obj) and \
                not hasattr(obj, "__dict__"):
            continue
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())


def _per_step(steps: list[tuple[int, float]], log_every: int, stride: int = 1) -> tuple[float, float, float]:
    """``(median step, median log step, cost per step over a log interval)``, in seconds: medians, so that a load
    spike does not count, with the log step's extra cost spread over its interval. With an observation
    ``stride``, the median step is the mean over the stride's residues of each one's median (one step in
    ``stride`` observes: a plain median would miss it)."""
    other = [(s, t) for s, t in steps if s % log_every]
    logs = [t for s, t in steps if s % log_every == 0]
    by_residue: dict[int, list[float]] = {}
    for s, t in other:
        by_residue.setdefault(s % stride, []).append(t)
    med = statistics.fmean(statistics.median(ts) for ts in by_residue.values())
    log = statistics.median(logs) if logs else med
    return med, log, med + (log - med) / log_every


def _summarise(case: Case, arms: dict[str, dict[str, Any]], log_every: int) -> dict[str, Any]:
    """Ratios to the no-callback arm. On CPU the headline is thread CPU time (what a step costs, not counting
    time its process waited for a core on a shared machine); wall-clock figures come alongside. On CUDA, CUDA
    event time."""

    def steps(a: dict[str, Any]) -> list[tuple[int, float, float | None, float]]:
        return [tuple(s) for c in a["chunk_times"] for s in c]  # type: ignore[misc]

    cpu = steps(arms["none"])[0][2] is not None
    clock = 2 if cpu else 1

    def series(a: dict[str, Any], k: int) -> list[tuple[int, float]]:
        return [(s[0], s[k]) for s in steps(a)]  # type: ignore[misc]

    def chunk_medians(a: dict[str, Any]) -> list[float]:
        return [statistics.median(s[clock] for s in c) for c in a["chunk_times"]]

    base = arms["none"]
    _, _, base_cost = _per_step(series(base, clock), log_every)
    _, _, base_wall = _per_step(series(base, 1), log_every)
    base_chunks = chunk_medians(base)
    base_mem = math.nan if base["mem_mib"] is None else base["mem_mib"]
    out: dict[str, Any] = {"model": case.name, "describe": case.describe, "params": n_params(case.net()),
                           "clock": "thread CPU time" if cpu else "CUDA events", "arms": {}}
    for name, a in arms.items():
        k = STRIDE.get(name, 1)
        med, log, cost = _per_step(series(a, clock), log_every, k)
        wall_med, _, wall = _per_step(series(a, 1), log_every, k)
        _, _, hooks = _per_step(series(a, 3), log_every, k)
        pair = [m / b for m, b in zip(chunk_medians(a), base_chunks)]
        mem = math.nan if a["mem_mib"] is None else a["mem_mib"]
        out["arms"][name] = {
            "step_ms_median": 1e3 * med,
            "log_step_ms_median": 1e3 * log,
            "step_ms_per_step": 1e3 * cost,
            "ratio": cost / base_cost,
            "ratio_chunk_min": min(pair),
            "ratio_chunk_max": max(pair),
            "wall_step_ms_median": 1e3 * wall_med,
            "wall_ratio": wall / base_wall,
            "hooks_ms_per_step": 1e3 * hooks,
            "hooks_fraction": hooks / base_cost,
            "peak_mib": mem,
            "peak_mib_over_none": mem - base_mem,
            "state_kib": a["state_kib"],
            "host_reads_per_step": a["reads"] / a["read_steps"] if a["read_steps"] else 0.0,
            "steps_timed": len(steps(a)),
        }
    return out


# ---------------------------------------------------------------------------------------------- output
def table(results: list[dict[str, Any]]) -> str:
    cols = [("model", 5, "<"), ("arm", 12, "<"), ("median ms", 9, ">"), ("log step ms", 11, ">"),
            ("per step ms", 11, ">"), ("x none", 6, ">"), ("chunks min-max", 14, ">"), ("x none wall", 11, ">"),
            ("hooks ms", 8, ">"), ("hooks %", 7, ">"), ("+MiB", 6, ">"), ("state KiB", 9, ">"),
            ("reads/step", 10, ">")]
    head = " ".join(f"{c:{a}{w}}" for c, w, a in cols)
    lines = [head, "-" * len(head)]
    for res in results:
        for name, r in res["arms"].items():
            cells = [res["model"], name, f"{r['step_ms_median']:.2f}", f"{r['log_step_ms_median']:.2f}",
                     f"{r['step_ms_per_step']:.2f}", f"{r['ratio']:.3f}",
                     f"{r['ratio_chunk_min']:.2f}-{r['ratio_chunk_max']:.2f}", f"{r['wall_ratio']:.3f}",
                     f"{r['hooks_ms_per_step']:.2f}", f"{100 * r['hooks_fraction']:.1f}",
                     f"{r['peak_mib_over_none']:+.1f}", f"{r['state_kib']:.1f}",
                     f"{r['host_reads_per_step']:.1f}"]
            lines.append(" ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, cols)))
    return "\n".join(lines)


def _commit() -> str | None:
    """The commit the measured code comes from, ``+dirty`` when ``shockmon/`` or ``benchmarks/`` differ from it."""
    import shockmon

    here = Path(shockmon.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "shockmon", "benchmarks/overhead.py",
                                "benchmarks/models.py"], cwd=here, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps: checks the pipeline only")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", default=None, help="comma-separated subset of mlp,cnn,gpt(,gpt2 on cuda)")
    ap.add_argument("--rounds", type=int, default=None, help="timed chunks per arm (default: by model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file (default: see above)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit(f"--rounds must be a positive integer, got {args.rounds}")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    all_cases = cases(args.quick, args.device)
    names = list(all_cases) if args.models is None else [m.strip() for m in args.models.split(",")]
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(all_cases)}")
    log_every = 4 if args.quick else LOG_EVERY
    # (warm-up steps, chunk, rounds) per model: chunks short enough that load changes on this shared machine hit
    # the arms alike; warm-ups past the tracker's windows (16 and 64 observations)
    plan = {"mlp": (100, 10, 100), "cnn": (70, 5, 60), "gpt": (70, 5, 25), "gpt2": (70, 5, 40)}
    results = []
    t0 = time.perf_counter()
    commit = _commit()  # the code measured is the code imported now, not what the tree holds at the end
    for n in names:
        warmup, chunk, rounds = (4, 2, 4) if args.quick else plan[n]
        rounds = args.rounds or rounds
        res = _run_case(n, args.quick, args.device, log_every, warmup=warmup, chunk=chunk, rounds=rounds,
                        seed=args.seed)
        res.update(warmup=warmup, rounds=rounds, chunk=chunk)
        results.append(res)
        print(f"# {n}: {res['describe']}, {res['params'] / 1e6:.2f}M parameters, {rounds} x {chunk} steps per"
              f" arm, {time.perf_counter() - t0:.0f} s", flush=True)
    doc = {
        "commit": commit,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "log_every_n_steps": log_every,
        "quick": args.quick,
        "results": results,
    }
    print(table(results))
    out = args.out or (None if args.quick else
                       f"benchmarks/results/overhead{'_cuda' if args.device == 'cuda' else ''}.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
