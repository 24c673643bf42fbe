"""The benchmarks run (``--quick`` checks the pipeline and asserts nothing about speed), and the per-step
work the monitor skips for speed is skipped only where nothing reads it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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
ARMS = ("none", "shockmon", "shockmon_all", "grad_norm", "spike")


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
            assert r["step_ms_median"] > 0 and math.isfinite(r["ratio"]) and math.isfinite(r["ratio_mean"])
            assert r["ratio_chunk_min"] <= r["ratio_chunk_max"]
        assert res["arms"]["none"]["ratio"] == res["arms"]["none"]["ratio_mean"] == 1.0
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


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning",
                            "ignore:.*smaller than the logging interval:UserWarning", "ignore:.*LeafSpec.*")
def test_shock_monitor_computes_attention_spectra_only_for_reads(tmp_path):
    monitor = ShockMonitor(log_every_n_steps=5, print_summary=False)
    calls: list[tuple[int, bool]] = []
    make = monitor._make_observer

    def spied_observer(pl_module):  # type: ignore[no-untyped-def]
        obs = make(pl_module)
        compute = obs.compute

        def spied(*a, spectra=True, **k):  # type: ignore[no-untyped-def]
            calls.append((pl_module.trainer.global_step, spectra))
            return compute(*a, spectra=spectra, **k)

        obs.compute = spied
        return obs

    monitor._make_observer = spied_observer  # type: ignore[method-assign]
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [monitor], max_steps=12, logger=logger, log_every_n_steps=5).fit(_Attention())
    # every step observed, spectra at the log steps 5 and 10, and once more for the end-of-fit read at 12
    assert calls == [(s, s % 5 == 0) for s in range(1, 13)] + [(12, True)]
    rows = list((Path(logger.log_dir) / "metrics.csv").read_text().splitlines())
    header = rows[0].split(",")
    top = header.index("shockmon/quotient/attention_qk/block.self_attn/top_singular")
    step = header.index("step")
    logged = {int(r.split(",")[step]): r.split(",")[top] for r in rows[1:]}
    assert sorted(logged) == [5, 10, 12]
    assert all(float(v) > 0 for v in logged.values())



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


def test_observer_grads_finite_is_none_without_gradients():
    assert Observer(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))).grads_finite() is None
