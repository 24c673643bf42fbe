"""Figures of a run read back: characteristic diagrams, forecasts over time, quotient vs raw norms per layer.

matplotlib (the ``[plot]`` extra) is imported inside the functions, never at import time. Figures are built
on their own Agg canvas, without ``pyplot``: nothing here selects or changes the user's backend. Sizes are
fixed in pixels (``DPI`` dots per inch, no tight bounding box), so a saved PNG has a known size:

=======================  ===========================================================
figure                   size (width × height, pixels)
=======================  ===========================================================
characteristic diagram   ``CHARACTERISTIC_SIZE`` = 900 × 550
forecast and consistency ``FORECAST_SIZE`` = 900 × 650
quotient vs raw norms    ``NORMS_WIDTH`` × ``NORMS_ROW_HEIGHT``·rows = 1200 × 320·rows (up to 3 panels a row)
=======================  ===========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shockmon.events import EventKind, ShockEvent

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from shockmon.callbacks.snapshots import Particles

DPI = 100
CHARACTERISTIC_SIZE = (900, 550)
FORECAST_SIZE = (900, 650)
NORMS_WIDTH, NORMS_ROW_HEIGHT, NORMS_COLUMNS = 1200, 320, 3
#: at most this many panels in one quotient-vs-raw figure; more layers make more figures
NORMS_PANELS = 12
Series = tuple[np.ndarray, np.ndarray]  # (steps, values)


def figure(width: int, height: int) -> Figure:
    """An empty figure of ``width`` × ``height`` pixels on an Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at its own pixel size; returns the path."""
    path = Path(path)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def coordinate_label(group: str) -> str:
    """What coordinate 0 of a group's units is, for an axis label.

    Example:
        >>> coordinate_label("rescale/mlp.0")
        '¼ log path mass'
    """
    family = group.split("/", 1)[0]
    return {
        "rescale": "¼ log path mass",
        "permute": "¼ log path mass",
        "attention": "½ log Σσ² of W_Q W_Kᵀ (per head)",
        "normscale": "row direction (coordinate 0)",
    }.get(family, "coordinate 0")


#: events drawn as a marker: kind -> (marker, colour, legend label)
_MARKERS = {
    EventKind.INSTABILITY: ("v", "tab:purple", "instability"),
    EventKind.FORECAST: ("^", "tab:orange", "forecast fired"),
}


def _mark_events(ax: Any, events: Sequence[ShockEvent], lo: float, hi: float) -> list[Any]:
    """Shocks as red lines, divergences as black dotted lines, instabilities as a purple down-triangle,
    forecasts as a triangle at the step they fired and an orange dashed line at the step they predicted. Returns
    legend handles."""
    from matplotlib.lines import Line2D

    handles: dict[str, Any] = {}
    predicted: set[int] = set()
    for e in events:
        if e.kind is EventKind.SHOCK:
            ax.axvline(e.step, color="tab:red", lw=2.0, alpha=0.85, zorder=3)
            handles["shock"] = Line2D([], [], color="tab:red", lw=2.0, label="shock")
        elif e.kind is EventKind.DIVERGENCE:
            ax.axvline(e.step, color="black", lw=1.5, ls=":", zorder=3)
            handles["divergence"] = Line2D([], [], color="black", lw=1.5, ls=":", label="divergence")
        elif e.kind in _MARKERS:  # a marker at the step it fired, at the bottom of the axes
            marker, color, label = _MARKERS[e.kind]
            ax.plot(
                [e.step], [0.03], marker=marker, color=color, ms=9, transform=ax.get_xaxis_transform(), clip_on=False,
                zorder=4,
            )
            handles[label] = Line2D([], [], color=color, marker=marker, ls="", ms=9, label=label)
        if e.kind is EventKind.FORECAST:
            p = e.predicted_step
            if math.isfinite(p) and lo <= p <= hi and round(p) not in predicted and len(predicted) < 20:
                predicted.add(round(p))
                ax.axvline(p, color="tab:orange", lw=1.2, ls="--", alpha=0.8, zorder=2)
                handles["predicted"] = Line2D(
                    [], [], color="tab:orange", lw=1.2, ls="--", label="predicted shock step"
                )
    return list(handles.values())


def characteristic_figure(particles: Particles, events: Sequence[ShockEvent] = ()) -> Figure:
    """The characteristic diagram of a group: each snapshot unit's coordinate 0 against the step, coloured by
    unit index, with the group's events marked. Converging lines that cross are the shock.

    Args:
        particles: the group's snapshots (:func:`shockmon.callbacks.snapshots.read`).
        events: events to mark (normally the group's own).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = figure(*CHARACTERISTIC_SIZE)
    ax = fig.add_subplot()
    steps, units, values = particles.steps, particles.units, particles.values
    cmap = colormaps["viridis"]
    norm = Normalize(0, max(particles.num_units - 1, 1))
    for j, u in enumerate(units):
        ax.plot(steps, values[:, j], color=cmap(norm(u)), lw=1.3, alpha=0.9)
    lo, hi = float(steps[0]), float(steps[-1])
    span = max(hi - lo, 1.0)
    handles = _mark_events(ax, events, lo - 0.02 * span, hi + 0.25 * span)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=9, framealpha=0.85)
    ax.set_xlabel("step")
    ax.set_ylabel(coordinate_label(particles.group))
    shown = (
        f"{units.size} of {particles.num_units} units"
        if units.size < particles.num_units
        else (f"{units.size} units")
    )
    ax.set_title(f"Characteristics of {particles.group} ({shown})")
    ax.grid(alpha=0.25)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="unit (module order)", pad=0.02)
    return fig


