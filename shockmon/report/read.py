"""Read a run back from its TensorBoard event files: events, Burgers consistency, symmetry summary, plots.

This is what ``shockmon report RUN_DIR`` runs. Event files are read with TensorBoard's own reader
(``EventAccumulator``, every record kept); a run still being written is read as far as it goes, and a file
that ends in a truncated record is read up to it, with a warning. What is read:

- events: the ``<prefix>/alert_text`` texts the monitor writes at each log step — exactly, from the JSON comment
  under each table (TensorBoard does not show it), or from the table's rounded cells in runs written before it;
- ``<prefix>/burgers_consistency``, ``<prefix>/forecast/<group>``, ``<prefix>/state/<group>`` scalars;
- ``<prefix>/symmetry_report``, the symmetry summary written at fit start;
- ``<prefix>/particles/<group>`` snapshots (:mod:`shockmon.callbacks.snapshots`), for characteristic diagrams;
- ``<prefix>/quotient/...`` and ``<prefix>/raw/...`` scalars, for the quotient-vs-raw plot.

Formatting (text, markdown, JSON) lives in :mod:`shockmon.report.render`, figures in :mod:`shockmon.plots`.
Bad input raises :class:`ReportError`, whose message is one line naming what was expected and where.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shockmon.callbacks import snapshots
from shockmon.callbacks.tensorboard import EVENTS_COMMENT
from shockmon.events import EventKind, ShockEvent

EVENT_FILE_PREFIX = "events.out.tfevents."
#: scalar tags that mark a prefix as a ShockMonitor's (beside its alert_text and symmetry_report texts)
_MARKERS = ("/burgers_consistency", "/steps_to_shock")
#: quotient observables that are not norms (ratios, gradients): left out of the quotient-vs-raw plot
_NOT_NORMS = ("grad_norm", "participation", "coherence", "effective_rank")


class ReportError(Exception):
    """Bad input for a report: a missing directory, no event files, no shockmon tags, an unreadable file."""


@dataclass
class RunData:
    """What one ShockMonitor (one ``prefix``) logged in one run directory."""

    run: Path
    prefix: str
    event_files: list[Path]
    events: list[ShockEvent]
    consistency: tuple[np.ndarray, np.ndarray]
    forecasts: dict[str, tuple[np.ndarray, np.ndarray]]
    states: dict[str, float]
    symmetry: str | None
    particles: dict[str, snapshots.Particles]
    norms: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    steps: tuple[int, int] | None
    warnings: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    @property
    def alerted_groups(self) -> list[str]:
        """Groups with at least one event, in order of their first event."""
        return list(dict.fromkeys(e.group for e in self.events))


# ------------------------------------------------------------------------------------------ finding runs
def _is_event_file(name: str) -> bool:
    return name.startswith(EVENT_FILE_PREFIX)


def find_runs(path: str | Path) -> list[Path]:
    """Every directory at or under ``path`` that holds TensorBoard event files (each one run), sorted.

    Raises:
        ReportError: ``path`` is not a directory, or holds no event files at any depth.
    """
    root = Path(path)
    if not root.exists():
        raise ReportError(
            f"no such directory: {str(root)!r} (expected a run directory with TensorBoard event files"
            " 'events.out.tfevents.*', or a directory of runs such as lightning_logs/)"
        )
    if not root.is_dir():
        raise ReportError(
            f"not a directory: {str(root)!r} (expected the directory that holds the event files, e.g."
            " lightning_logs/version_0)"
        )
    runs = sorted(Path(d) for d, _, files in os.walk(root) if any(_is_event_file(f) for f in files))
    if not runs:
        raise ReportError(
            f"no TensorBoard event files ('events.out.tfevents.*') in {str(root)!r} or below it (expected the"
            " log directory of a run with ShockMonitor and a TensorBoardLogger)"
        )
    return runs


def check_event_file(path: str | Path) -> tuple[int, int | None]:
    """Walk the record framing of an event file: ``(complete records, byte offset of a truncated last record
    or None)``. CRCs are left to TensorBoard's reader.

    A TFRecord is ``uint64 length, uint32 crc, data[length], uint32 crc``; a file whose end falls inside one
    is truncated (a run still being written, or cut short).
    """
    size = os.path.getsize(path)
    records, offset = 0, 0
    with open(path, "rb") as f:
        while offset < size:
            head = f.read(12)
            if len(head) < 12:
                return records, offset
            (length,) = struct.unpack("<Q", head[:8])
            end = offset + 12 + length + 4
            if end > size:
                return records, offset
            f.seek(end)
            offset, records = end, records + 1
    return records, None


# ------------------------------------------------------------------------------------------------ reading
def _text(acc: Any, tag: str) -> list[tuple[int, str]]:
    full = f"{tag}/text_summary"
    if full not in acc.Tags().get("tensors", []):
        return []
    out = []
    for e in acc.Tensors(full):
        if e.tensor_proto.string_val:
            out.append((int(e.step), e.tensor_proto.string_val[0].decode("utf-8", "replace")))
    return out


def _series(acc: Any, tag: str) -> tuple[np.ndarray, np.ndarray]:
    by_step = {int(e.step): float(e.value) for e in acc.Scalars(tag)}  # a step logged twice: the last
    steps = sorted(by_step)
    return np.asarray(steps, dtype=np.int64), np.asarray([by_step[s] for s in steps], dtype=np.float64)


def _cell_float(text: str) -> float:
    text = text.strip()
    if text in ("", "—", "-", "inf"):
        return math.inf
    return float(text)


def _parse_exact(markdown: str) -> list[ShockEvent] | None:
    """The events from the JSON comment :func:`~shockmon.callbacks.tensorboard.alerts_markdown` appends (``None``
    when there is none, or it does not parse: the table is read instead, as in runs written before it)."""
    start = markdown.find(EVENTS_COMMENT)
    end = markdown.find("-->", start)
    if start < 0 or end < 0:
        return None
    try:
        rows = json.loads(markdown[start + len(EVENTS_COMMENT) : end])
        return [
            ShockEvent.from_dict(
                {
                    "step": step,
                    "kind": kind,
                    "group": group,
                    "channel": channel,
                    "predicted_step": math.inf if pred is None else pred,  # JSON has no inf: written as null
                    "strength": 0.0 if strength is None else strength,
                    "units": units,
                }
            )
            for step, kind, group, channel, pred, strength, units in rows
        ]
    except (ValueError, TypeError):
        return None


def parse_alerts(markdown: str) -> list[ShockEvent]:
    """The events of one ``alert_text`` text: its JSON comment when there is one, else the markdown table's rows
    (rows that do not parse are skipped).

    Example:
        >>> rows = parse_alerts("| 120 | **forecast** | `mlp.0` | particle | 180 | 60 | 4.20 | 3, 17 |")
        >>> rows[0].kind.value, rows[0].group, rows[0].step, rows[0].predicted_step, rows[0].units
        ('forecast', 'mlp.0', 120, 180.0, (3, 17))
    """
    exact = _parse_exact(markdown)
    if exact is not None:
        return exact
    events = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or not cells[0].isdigit():
            continue  # the header, the separator, anything else
        try:
            units = (
                tuple(int(u) for u in cells[7].replace("…", "").split(",") if u.strip())
                if len(cells) > 7
                else ()
            )
            events.append(
                ShockEvent(
                    EventKind(cells[1].strip("*")),
                    cells[2].strip("`"),
                    cells[3],
                    int(cells[0]),
                    _cell_float(cells[4]),
                    float(cells[6]),
                    units,
                )
            )
        except ValueError:
            continue
    return events


def _prefixes(tags: dict[str, Any]) -> list[str]:
    found = []
    for tag in tags.get("scalars", []):
        for marker in _MARKERS:
            if tag.endswith(marker) and tag[: -len(marker)]:
                found.append(tag[: -len(marker)])
    for tag in tags.get("tensors", []):
        m = re.match(r"^(.+)/(alert_text|symmetry_report)/text_summary$", tag)
        if m:
            found.append(m.group(1))
    return list(dict.fromkeys(found))


def _norm_panels(scalars: Iterable[str], prefix: str, acc: Any) -> dict[str, dict[str, Any]]:
    q_head, r_head = f"{prefix}/quotient/", f"{prefix}/raw/"
    scalars = list(scalars)
    panels: dict[str, dict[str, Any]] = {}
    for tag in scalars:
        parts = tag[len(q_head) :].split("/") if tag.startswith(q_head) else []
        if len(parts) >= 3 and not any(w in parts[-1] for w in _NOT_NORMS):
            panels.setdefault(parts[1], {})[f"quotient/{parts[-1]}"] = _series(acc, tag)
    for tag in scalars:
        rest = tag[len(r_head) :] if tag.startswith(r_head) else ""
        if not rest:
            continue
        layer = next((m for m in panels if rest.startswith((f"{m}.", f"{m}/"))), None)
        if layer is None:  # a layer no quotient observable covers alone (e.g. a chain's last layer)
            module = rest.split("/", 1)[0] if "/" in rest else rest.rsplit(".", 1)[0]
            name = rest[len(module) + 1 :] or rest
            layer = f"{module} (raw only)"
        else:
            name = rest[len(layer) + 1 :]
        panels.setdefault(layer, {})[f"raw/{name}"] = _series(acc, tag)
    return panels


def load_run(run: str | Path, prefix: str | None = None) -> list[RunData]:
    """Read one run directory: one :class:`RunData` per ShockMonitor prefix found (or just ``prefix``).

    Raises:
        ReportError: no shockmon tags, or no readable record at all.
    """
    run = Path(run)
    files = sorted(p for p in run.iterdir() if _is_event_file(p.name) and p.is_file())
    warnings, truncated = [], []
    for f in files:
        records, cut = check_event_file(f)
        if cut is not None:
            truncated.append((f, records, cut))
            warnings.append(
                f"{f} ends in a truncated record at byte {cut} of {f.stat().st_size} (a run still being"
                f" written, or cut short): read the {records} complete records before it"
            )
    acc = snapshots.accumulator(str(run))  # every record of every tag read
    tags = acc.Tags()
    prefixes = _prefixes(tags)
    if prefix is not None:
        prefixes = [p for p in prefixes if p == prefix]
    if not prefixes:
        unreadable = [(f, cut) for f, records, cut in truncated if records == 0]
        if unreadable and len(unreadable) == len(files):
            f, cut = unreadable[0]
            raise ReportError(
                f"event file {str(f)!r} cannot be read: it is cut inside its first record (byte {cut} of"
                f" {f.stat().st_size}); expected complete TensorBoard event records"
            )
        wanted = f"{prefix!r}" if prefix is not None else "'shockmon' (or another ShockMonitor prefix)"
        what = f" ({len(truncated)} truncated)" if truncated else ""
        raise ReportError(
            f"no shockmon tags in the {len(files)} event file(s){what} in {str(run)!r}: expected tags such as"
            f" <prefix>/burgers_consistency with prefix {wanted}, written by ShockMonitor to a"
            " TensorBoardLogger"
        )
    return [_load_prefix(run, acc, tags, p, files, list(warnings)) for p in prefixes]


def _load_prefix(
    run: Path, acc: Any, tags: dict[str, Any], p: str, files: list[Path], warnings: list[str]
) -> RunData:
    scalars = [t for t in tags.get("scalars", []) if t.startswith(f"{p}/")]
    events: list[ShockEvent] = []
    for _, text in _text(acc, f"{p}/alert_text"):
        events.extend(parse_alerts(text))
    events = sorted(dict.fromkeys(events), key=lambda e: (e.step, e.group))  # a re-logged table: once
    consistency = (
        _series(acc, f"{p}/burgers_consistency")
        if f"{p}/burgers_consistency" in scalars
        else (np.zeros(0, dtype=np.int64), np.zeros(0))
    )
    forecasts = {
        t[len(f"{p}/forecast/") :]: _series(acc, t) for t in scalars if t.startswith(f"{p}/forecast/")
    }
    states = {}
    for t in scalars:
        if t.startswith(f"{p}/state/"):
            s, v = _series(acc, t)
            states[t[len(f"{p}/state/") :]] = float(v[-1]) if v.size else math.nan
    steps = [int(e.step) for t in scalars for e in acc.Scalars(t)]
    symmetry = _text(acc, f"{p}/symmetry_report")
    sym = symmetry[-1][1] if symmetry else None
    if sym is not None:
        sym = sym.replace("```\n", "").replace("\n```", "").strip()
    return RunData(
        run=run,
        prefix=p,
        event_files=files,
        events=events,
        consistency=consistency,
        forecasts=forecasts,
        states=states,
        symmetry=sym,
        particles=snapshots.read(acc, p),
        norms=_norm_panels(scalars, p, acc),
        steps=(min(steps), max(steps)) if steps else None,
        warnings=warnings,
    )


# ------------------------------------------------------------------------------------------------ plots
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def write_plots(data: RunData, out: str | Path) -> list[Path]:
    """Write the run's PNGs into ``out`` (created): ``characteristics_<group>.png`` per alerted group with
    snapshots, ``forecast.png``, ``norms.png`` (``norms_2.png``... beyond :data:`shockmon.plots.NORMS_PANELS`
    layers). Without matplotlib: none, and a warning in ``data.warnings``."""
    if importlib.util.find_spec("matplotlib") is None:
        data.warnings.append("matplotlib is not installed: no plots written (pip install 'shockmon[plot]')")
        return []
    from shockmon import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for g in data.alerted_groups:
        if g in data.particles:
            fig = plots.characteristic_figure(data.particles[g], [e for e in data.events if e.group == g])
            written.append(plots.save(fig, out / f"characteristics_{_safe(g)}.png"))
        elif g != "trajectory":  # the trajectory view has no particles
            data.warnings.append(
                f"no particle snapshots for alerted group {g!r} ({data.prefix}/particles/{g}; written by"
                " ShockMonitor with snapshot_units > 0): no characteristic diagram"
            )
    if data.forecasts or data.consistency[0].size:
        fig = plots.forecast_figure(data.forecasts, data.consistency, data.events)
        written.append(plots.save(fig, out / "forecast.png"))
    for i, fig in enumerate(plots.norms_figures(data.norms)):
        written.append(plots.save(fig, out / ("norms.png" if i == 0 else f"norms_{i + 1}.png")))
    data.plots.extend(written)
    return written


def report(
    path: str | Path, out: str | Path | None = None, prefix: str | None = None, plots: bool = True
) -> tuple[list[RunData], list[str]]:
    """Read every run at or under ``path`` and write its plots under ``out``.

    With several runs, each gets ``out/<its path relative to path>/``; a run that cannot be reported is
    skipped with a warning (the second list), unless none can.

    Raises:
        ReportError: bad ``path``, or no run could be reported.
    """
    root = Path(path)
    runs = find_runs(root)
    results: list[RunData] = []
    skipped: list[str] = []
    for run in runs:
        try:
            loaded = load_run(run, prefix)
        except ReportError as err:
            if len(runs) == 1:
                raise
            skipped.append(f"skipped {str(run)!r}: {err}")
            continue
        for data in loaded:
            if plots and out is not None:
                target = Path(out)
                rel = run.relative_to(root)
                if len(runs) > 1 and str(rel) != ".":
                    target = target / rel
                if len(loaded) > 1:
                    target = target / _safe(data.prefix)
                write_plots(data, target)
            results.append(data)
    if not results:
        raise ReportError(f"none of the {len(runs)} runs under {str(root)!r} could be reported: {skipped[0]}")
    return results, skipped
