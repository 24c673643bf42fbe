"""Beyond one process: DDP and FSDP2 (``ModelParallelStrategy``) give single-process numbers and decisions.

The distributed runs are scripts under ``tests/distributed_scripts`` started with ``python script.py`` in a
subprocess (Lightning launches rank 1 itself, as it does for a user's script), on CPU with gloo; each rank
writes what it saw to JSON (``dist_common.Recorder``) and counts the collectives shockmon calls
(``dist_common.CollectiveLog``). The single-process references run in this process, from the same script
functions.

The models are float64: a data-parallel step averages per-rank mean gradients, a sum in another order than the
single process's mean. In float32 that rounding (1e-7) is amplified past 1e-6 by cancellation-prone
observables (the balancedness drift is a difference of nearly equal vectors); in float64 the training itself
agrees far below the tolerance, so the comparison tests shockmon, not float32 summation order.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import ddp_run  # noqa: E402
import dist_common  # noqa: E402
import sharded_run  # noqa: E402

from shockmon import ShockMonitor  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(does not have many workers|smaller than the logging interval|LeafSpec).*"
)
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _launch(script: str, out: Path) -> None:
    """Run ``python script out --devices 2`` in its own process group (rank 1 is Lightning's child there);
    wait for every rank to exit; kill the group on timeout."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / script), str(out), "--devices", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
        while _group_alive(proc.pid) and time.monotonic() < deadline:  # rank 1 may outlive rank 0 briefly
            time.sleep(0.1)
    except subprocess.TimeoutExpired:
        output = ""
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
    assert proc.returncode == 0, f"{script} failed or timed out ({TIMEOUT_S} s):\n{output[-6000:]}"


def _same(a: Any, b: Any, rel: float = 0.0) -> bool:
    """Structural equality of JSON-like values; floats equal within ``rel`` (NaN equals NaN, inf inf)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or math.isclose(a, b, rel_tol=rel, abs_tol=0.0)
    return a == b


def _mismatch(a: dict[str, float], b: dict[str, float], rel: float) -> list[str]:
    return [
        f"{k}: {a.get(k)} != {b.get(k)}"
        for k in sorted(a.keys() | b.keys())
        if not _same(a.get(k), b.get(k), rel)
    ]


def _tensorboard(
    run_dir: Path,
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, str]]]]:
    """Scalars and texts under ``shockmon/`` of one TensorBoard run, as ``tag -> [(step, value)]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {
        t: [(e.step, e.value) for e in acc.Scalars(t)]
        for t in acc.Tags()["scalars"]
        if t.startswith("shockmon/")
    }
    texts = {
        t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)]
        for t in acc.Tags()["tensors"]
        if t.startswith("shockmon/") and t.endswith("/text_summary")
    }
    return scalars, texts


def _visible(texts: dict[str, list[tuple[int, str]]]) -> dict[str, list[tuple[int, str]]]:
    """The texts as TensorBoard shows them: without HTML comments (the alert tables' exact JSON)."""
    return {
        t: [(s, "\n".join(line for line in v.splitlines() if not line.startswith("<!--"))) for s, v in rows]
        for t, rows in texts.items()
    }


def _exact_events(texts: dict[str, list[tuple[int, str]]]) -> list[Any]:
    from shockmon.report.read import parse_alerts

    return [e for _, v in texts.get("shockmon/alert_text/text_summary", []) for e in parse_alerts(v)]


# ------------------------------------------------------------------------------------------------------ DDP
@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of ``ddp_run.py`` on 2 processes: the runs full, first + resumed, diverge."""
    out = tmp_path_factory.mktemp("ddp")
    _launch("ddp_run.py", out)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process reference of the full run: one process sees the 16 samples the 2 ranks split."""
    out = tmp_path_factory.mktemp("single")
    ddp_run.main(out, devices=1, runs=("full",))
    return out