def forecast_figure(
    forecasts: Mapping[str, Series], consistency: Series | None, events: Sequence[ShockEvent] = ()
) -> Figure:
    """Steps to the forecast shock per group over time (gaps: no forecast), with events marked; below it the
    Burgers-consistency figure."""
    fig = figure(*FORECAST_SIZE)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    lo, hi = math.inf, -math.inf
    for group, (steps, values) in forecasts.items():
        v = np.where(np.isfinite(values), values, np.nan)
        top.plot(steps, v, marker=".", ms=4, lw=1.3, label=group if np.isfinite(v).any() else None)
        if steps.size:
            lo, hi = min(lo, float(steps[0])), max(hi, float(steps[-1]))
    if not math.isfinite(lo):
        lo, hi = 0.0, 1.0
    handles = _mark_events(top, [e for e in events if e.kind is not EventKind.FORECAST], lo, hi)
    lines, _ = top.get_legend_handles_labels()
    if lines or handles:
        top.legend(handles=[*lines, *handles], fontsize=8, loc="best", framealpha=0.85)
    top.set_ylabel("steps to shock")
    top.set_title("Forecast (steps until the predicted shock; gaps: none within the horizon)")
    top.grid(alpha=0.25)
    if consistency is not None and consistency[0].size:
        bottom.plot(consistency[0], consistency[1], color="tab:purple", marker=".", ms=4, lw=1.3)
    else:
        bottom.text(
            0.5,
            0.5,
            "no Burgers-consistency values logged",
            ha="center",
            va="center",
            transform=bottom.transAxes,
        )
    bottom.set_ylabel("Burgers consistency")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.25)
    return fig


def _relative(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values) & (values != 0)]
    return values / finite[0] if finite.size else np.full_like(values, np.nan)


def norms_figures(panels: Mapping[str, Mapping[str, Series]]) -> list[Figure]:
    """Quotient vs raw norms, one panel per layer, each series relative to its first logged value (quotient
    solid, raw dashed): raw norms drift along symmetry orbits where the quotient ones hold.

    Args:
        panels: ``layer -> {name: (steps, values)}``; names start with ``quotient/`` or ``raw/``.

    Returns:
        One figure per :data:`NORMS_PANELS` layers.
    """
    layers = list(panels)
    out = []
    for start in range(0, len(layers), NORMS_PANELS):
        chunk = layers[start : start + NORMS_PANELS]
        columns = min(NORMS_COLUMNS, len(chunk))
        rows = math.ceil(len(chunk) / columns)
        fig = figure(NORMS_WIDTH, NORMS_ROW_HEIGHT * rows)
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        for ax, layer in zip(axes, chunk):
            for name, (steps, values) in panels[layer].items():
                raw = name.startswith("raw/")
                label = name.split("/", 1)[1]
                rel = _relative(values)
                ax.plot(
                    steps,
                    rel,
                    ls="--" if raw else "-",
                    lw=1.2 if raw else 1.6,
                    label=(("raw " if raw else "") + label) if np.isfinite(rel).any() else None,
                )
            ax.set_title(layer, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel("relative to first value", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.25)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best", framealpha=0.8)
        for ax in axes[len(chunk) :]:
            ax.set_visible(False)
        fig.suptitle("Quotient (solid) vs raw (dashed) norms per layer", fontsize=11)
        out.append(fig)
    return out
