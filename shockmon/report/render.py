"""A run read back (:class:`~shockmon.report.read.RunData`) as text, markdown or JSON."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shockmon.report.read import RunData

FORMATS = ("text", "json", "markdown")
_SPARK = "▁▂▃▄▅▆▇█"
#: at most this many rows of the Burgers-consistency table (evenly spaced, the last included)
CONSISTENCY_ROWS = 12
STATES = {0: "before", 1: "imminent", 2: "in shock"}


def _num(x: float, digits: int = 2) -> str:
    if not math.isfinite(x):
        return "—" if math.isinf(x) else "nan"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def _step(x: float) -> str:
    return f"{x:.0f}" if math.isfinite(x) else "—"


def _json_num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def sparkline(values: np.ndarray, width: int = 60) -> str:
    """Values as a row of block characters scaled to their finite range (blank: not finite).

    Example:
        >>> sparkline(np.array([0.0, 1.0, 2.0, float("nan"), 3.0]))
        '▁▃▆ █'
    """
    if values.size > width:
        values = values[np.linspace(0, values.size - 1, width).round().astype(int)]
    finite = values[np.isfinite(values)]
    if not finite.size:
        return " " * values.size
    lo, hi = float(finite.min()), float(finite.max())
    scale = (len(_SPARK) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join(_SPARK[int(round((v - lo) * scale))] if math.isfinite(v) else " " for v in values)


def _rows(n: int, most: int) -> list[int]:
    return list(range(n)) if n <= most else sorted(set(np.linspace(0, n - 1, most).round().astype(int)))


def _name(data: RunData, root: Path | None) -> str:
    if root is not None:
        try:
            rel = data.run.resolve().relative_to(root.resolve())
            return str(Path(root) / rel) if str(rel) != "." else str(root)
        except ValueError:
            pass
    return str(data.run)


def _table(header: Sequence[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return [line(header).rstrip(), *(line(r).rstrip() for r in rows)]


def _event_rows(data: RunData) -> list[list[str]]:
    rows = []
    for e in data.events:
        units = ", ".join(str(u) for u in e.units[:8]) + (" …" if len(e.units) > 8 else "")
        rows.append(
            [
                e.kind.value,
                e.group,
                e.channel,
                str(e.step),
                _step(e.predicted_step),
                _step(e.lead),
                _num(e.strength),
                units,
            ]
        )
    return rows


_EVENT_HEADER = ("kind", "group", "view", "step", "forecast", "lead", "strength", "units")
_EVENT_RIGHT = {3, 4, 5, 6}


def _group_rows(data: RunData) -> list[list[str]]:
    rows = []
    counts: dict[str, int] = {}
    for e in data.events:
        counts[e.group] = counts.get(e.group, 0) + 1
    for g in dict.fromkeys([*data.forecasts, *counts]):
        f = data.forecasts.get(g)
        last = _num(float(f[1][-1]), 0) if f is not None and f[1].size else "—"
        state = data.states.get(g, math.nan)
        st = f"{state:.0f} ({STATES.get(int(state), '?')})" if math.isfinite(state) else "—"
        snap = data.particles.get(g)
        rows.append([g, str(counts.get(g, 0)), last, st, f"{snap.units.size}" if snap is not None else "—"])
    return rows


_GROUP_HEADER = ("group", "alerts", "steps to shock (last)", "state (last)", "units in snapshots")


def _consistency_lines(data: RunData) -> list[str]:
    steps, values = data.consistency
    if not steps.size:
        return ["  (no <prefix>/burgers_consistency scalars)"]
    finite = values[np.isfinite(values)]
    head = f"  {steps.size} log steps, {steps.size - finite.size} not finite"
    if finite.size:
        lo, hi, last = _num(float(finite.min())), _num(float(finite.max())), _num(float(values[-1]))
        head += f"; range {lo} … {hi}, last {last}"
    rows = [[str(steps[i]), _num(float(values[i]), 3)] for i in _rows(steps.size, CONSISTENCY_ROWS)]
    return [head, f"  {sparkline(values)}", *("  " + ln for ln in _table(("step", "value"), rows, {0, 1}))]


def to_text(results: Sequence[RunData], root: Path | None = None) -> str:
    """The plain-text report of every run (tables aligned for a terminal)."""
    out: list[str] = []
    for data in results:
        span = f"steps {data.steps[0]}–{data.steps[1]}" if data.steps else "no steps"
        out.append(
            f"== {_name(data, root)} (prefix {data.prefix}): {span}, {len(data.event_files)} event file(s)"
        )
        out.append("")
        out.append(f"Events ({len(data.events)})")
        if data.events:
            out.extend("  " + ln for ln in _table(_EVENT_HEADER, _event_rows(data), _EVENT_RIGHT))
        else:
            out.append("  (none)")
        out.extend(["", "Groups"])
        out.extend("  " + ln for ln in _table(_GROUP_HEADER, _group_rows(data), {1, 2, 4}))
        out.extend(["", "Burgers consistency over time", *_consistency_lines(data), "", "Symmetry summary"])
        out.extend("  " + ln for ln in (data.symmetry or "(no <prefix>/symmetry_report text)").splitlines())
        if data.plots:
            out.extend(["", "Plots", *(f"  {p}" for p in data.plots)])
        out.append("")
    return "\n".join(out)


def _md_table(header: Sequence[str], rows: list[list[str]], right: set[int]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    sep = ["---:" if i in right else "---" for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"| {' | '.join(sep)} |", *(f"| {' | '.join(r)} |" for r in esc)]


def to_markdown(results: Sequence[RunData], root: Path | None = None, out_dir: Path | None = None) -> str:
    """The report as markdown; images are linked relative to ``out_dir`` when given."""
    out: list[str] = []
    for data in results:
        span = f"steps {data.steps[0]}–{data.steps[1]}" if data.steps else "no steps"
        out += [
            f"## `{_name(data, root)}` (prefix `{data.prefix}`)",
            "",
            f"{span} · {len(data.event_files)} event file(s)",
            "",
            f"### Events ({len(data.events)})",
            "",
        ]
        out += _md_table(_EVENT_HEADER, _event_rows(data), _EVENT_RIGHT) if data.events else ["(none)"]
        out += ["", "### Groups", "", *_md_table(_GROUP_HEADER, _group_rows(data), {1, 2, 4})]
        steps, values = data.consistency
        out += ["", "### Burgers consistency", ""]
        if steps.size:
            out += [f"`{sparkline(values)}`", ""]
            rows = [[str(steps[i]), _num(float(values[i]), 3)] for i in _rows(steps.size, CONSISTENCY_ROWS)]
            out += _md_table(("step", "value"), rows, {0, 1})
        else:
            out.append("(none logged)")
        out += ["", "### Symmetry summary", "", "```", data.symmetry or "(none logged)", "```"]
        if data.plots:
            out += ["", "### Plots", ""]
            for p in data.plots:
                link = os.path.relpath(p, out_dir) if out_dir is not None else str(p)
                out.append(f"![{p.stem}]({link})")
        if data.warnings:
            out += ["", "### Warnings", "", *(f"- {w}" for w in data.warnings)]
        out.append("")
    return "\n".join(out)


def to_json(
    results: Sequence[RunData], skipped: Sequence[str] = (), root: Path | None = None
) -> dict[str, Any]:
    """The report as a JSON-friendly dict (``inf`` and ``nan`` become ``null``)."""
    runs = []
    for data in results:
        counts: dict[str, int] = {}
        for e in data.events:
            counts[e.group] = counts.get(e.group, 0) + 1
        groups = {}
        for g in dict.fromkeys([*data.forecasts, *counts]):
            f = data.forecasts.get(g)
            snap = data.particles.get(g)
            groups[g] = {
                "alerts": counts.get(g, 0),
                "steps_to_shock": [[int(s), _json_num(float(v))] for s, v in zip(*f)]
                if f is not None
                else [],
                "state": _json_num(data.states.get(g, math.nan)),
                "snapshot_units": snap.units.tolist() if snap is not None else [],
            }
        runs.append(
            {
                "run": _name(data, root),
                "path": str(data.run.resolve()),
                "prefix": data.prefix,
                "event_files": [str(p) for p in data.event_files],
                "steps": list(data.steps) if data.steps else None,
                "events": [
                    {
                        "kind": e.kind.value,
                        "group": e.group,
                        "view": e.channel,
                        "step": e.step,
                        "forecast": _json_num(e.predicted_step),
                        "lead": _json_num(e.lead),
                        "strength": _json_num(e.strength),
                        "units": list(e.units),
                    }
                    for e in data.events
                ],
                "groups": groups,
                "burgers_consistency": [[int(s), _json_num(float(v))] for s, v in zip(*data.consistency)],
                "symmetry": data.symmetry,
                "plots": [str(p) for p in data.plots],
                "warnings": list(data.warnings),
            }
        )
    return {"runs": runs, "skipped": list(skipped)}