@pytest.mark.slow
def test_ddp_rank_zero_event_file_equals_single_process(ddp: Path, single: Path) -> None:
    ddp_scalars, ddp_texts = _tensorboard(ddp / "tb_rank0" / "full" / "version_0")
    ref_scalars, ref_texts = _tensorboard(single / "tb_rank0" / "full" / "version_0")
    assert len(ref_scalars) >= 20 and set(ddp_scalars) == set(ref_scalars)
    steps = list(range(ddp_run.LOG_EVERY, ddp_run.STEPS + 1, ddp_run.LOG_EVERY))
    for tag, ref in ref_scalars.items():
        got = ddp_scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in ref] == steps, tag
        bad = [(s, a, b) for (s, a), (_, b) in zip(got, ref) if not _same(a, b, rel=1e-6)]
        assert not bad, f"{tag}: (step, ddp, single) {bad[:3]}"
    # the decisions too: the same alerts, in the same words, at the same steps
    # (the visible tables exactly; the exact events in their hidden JSON comment within 1e-6, as the scalars)
    assert _visible(ddp_texts) == _visible(ref_texts) and ref_texts["shockmon/alert_text/text_summary"]
    got, want = _exact_events(ddp_texts), _exact_events(ref_texts)
    assert [(e.kind, e.group, e.step, e.units) for e in got] == [(e.kind, e.group, e.step, e.units) for e in want]
    for a, b in zip(got, want):
        assert _same(a.predicted_step, b.predicted_step, rel=1e-6) and _same(a.strength, b.strength, rel=1e-6)
    assert ref_scalars["shockmon/alerts"][-1][1] >= 2  # the scripted crossing: a forecast, then a shock


@pytest.mark.slow
def test_ddp_only_rank_zero_writes_to_loggers(ddp: Path) -> None:
    ranks = dist_common.load(ddp, "full", 2)
    reads = len(ranks[0]["reads"])
    assert reads == ddp_run.STEPS // ddp_run.LOG_EVERY
    # a logger without rank_zero_only is given shockmon's scalars on rank zero only
    assert [r["keylogger_shockmon_calls"] for r in ranks] == [reads, 0]
    assert list((ddp / "tb_rank0").rglob("events.out.tfevents*"))
    assert not (ddp / "tb_rank1").exists() or not any(p.is_file() for p in (ddp / "tb_rank1").rglob("*"))


@pytest.mark.slow
def test_ddp_observables_and_events_equal_on_every_rank(ddp: Path, single: Path) -> None:
    r0, r1 = dist_common.load(ddp, "full", 2)
    (ref,) = dist_common.load(single, "full", 1)
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["observations"] == r1["observations"] == ddp_run.STEPS
    # every read: the same logged scalars (bitwise) and the same new events on both ranks
    assert _same(r0["reads"], r1["reads"]), "ranks disagree"
    assert r0["events"] == r1["events"] and r0["latest"] == r1["latest"]
    kinds = [e["kind"] for e in r0["events"]]
    assert "forecast" in kinds and "shock" in kinds
    # ... and those of the single process
    assert _same(r0["events"], ref["events"], rel=1e-6)
    for got, want in zip(r0["reads"], ref["reads"], strict=True):
        assert got["step"] == want["step"]
        bad = _mismatch(got["metrics"], want["metrics"], rel=1e-6)
        assert not bad, f"step {got['step']}: {bad[:3]}"
    # among them the gradient observables: those of the all-reduced gradient, not of a rank's half batch
    assert any(k.endswith("/grad_norm") for k in ref["reads"][0]["metrics"])


@pytest.mark.slow
def test_ddp_divergence_on_one_rank_stops_all_ranks(ddp: Path) -> None:
    r0, r1 = dist_common.load(ddp, "diverge", 2)
    # rank 1 alone saw the NaN after step 7; the agreed decision stopped rank 0 at the same step
    assert [r["global_step"] for r in (r0, r1)] == [7, 7]
    assert [r["stopping_reason"] for r in (r0, r1)] == ["divergence", "divergence"]
    assert (r0["stopping_event"], r1["stopping_event"]) == (False, True)
    assert not r0["events"] and {e["kind"] for e in r1["events"]} == {"divergence"}
    assert {e["step"] for e in r1["events"]} == {7}


