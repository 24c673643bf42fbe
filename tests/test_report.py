"""``shockmon report``: a run of the scripted transition read back from its event files (tables, JSON, PNGs),
the particle snapshots the monitor writes for it, and bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from callback_models import TRANSITION_STEP, ScriptedTransition, scripted_monitor_class, trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from shockmon import ShockMonitor
from shockmon.callbacks import monitor as monitor_module
from shockmon.callbacks import snapshots
from shockmon.cli import REPORT_FORMATS, main

torch.set_num_threads(1)

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*smaller than the logging interval:UserWarning",
    "ignore:.*LeafSpec.*",
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS, LOG_EVERY = 80, 5
FORECAST_AT, SHOCK_AT = 20, 40  # the scripted tracker's events


def _fit(root: Path, monitor: ShockMonitor, steps: int = STEPS, csv_logger: bool = False) -> Path:
    tb_logger = TensorBoardLogger(root, name="lightning_logs", default_hp_metric=False)
    loggers: list[Any] = [tb_logger]
    if csv_logger:
        loggers.append(CSVLogger(root, name="csv"))
    trainer(root, [monitor], max_steps=steps, logger=loggers).fit(ScriptedTransition())
    return Path(tb_logger.log_dir)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real tracker on the scripted transition, 4 of 8 units in the snapshots, a CSV logger beside
    TensorBoard, and every host transfer of the monitor counted."""
    root = tmp_path_factory.mktemp("real")
    monitor = ShockMonitor(log_every_n_steps=LOG_EVERY, horizon=100, snapshot_units=4, print_summary=False)
    transfers: list[list[str]] = []
    original = monitor_module.to_host

    def counting(values):  # type: ignore[no-untyped-def]
        transfers.append(list(values))
        return original(values)

    with mock.patch.object(monitor_module, "to_host", side_effect=counting):
        run = _fit(root, monitor, csv_logger=True)
    with open(next((root / "csv").rglob("metrics.csv")), newline="") as f:
        rows = list(csv.DictReader(f))
    return {"run": run, "monitor": monitor, "transfers": transfers, "csv": rows}


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scripted tracker: a forecast at step 20 (predicting 40), a shock at 40, consistency 0.5."""
    root = tmp_path_factory.mktemp("scripted")
    monitor = scripted_monitor_class(forecast_from=FORECAST_AT, shock_at=SHOCK_AT)(
        log_every_n_steps=LOG_EVERY, print_summary=False
    )
    return _fit(root, monitor, steps=50)


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json_report(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = _report(capsys, *args, "--format", "json")
    assert code == 0, err
    return json.loads(out)


# -------------------------------------------------------------------------------------------- snapshots
def test_snapshots_hold_the_scripted_coordinates_of_evenly_spaced_units(real_run):
    particles = snapshots.read(snapshots.accumulator(str(real_run["run"])), "shockmon")
    assert set(particles) == {"rescale/net.0"}
    p = particles["rescale/net.0"]
    assert p.units.tolist() == [0, 2, 5, 7] and p.num_units == 8
    assert p.steps.tolist() == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    model = ScriptedTransition()
    for step, row in zip(p.steps, p.values):
        w_in, _ = model.scripted(int(step))
        log_r = w_in.norm(dim=1).log().numpy()  # ¼ log path mass = log r_i for shared unit directions
        np.testing.assert_allclose(row, log_r[p.units], atol=1e-5)


def test_snapshots_ride_in_the_one_transfer_of_each_log_step(real_run):
    transfers = real_run["transfers"]
    assert len(transfers) == STEPS // LOG_EVERY  # one per log step, none added
    assert all("particles:rescale/net.0" in keys for keys in transfers)


def test_snapshot_units_is_validated():
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="`snapshot_units` to be an integer >= 0"):
            ShockMonitor(snapshot_units=bad)


def test_selector_and_indices():
    assert snapshots.snapshot_indices(100, 64).size == 64
    assert snapshots.snapshot_indices(100, 64)[[0, -1]].tolist() == [0, 99]
    sel = snapshots.Selector(3)
    x = torch.arange(22.0).reshape(11, 2)
    assert sel.select({"g": x})["g"].tolist() == [0.0, 10.0, 20.0]  # units 0, 5, 10
    assert sel.select({"g": x[:2]})["g"].tolist() == [0.0, 2.0]  # the unit count changed: new indices


def test_monitor_logs_the_characteristic_diagram_at_the_end_of_fit(real_run):
    acc = snapshots.accumulator(str(real_run["run"]))
    assert acc.Tags()["images"] == ["shockmon/characteristics/rescale/net.0"]
    (image,) = acc.Images("shockmon/characteristics/rescale/net.0")
    assert image.step == STEPS and (image.width, image.height) == (900, 550)
    assert image.encoded_image_string.startswith(PNG_SIGNATURE)


# ------------------------------------------------------------------------------------------------ report
def test_report_text_lists_events_consistency_and_symmetry(scripted_run, tmp_path, capsys):
    code, out, err = _report(capsys, scripted_run, "--out", tmp_path / "out")
    assert code == 0, err
    assert err == ""
    lines = out.splitlines()
    events = lines[lines.index("Events (2)") + 2 : lines.index("Events (2)") + 4]
    forecast, shock = (ln.split() for ln in events)
    # kind, group, view, step, forecast shock step, lead, strength
    assert forecast[:7] == ["forecast", "rescale/net.0", "particle", "20", "40", "20", "3.00"]
    assert shock[:7] == ["shock", "rescale/net.0", "particle", "40", "40", "0", "5.00"]
    assert "Burgers consistency over time" in out
    assert "10 log steps, 0 not finite; range 0.50 … 0.50, last 0.50" in out
    assert "net.0.weight -> net.2.weight" in out.split("Symmetry summary")[1]
    assert str(tmp_path / "out" / "characteristics_rescale_net.0.png") in out


def test_report_json_agrees_with_the_monitor_and_the_csv_logger(real_run, tmp_path, capsys):
    doc = _json_report(capsys, real_run["run"], "--out", tmp_path / "out")
    assert doc["skipped"] == []
    (run,) = doc["runs"]
    monitor = real_run["monitor"]
    assert monitor.events  # the real tracker forecasts and catches the scripted shock (see test_tensorboard)
    assert [(e["kind"], e["group"], e["view"], e["step"]) for e in run["events"]] == [
        (e.kind.value, e.group, e.channel, e.step) for e in monitor.events
    ]
    for got, want in zip(run["events"], monitor.events):  # exactly: read from the JSON beside the table
        assert got["forecast"] == (want.predicted_step if math.isfinite(want.predicted_step) else None)
        assert got["strength"] == want.strength
        assert got["units"] == list(want.units)
    kinds = {e["kind"]: e["step"] for e in run["events"]}
    assert kinds["forecast"] < TRANSITION_STEP <= kinds["shock"]
    # Burgers consistency: the same steps and values as the CSV logger got (an independent writer)
    csv_values = {
        int(r["step"]): float(r["shockmon/burgers_consistency"])
        for r in real_run["csv"]
        if r.get("shockmon/burgers_consistency")
    }
    steps = [s for s, _ in run["burgers_consistency"]]
    assert steps == sorted(csv_values) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for s, v in run["burgers_consistency"]:
        if v is None:
            assert not math.isfinite(csv_values[s])
        else:
            assert v == pytest.approx(csv_values[s], rel=1e-6)
    assert run["symmetry"] == str(monitor.report).strip()
    assert run["groups"]["rescale/net.0"]["alerts"] == len(monitor.events)
    assert run["groups"]["rescale/net.0"]["snapshot_units"] == [0, 2, 5, 7]
    assert run["steps"] == [LOG_EVERY, STEPS]


def test_report_pngs_are_valid_images_of_the_expected_size(real_run, tmp_path, capsys):
    import matplotlib.image as mpimg

    out = tmp_path / "out"
    doc = _json_report(capsys, real_run["run"], "--out", out)
    expected = {
        "characteristics_rescale_net.0.png": (550, 900),
        "forecast.png": (650, 900),
        "norms.png": (320, 1200),  # two panels (net.0, net.2 raw only): one row
    }
    assert sorted(Path(p).name for p in doc["runs"][0]["plots"]) == sorted(expected)
    for name, (height, width) in expected.items():
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        pixels = mpimg.imread(path)
        assert pixels.shape[:2] == (height, width), name
        colours = np.unique(pixels[..., :3].reshape(-1, 3).round(2), axis=0)
        assert len(colours) > 20, name  # lines and text, not a blank canvas


def test_report_markdown(scripted_run, tmp_path, capsys):
    out = tmp_path / "out"
    code, text, err = _report(capsys, scripted_run, "--out", out, "--format", "markdown")
    assert code == 0, err
    assert "| forecast | rescale/net.0 | particle | 20 | 40 | 20 | 3.00 | 0, 1 |" in text
    assert "| shock | rescale/net.0 | particle | 40 | 40 | 0 | 5.00 | 0, 1 |" in text
    assert "![characteristics_rescale_net.0](characteristics_rescale_net.0.png)" in text


def test_report_subprocess_json(scripted_run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "shockmon.cli", "report", str(scripted_run), "--format", "json", "--no-plots"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(proc.stdout)["runs"]
    assert [(e["kind"], e["step"], e["forecast"]) for e in run["events"]] == [
        ("forecast", FORECAST_AT, SHOCK_AT),
        ("shock", SHOCK_AT, SHOCK_AT),
    ]
    assert all(v == 0.5 for _, v in run["burgers_consistency"])
    assert run["plots"] == [] and not (tmp_path / "shockmon_report").exists()


def test_report_on_a_directory_of_two_runs(real_run, scripted_run, tmp_path, capsys):
    logs = tmp_path / "lightning_logs"
    shutil.copytree(scripted_run, logs / "version_0")
    shutil.copytree(real_run["run"], logs / "version_1")
    out = tmp_path / "out"
    doc = _json_report(capsys, logs, "--out", out)
    assert [r["run"] for r in doc["runs"]] == [str(logs / "version_0"), str(logs / "version_1")]
    assert [len(r["events"]) for r in doc["runs"]] == [2, len(real_run["monitor"].events)]
    for version in ("version_0", "version_1"):
        assert (out / version / "characteristics_rescale_net.0.png").is_file()
    code, text, _ = _report(capsys, logs, "--no-plots")
    assert code == 0 and text.count("== ") == 2


def test_report_reads_a_run_whose_last_record_is_truncated(scripted_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(scripted_run, run)
    (event_file,) = run.glob("events.out.tfevents.*")
    data = event_file.read_bytes()
    event_file.write_bytes(data[:-7])  # cut inside the last record, as a run still being written
    code, out, err = _report(capsys, run, "--no-plots", "--format", "json")
    assert code == 0, err
    assert "shockmon report: warning:" in err and "truncated record" in err and str(event_file) in err
    (doc,) = json.loads(out)["runs"]
    assert [e["kind"] for e in doc["events"]] == ["forecast", "shock"]
    assert any("truncated" in w for w in doc["warnings"])


def test_report_without_snapshots_says_why_there_is_no_diagram(tmp_path, capsys):
    monitor = scripted_monitor_class(forecast_from=10, shock_at=20)(
        log_every_n_steps=LOG_EVERY, print_summary=False, snapshot_units=0
    )
    run = _fit(tmp_path, monitor, steps=25)
    code, _, err = _report(capsys, run, "--out", tmp_path / "out")
    assert code == 0
    assert "no particle snapshots for alerted group 'rescale/net.0'" in err
    assert not (tmp_path / "out" / "characteristics_rescale_net.0.png").exists()
    assert (tmp_path / "out" / "forecast.png").is_file()


# -------------------------------------------------------------------------------------------- bad input
def _plain_tensorboard_run(path: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(path)) as writer:
        for step in range(3):
            writer.add_scalar("train_loss", 1.0 / (step + 1), step)
    return path


def _cut_in_first_record(path: Path, scripted_run: Path) -> Path:
    path.mkdir()
    (source,) = scripted_run.glob("events.out.tfevents.*")
    (path / source.name).write_bytes(source.read_bytes()[:10])
    return path


BAD_INPUTS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "missing": (lambda p, _: p / "nope", "no such directory: '{path}'"),
    "not-a-directory": (
        lambda p, _: (p / "file.txt", (p / "file.txt").write_text("x"))[0],
        "not a directory",
    ),
    "no-event-files": (lambda p, _: (p / "empty", (p / "empty").mkdir())[0], "no TensorBoard event files"),
    "no-shockmon-tags": (lambda p, _: _plain_tensorboard_run(p / "plain"), "no shockmon tags in the 1 event"),
    "unreadable": (
        lambda p, r: _cut_in_first_record(p / "cut", r),
        "cannot be read: it is cut inside its first",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_report_bad_input_one_line_and_exit_2(case, scripted_run, tmp_path, capsys):
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path, scripted_run)
    code, out, err = _report(capsys, path, "--out", tmp_path / "out")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("shockmon report: error: "), err
    assert expected.format(path=path) in err
    assert str(path) in err  # where
    assert "expected" in err  # what was expected
    assert not (tmp_path / "out").exists()


def test_report_skips_a_bad_run_among_good_ones(scripted_run, tmp_path, capsys):
    logs = tmp_path / "lightning_logs"
    shutil.copytree(scripted_run, logs / "version_0")
    _plain_tensorboard_run(logs / "version_1")
    doc = _json_report(capsys, logs, "--no-plots")
    assert [r["run"] for r in doc["runs"]] == [str(logs / "version_0")]
    assert len(doc["skipped"]) == 1 and "version_1" in doc["skipped"][0]


def test_report_formats_match_the_cli():
    from shockmon.report import FORMATS

    assert tuple(REPORT_FORMATS) == tuple(FORMATS)


def test_report_reads_an_alert_table_without_its_json_comment():
    """Runs written before the exact JSON comment existed: the table is read (rounded values)."""
    from shockmon.callbacks.tensorboard import alerts_markdown
    from shockmon.events import EventKind, ShockEvent
    from shockmon.report.read import parse_alerts

    event = ShockEvent(EventKind.FORECAST, "rescale/net.0", "particle", 120, 180.25, 4.2123, (3, 17))
    text = alerts_markdown([event])
    assert parse_alerts(text) == [event]
    table_only = "\n".join(line for line in text.splitlines() if not line.startswith("<!--"))
    (old,) = parse_alerts(table_only)
    assert (old.step, old.predicted_step, old.strength, old.units) == (120, 180.0, 4.21, (3, 17))
    broken = text.replace("[[120", "[[oops")  # a comment that does not parse: the table still does
    assert parse_alerts(broken) == [old]


def test_report_marks_every_event_kind_once_in_the_legend():
    pytest.importorskip("matplotlib")
    from shockmon.events import EventKind, ShockEvent
    from shockmon.plots import _mark_events, figure

    ax = figure(400, 300).subplots()
    events = [
        ShockEvent(EventKind.FORECAST, "g", "particle", 10, 40.0, 3.0),
        ShockEvent(EventKind.FORECAST, "g", "particle", 12, 41.0, 3.0),
        ShockEvent(EventKind.INSTABILITY, "g", "particle", 20, math.inf, 8.0, (1, 2)),
        ShockEvent(EventKind.SHOCK, "g", "particle", 41, 41.0, 3.0),
        ShockEvent(EventKind.DIVERGENCE, "g", "input", 60, math.inf, 0.0),
    ]
    handles = _mark_events(ax, events, 0.0, 100.0)
    assert [h.get_label() for h in handles] == [
        "forecast fired", "predicted shock step", "instability", "shock", "divergence"
    ]  # fmt: skip
    assert [h.get_marker() for h in handles[:3]] == ["^", "None", "v"]
