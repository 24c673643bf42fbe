"""The benchmarks run (``--quick`` checks the pipeline and asserts nothing about speed), and the per-step
work the monitor skips for speed is skipped only where nothing reads it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from callback_models import trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shockmon import Observer, ShockMonitor

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("none", "shockmon", "shockmon_all", "shockmon_n16", "grad_norm", "spike")


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_overhead_benchmark_quick_prints_its_table_and_writes_json(tmp_path):
    out = tmp_path / "overhead.json"
    proc = _run("benchmarks.overhead", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert any(r[:3] == ["model", "arm", "median"] for r in rows), proc.stdout
    table = {(r[0], r[1]) for r in rows if len(r) >= 10}
    doc = json.loads(out.read_text())
    assert [r["model"] for r in doc["results"]] == ["mlp", "cnn", "gpt"]
    for res in doc["results"]:
        assert list(res["arms"]) == list(ARMS)
        for arm, r in res["arms"].items():
            assert (res["model"], arm) in table
            assert r["steps_timed"] == res["rounds"] * res["chunk"]
            assert r["step_ms_median"] > 0 and math.isfinite(r["ratio"]) and math.isfinite(r["wall_ratio"])
            assert r["ratio_chunk_min"] <= r["ratio_chunk_max"]
            assert r["state_kib"] >= 0 and (r["peak_mib"] > 0 or math.isnan(r["peak_mib"]))
        assert res["arms"]["none"]["ratio"] == res["arms"]["none"]["wall_ratio"] == 1.0
        hooks = {arm: r["hooks_ms_per_step"] for arm, r in res["arms"].items()}
        assert hooks["none"] == 0 and hooks["shockmon"] > 0 and hooks["grad_norm"] > 0 and hooks["spike"] > 0, hooks
        # what each arm keeps across steps: the monitor's observer and tracker state, next to nothing for the others
        state = {arm: r["state_kib"] for arm, r in res["arms"].items()}
        assert state["none"] < 1 and state["shockmon"] > 10 * max(state["grad_norm"], state["spike"], 1), state
        reads = {arm: r["host_reads_per_step"] for arm, r in res["arms"].items()}
        # the counter sees the peers' per-step host reads, and none from shockmon between log steps
        assert reads["shockmon"] == reads["shockmon_all"] == reads["none"] == 0, reads
        assert reads["grad_norm"] > 0 and reads["spike"] > 0, reads


def test_observer_cost_benchmark_quick_prints_its_table():
    proc = _run("benchmarks.observer_cost", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train step" in proc.stdout
    assert "per step: compute(spectra=False)" in proc.stdout
    assert "log step: compute(spectra=True)" in proc.stdout


def test_overhead_benchmark_rejects_unknown_models():
    proc = _run("benchmarks.overhead", "--quick", "--models", "mlp,resnet")
    assert proc.returncode != 0
    assert "unknown ['resnet']" in proc.stderr


# ------------------------------------------------------------------ work skipped between log steps
class _Attention(pl.LightningModule):
    """One pre-norm Transformer block on random vectors: attention, a ReLU MLP and LayerNorms."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.out = nn.Linear(8, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.out(self.block(x)).squeeze(-1), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(8, 4, 8, generator=g), torch.randn(8, 4, generator=g)),
                          batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _StopAt(pl.Callback):
    """Stops the fit after optimizer step ``at``, as early stopping would (the Trainer cannot know in advance)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, *args) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step >= self.at:
            trainer.should_stop = True


def _spied_fit(tmp_path: Path, max_steps: int, callbacks: list[pl.Callback]) -> tuple[list, list, dict]:
    """Fit ``_Attention`` with a spied monitor (log every 5 steps): (step, spectra, raw) of every compute(),
    the steps of every grad_observables(), and the CSV rows by step."""
    monitor = ShockMonitor(log_every_n_steps=5, print_summary=False)
    computes: list[tuple[int, bool, bool]] = []
    grads: list[int] = []
    make = monitor._make_observer

    def spied_observer(pl_module):  # type: ignore[no-untyped-def]
        obs = make(pl_module)
        compute, grad_observables = obs.compute, obs.grad_observables

        def spied_compute(*a, spectra=True, raw=True, **k):  # type: ignore[no-untyped-def]
            computes.append((pl_module.trainer.global_step, spectra, raw))
            return compute(*a, spectra=spectra, raw=raw, **k)

        def spied_grads(**k):  # type: ignore[no-untyped-def]
            grads.append(pl_module.trainer.global_step + 1)
            return grad_observables(**k)

        obs.compute, obs.grad_observables = spied_compute, spied_grads
        return obs

    monitor._make_observer = spied_observer  # type: ignore[method-assign]
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [monitor, *callbacks], max_steps=max_steps, logger=logger, log_every_n_steps=5).fit(
        _Attention()
    )
    lines = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        rows[int(row["step"])] = {k: float(v) for k, v in row.items() if v != "" and k != "step"}
    return computes, grads, rows


TOP = "shockmon/quotient/attention_qk/block.self_attn/top_singular"
GRAD = "shockmon/quotient/attention_qk/block.self_attn/grad_norm"
RAW = "shockmon/raw/block.self_attn.in_proj_weight"


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*LeafSpec.*",
)
def test_shock_monitor_computes_read_only_observables_only_for_reads(tmp_path):
    computes, grads, rows = _spied_fit(tmp_path, max_steps=12, callbacks=[])
    # every step observed; spectra, raw norms and gradient observables at the log steps 5 and 10 and at the last
    # step, known in advance (max_steps)
    assert computes == [(s, s in (5, 10, 12), s in (5, 10, 12)) for s in range(1, 13)]
    assert grads == [5, 10, 12]
    assert sorted(rows) == [5, 10, 12]
    for step in (5, 10, 12):
        assert rows[step][TOP] > 0 and rows[step][GRAD] > 0 and rows[step][RAW] > 0


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*LeafSpec.*",
)
def test_shock_monitor_end_read_after_an_unforeseen_stop_recomputes_what_it_can(tmp_path):
    computes, grads, rows = _spied_fit(tmp_path, max_steps=100, callbacks=[_StopAt(12)])
    assert computes[-2:] == [(12, False, False), (12, True, True)]  # the end read fills spectra and raw norms
    assert grads == [5, 10]
    assert sorted(rows) == [5, 10, 12]
    assert rows[12][TOP] > 0 and rows[12][RAW] > 0
    assert GRAD not in rows[12]  # the gradients before step 12 are gone: that read goes without them


def _mlp_with_grads() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    net(torch.randn(3, 4, dtype=torch.float64)).square().sum().backward()
    return net


def test_observer_compute_without_raw_norms_keeps_every_other_key():
    net = _mlp_with_grads()
    full, lean = Observer(net).compute(), Observer(net).compute(raw=False)
    skipped = {f"raw/{n}" for n, _ in net.named_parameters()}
    assert set(full) - set(lean) == skipped
    for k, v in lean.items():
        if not k.startswith("dynamics/"):
            torch.testing.assert_close(v, full[k])


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_observer_grads_finite_flags_any_nonfinite_gradient(value):
    net = _mlp_with_grads()
    obs = Observer(net)
    assert obs.grads_finite().dtype == torch.bool and bool(obs.grads_finite())
    with torch.no_grad():
        net[2].bias.grad[1] = value  # the output bias: in no rescaling group's grad_norm
    assert not bool(obs.grads_finite())


def test_observer_grad_observables_check_finite_gives_the_same_flag():
    net = _mlp_with_grads()
    obs = Observer(net)
    assert bool(obs.grad_observables(check_finite=True)["grads:finite"])
    assert "grads:finite" not in obs.grad_observables()
    with torch.no_grad():
        net[2].bias.grad[0] = math.nan
    got = obs.grad_observables(check_finite=True)
    assert not bool(got.pop("grads:finite")) and not bool(obs.grads_finite())
    assert all(k.endswith("/grad_norm") for k in got)


def test_observer_grads_finite_is_none_without_gradients():
    assert Observer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))).grads_finite() is None


# ------------------------------------------------------------------ the CUDA path's bookkeeping, on CPU
def _overhead_module(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import overhead

    return overhead


def test_overhead_cuda_host_reads_count_sync_warnings_between_log_steps(monkeypatch):
    overhead = _overhead_module(monkeypatch)
    modes: list = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    reads = overhead._HostReads("cuda")

    def hook(x):  # type: ignore[no-untyped-def]
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)  # torch's words
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
        return x + 1

    assert reads.guard(hook)(1) == 2
    assert reads.count == 1 and modes == ["warn", 0]


def test_overhead_cuda_memory_is_the_allocator_peak_over_the_start(monkeypatch):
    overhead = _overhead_module(monkeypatch)
    allocated = iter([100 * 2**20])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: next(allocated))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 164 * 2**20)
    mem = overhead._Memory("cuda")
    mem.start()
    assert mem.stop() == 64.0


def test_overhead_cuda_adds_the_gpt2_sized_model_and_refuses_without_cuda(monkeypatch):
    overhead = _overhead_module(monkeypatch)
    assert "gpt2" in overhead.cases(quick=False, device="cuda")
    assert "gpt2" not in overhead.cases(quick=False, device="cpu")
    if not torch.cuda.is_available():
        proc = _run("benchmarks.overhead", "--quick", "--device", "cuda")
        assert proc.returncode != 0 and "CUDA is not available" in proc.stderr


def test_kernels_benchmark_quick_counts_the_per_step_work(tmp_path):
    out = tmp_path / "kernels.json"
    proc = _run("benchmarks.kernels", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["model"]: r for r in doc["results"]}
    assert list(rows) == ["mlp", "gpt"]
    for r in rows.values():
        assert 0 < r["kernels_per_step"] < r["dispatches_per_step"] and r["log_step_extra_kernels"] > 0
        assert f"{r['model']:6s}" in proc.stdout
    # the GPT-like model's 6 blocks are finished together: far fewer kernels than 6 times a block's finishing
    assert rows["gpt"]["kernels_per_step"] < 2 * rows["mlp"]["kernels_per_step"]