@pytest.mark.slow
def test_ddp_resumed_run_gives_the_same_alerts(ddp: Path) -> None:
    full = dist_common.load(ddp, "full", 2)
    first = dist_common.load(ddp, "first", 2)
    resumed = dist_common.load(ddp, "resumed", 2)
    assert [r["global_step"] for r in first] == [ddp_run.CUT] * 2
    assert [r["global_step"] for r in resumed] == [ddp_run.STEPS] * 2
    for f, r in zip(full, resumed):
        # the same alerts, to the last bit (the cut run's extra read at the cut changes nothing)
        assert r["events"] == f["events"] and r["alerts"] == f["alerts"] >= 2
        assert _same(r["latest"], f["latest"])
        # after the cut, every read logs what the uninterrupted run logged
        after = {x["step"]: x["metrics"] for x in f["reads"] if x["step"] > ddp_run.CUT}
        got = {x["step"]: x["metrics"] for x in r["reads"]}
        assert sorted(got) == sorted(after)
        for step, metrics in got.items():
            assert not _mismatch(metrics, after[step], rel=0.0), step


@pytest.mark.slow
def test_ddp_shockmon_collectives_only_agree_stops_at_log_steps(ddp: Path) -> None:
    log_steps = set(range(ddp_run.LOG_EVERY, ddp_run.STEPS + 1, ddp_run.LOG_EVERY))
    for rank in dist_common.load(ddp, "full", 2):
        calls = rank["collectives"]
        assert {c["where"] for c in calls} == {"early_stopping.py:_on_monitor_read"}
        assert {c["step"] for c in calls} == log_steps  # none between log steps
        # per log step, one all-reduce of the stop decision (Lightning's reduce_boolean_decision adds a
        # barrier)
        reduces = Counter(c["step"] for c in calls if c["op"] == "all_reduce")
        assert reduces == Counter(dict.fromkeys(log_steps, 1))
        assert {c["op"] for c in calls} <= {"all_reduce", "barrier"}
        assert (
            rank["bytes"] == rank["rounds"] == 0
        )  # DDP parameters are whole: the observer communicates nothing


