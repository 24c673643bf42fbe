"""The TensorBoard view: event files read back with TensorBoard's own reader, and the real server's HTTP
API."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from callback_models import TRANSITION_STEP, ScriptedTransition, trainer
from lightning.pytorch.loggers import TensorBoardLogger

from shockmon import ShockMonitor

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*LeafSpec.*",
)

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TensorBoard run of the scripted shock (steps 1..80, logged every 5, histograms every 20)."""
    root = tmp_path_factory.mktemp("tb")
    logger = TensorBoardLogger(root, name="scripted", default_hp_metric=False)
    monitor = ShockMonitor(log_every_n_steps=5, histogram_every_n_steps=20, horizon=100)
    trainer(root, [monitor], max_steps=80, logger=logger).fit(ScriptedTransition())
    return Path(logger.log_dir)


@pytest.fixture(scope="module")
def accumulator(run_dir: Path):  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def _texts(acc, tag: str) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_tensorboard_scalars_show_the_forecast_before_and_the_shock_at_the_transition(accumulator):
    scalars = set(accumulator.Tags()["scalars"])
    for tag in (
        "shockmon/quotient/rescale/net.0/path_mass_max",
        "shockmon/raw/net.0.weight",
        "shockmon/forecast/rescale/net.0",
        "shockmon/viscosity/rescale/net.0",
        "shockmon/burgers_consistency",
        "shockmon/steps_to_shock",
        "shockmon/shock",
        "shockmon/alerts",
        "shockmon/alerts/rescale/net.0",
    ):
        assert tag in scalars, tag
    forecast = {e.step: e.value for e in accumulator.Scalars("shockmon/forecast/rescale/net.0")}
    assert sorted(forecast) == list(range(5, 81, 5))
    # well before the transition, steps-to-shock points at it
    early = [s + v for s, v in forecast.items() if s <= TRANSITION_STEP - 20 and math.isfinite(v)]
    assert early and all(abs(t - TRANSITION_STEP) <= 5 for t in early)
    shock = {e.step: e.value for e in accumulator.Scalars("shockmon/shock")}
    assert all(v == 0.0 for s, v in shock.items() if s < TRANSITION_STEP)
    assert any(v == 1.0 for s, v in shock.items() if TRANSITION_STEP <= s <= TRANSITION_STEP + 10)


def test_tensorboard_alert_text_names_forecast_then_shock(accumulator):
    texts = _texts(accumulator, "shockmon/alert_text")
    forecasts = [s for s, t in texts if "**forecast** | `rescale/net.0`" in t]
    shocks = [s for s, t in texts if "**shock** | `rescale/net.0`" in t]
    assert forecasts and forecasts[0] < TRANSITION_STEP - 20
    assert shocks and TRANSITION_STEP <= shocks[0] <= TRANSITION_STEP + 10
    assert "forecast shock step" in texts[0][1]  # a markdown table with its header
    report = _texts(accumulator, "shockmon/symmetry_report")
    assert report and "net.0.weight -> net.2.weight" in report[0][1]


def test_tensorboard_histograms_of_per_unit_invariants(accumulator):
    hists = accumulator.Tags()["histograms"]
    assert "shockmon/quotient/rescale/net.0/path_mass/sorted" in hists
    steps = [e.step for e in accumulator.Histograms("shockmon/quotient/rescale/net.0/path_mass/sorted")]
    assert steps == [5, 20, 40, 60, 80]  # the first read, then every 20 steps
    assert (
        accumulator.Histograms("shockmon/quotient/rescale/net.0/path_mass/sorted")[0].histogram_value.num == 8
    )


def test_tensorboard_custom_scalars_layout(accumulator):
    from tensorboard.plugins.custom_scalar import layout_pb2

    assert "custom_scalars__config__" in accumulator.Tags()["tensors"]
    proto = accumulator.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    charts = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}
    assert charts["shockmon: quotient vs raw"]["net.0"] == [
        "^shockmon/quotient/[^/]+/net\\.0/",
        "^shockmon/raw/net\\.0[./]",
    ]
    assert charts["shockmon: forecasts and alerts"]["rescale/net.0"][:2] == [
        "^shockmon/forecast/rescale/net\\.0$",
        "^shockmon/alerts/rescale/net\\.0$",
    ]
    assert "steps to shock, shock, alerts" in charts["shockmon: tracker"]


# --------------------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, tries: int = 120, wait: float = 0.5) -> bytes:
    last: Exception | None = None
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            last = err
            time.sleep(wait)
    raise AssertionError(f"TensorBoard did not answer {url}: {last}")


@pytest.fixture(scope="module")
def server(run_dir: Path):  # type: ignore[no-untyped-def]
    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir.parent), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--load_fast", "false", "--reload_interval", "1"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_tensorboard_server_lists_the_shockmon_tags(server):
    tags: dict = {}
    for _ in range(60):  # the first load of the event files takes a moment after the server answers
        tags = json.loads(_get(f"{server}/data/plugin/scalars/tags"))
        if any("shockmon/steps_to_shock" in t for t in tags.values()):
            break
        time.sleep(0.5)
    run_tags = next(iter(tags.values()))
    for tag in (
        "shockmon/steps_to_shock",
        "shockmon/shock",
        "shockmon/alerts",
        "shockmon/forecast/rescale/net.0",
    ):
        assert tag in run_tags, sorted(run_tags)
    text_runs = json.loads(_get(f"{server}/data/plugin/text/tags"))
    assert any("shockmon/alert_text/text_summary" in t for t in text_runs.values())


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
def test_tensorboard_page_renders_in_headless_chromium(server, tmp_path):
    _get(f"{server}/data/plugin/scalars/tags")
    shot = tmp_path / "tensorboard.png"
    common = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=15000",
    ]
    url = f"{server}/#scalars&tagFilter=shockmon"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,900", url],
        check=True,
        timeout=120,
        capture_output=True,
    )
    dom = subprocess.run(
        [*common, "--dump-dom", url], check=True, timeout=120, capture_output=True, text=True
    ).stdout
    data = shot.read_bytes()
    assert (
        data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    )  # a blank or error page compresses to far less
    assert "tf-tensorboard" in dom or "tb-webapp" in dom, dom[:500]
    assert "No dashboards are active" not in dom