# ------------------------------------------------------------------------------------------- FSDP2 sharded
@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of ``sharded_run.py``: ModelParallelStrategy(data_parallel_size=2), full_tensor raising."""
    out = tmp_path_factory.mktemp("sharded")
    _launch("sharded_run.py", out)
    return out


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unsharded")
    sharded_run.main(out, devices=1)
    return out


@pytest.mark.slow
def test_sharded_lightning_run_logs_the_unsharded_observables(sharded: Path, unsharded: Path) -> None:
    r0, r1 = dist_common.load(sharded, "sharded", 2)
    (ref,) = dist_common.load(unsharded, "sharded", 1)
    assert r0["sharded"] and r1["sharded"] and not ref["sharded"]  # the observer saw DTensor shards
    assert _same(r0["reads"], r1["reads"]) and r0["events"] == r1["events"]
    keys = ref["reads"][0]["metrics"]
    for family in ("attention_qk", "attention_vo", "rescale/mlp.2", "rescale/block.linear1"):
        assert any(f"/quotient/{family}" in k for k in keys), family
    assert [x["step"] for x in r0["reads"]] == [x["step"] for x in ref["reads"]]
    for got, want in zip(r0["reads"], ref["reads"]):
        bad = _mismatch(got["metrics"], want["metrics"], rel=1e-5)
        assert not bad, f"step {got['step']}: {bad[:3]}"
    assert _same(r0["events"], ref["events"], rel=1e-5)


@pytest.mark.slow
def test_sharded_lightning_run_all_reduces_once_per_round_and_never_gathers(sharded: Path) -> None:
    for rank in dist_common.load(sharded, "sharded", 2):
        calls = rank["collectives"]
        # shockmon's collectives: the observer's all-reduces, and the stop agreement at log steps; no gather
        assert {
            (c["op"], c["where"]) for c in calls if c["where"] != "early_stopping.py:_on_monitor_read"
        } == {("all_reduce", "shards.py:reduce")}
        # one all-reduce per round: a two-hidden-layer chain needs 2 rounds per compute(), the gradient
        # observables 1; every observed step between the first and the last (where MeasureParts adds its own)
        reduces = Counter(c["step"] for c in calls if c["where"] == "shards.py:reduce")
        assert rank["rounds"] == 3 * rank["observations"] == 3 * sharded_run.STEPS and rank["bytes"] > 0
        assert {s: reduces[s] for s in range(1, sharded_run.STEPS)} == dict.fromkeys(
            range(1, sharded_run.STEPS), 3
        )
        stops = Counter(c["step"] for c in calls if c["where"] == "early_stopping.py:_on_monitor_read")
        assert set(stops) == set(range(sharded_run.LOG_EVERY, sharded_run.STEPS + 1, sharded_run.LOG_EVERY))


# ------------------------------------------------------------------------------------- unsupported strategies
def _setup(strategy: Any) -> None:
    monitor = ShockMonitor()
    trainer = types.SimpleNamespace(strategy=strategy, callbacks=[monitor], log_every_n_steps=50)
    monitor.setup(trainer, None, "fit")  # type: ignore[arg-type]


def test_discovery_of_fsdp2_sharded_custom_blocks_equals_unsharded() -> None:
    """Tracing a model whose blocks are ``fully_shard``-ed runs their forward with FSDP's hooks off; discovery
    reports the same groups as for the model unsharded, and the model still trains (one gloo process)."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "discover_sharded.py")], env=env, capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["model"], r["groups"] > 0, r["same"], r["trains"], r["finite"]) for r in rows] == [
        ("nanogpt", True, True, True, True),
        ("resnet", True, True, True, True),
    ]


def test_shock_monitor_refuses_deepspeed_at_setup() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    # a DDPStrategy subclass; built without its __init__, which needs the deepspeed package
    with pytest.raises(
        MisconfigurationException, match="DeepSpeedStrategy: ZeRO.*Supported: SingleDeviceStrategy"
    ):
        _setup(DeepSpeedStrategy.__new__(DeepSpeedStrategy))


def test_shock_monitor_refuses_fsdp1_and_points_to_fsdp2() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(MisconfigurationException, match="FSDPStrategy: FSDP1 flat parameters.*fully_shard"):
        _setup(FSDPStrategy())


def test_shock_monitor_refuses_an_unknown_strategy() -> None:
    from lightning.pytorch.strategies import ParallelStrategy

    class HomeMadeStrategy(ParallelStrategy):  # the least a strategy must define
        root_device = property(lambda self: torch.device("cpu"))

        def model_to_device(self) -> None: ...
        def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any: ...
        def barrier(self, name: str | None = None) -> None: ...
        def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    with pytest.raises(MisconfigurationException, match="HomeMadeStrategy: it is none of.*DDPStrategy"):
        _setup(HomeMadeStrategy())


def test_shock_monitor_refuses_tensor_parallel_sharding() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name: str) -> Any:
            return types.SimpleNamespace(size=lambda: {"data_parallel": 1, "tensor_parallel": 2}[name])

    class TensorParallel(ModelParallelStrategy):
        @property
        def device_mesh(self) -> Any:
            return Mesh()

    with pytest.raises(MisconfigurationException, match="tensor_parallel_size=2 shards weights by columns"):
        _setup(TensorParallel(data_parallel_size=1, tensor_parallel_size=2))


def test_shock_monitor_accepts_the_supported_strategies() -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    for strategy in (
        SingleDeviceStrategy("cpu"),
        DDPStrategy(),
        DDPStrategy(start_method="spawn"),
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    ):
        _setup(strategy)  # ModelParallelStrategy before its mesh exists: nothing to refuse yet
