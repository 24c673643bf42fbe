"""What TensorBoard gets beyond scalars: alert text, per-unit histograms and a custom-scalars layout.

Scalars go through Lightning's logger API (every logger gets them); this module only formats the
TensorBoard-specific extras and finds the TensorBoard writers among a Trainer's loggers. It imports nothing
from TensorBoard itself: the writers come from Lightning's ``TensorBoardLogger.experiment``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from shockmon.events import ShockEvent

_REGEX_SPECIALS = set(".^$*+?{}[]()|\\")


def regex_escape(text: str) -> str:
    """Escape ``text`` for the custom-scalars plugin's regular expressions (valid in Python and JavaScript).

    Example:
        >>> regex_escape("mlp.0")
        'mlp\\\\.0'
    """
    return "".join("\\" + c if c in _REGEX_SPECIALS else c for c in text)


def tensorboard_writers(loggers: Iterable[Any]) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger in ``loggers`` (Lightning's or Fabric's)."""
    from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
    from lightning.pytorch.loggers import TensorBoardLogger

    writers = []
    for logger in loggers:
        if isinstance(logger, (TensorBoardLogger, FabricTensorBoardLogger)):
            writer = logger.experiment
            # a DummyExperiment on non-zero ranks has no such method worth calling
            if hasattr(writer, "add_text"):
                writers.append(writer)
    return writers


def _fmt_step(x: float) -> str:
    return f"{x:.0f}" if math.isfinite(x) else "—"


def alerts_markdown(events: Sequence[ShockEvent]) -> str:
    """A markdown table of ``events``: what, where, when, the forecast shock step, the lead and the strength;
    then the events exactly, as JSON in an HTML comment (TensorBoard's renderer drops comments; ``shockmon
    report`` reads them, so its numbers are not the table's rounded ones).

    Example:
        >>> from shockmon.events import EventKind
        >>> event = ShockEvent(EventKind.FORECAST, "mlp.0", "particle", 120, 180.25, 4.2, (3, 17))
        >>> print(alerts_markdown([event]))
        | step | kind | group | view | forecast shock step | lead (steps) | strength | units |
        | ---: | --- | --- | --- | ---: | ---: | ---: | --- |
        | 120 | **forecast** | `mlp.0` | particle | 180 | 60 | 4.20 | 3, 17 |
        <!-- shockmon-events [[120, "forecast", "mlp.0", "particle", 180.25, 4.2, [3, 17]]] -->
    """
    lines = [
        "| step | kind | group | view | forecast shock step | lead (steps) | strength | units |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for e in events:
        units = ", ".join(str(u) for u in e.units[:16]) + (" …" if len(e.units) > 16 else "")
        lines.append(
            f"| {e.step} | **{e.kind.value}** | `{e.group}` | {e.channel} | {_fmt_step(e.predicted_step)} "
            f"| {_fmt_step(e.lead)} | {e.strength:.2f} | {units} |"
        )
    exact = [
        [
            e.step,
            e.kind.value,
            e.group,
            e.channel,
            _finite_or_none(e.predicted_step),
            _finite_or_none(e.strength),
            list(e.units),
        ]
        for e in events
    ]
    # ">" appears in JSON only inside strings: escaped, a group name cannot close the comment early
    lines.append(f"{EVENTS_COMMENT} {json.dumps(exact).replace('>', chr(92) + 'u003e')} -->")
    return "\n".join(lines)


#: how :func:`alerts_markdown` opens the comment that carries the events exactly
EVENTS_COMMENT = "<!-- shockmon-events"


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def report_markdown(report: Any) -> str:
    """The symmetry report as markdown (a code block keeps its table aligned)."""
    text = "```\n" + str(report) + "\n```"
    warnings = list(getattr(report, "warnings", []) or [])
    if warnings:
        text += "\n\n" + "\n".join(f"- {w}" for w in warnings)
    return text


def _module_path(tag: str, prefix: str) -> str | None:
    """The module of a ``<prefix>/quotient/<family>/<module>/<name>`` tag (``None`` for other tags)."""
    parts = tag[len(prefix) + 1 :].split("/")
    if parts[0] == "quotient" and len(parts) >= 4:
        return parts[2]
    return None


def custom_scalars_layout(tags: Iterable[str], groups: Iterable[str], prefix: str = "shockmon") -> dict[str, Any]:
    """The custom-scalars layout: each module's quotient observables beside their raw counterparts, each
    group's forecast beside its alerts, and the tracker's global signals.

    Args:
        tags: the scalar tags that are logged (with ``prefix``).
        groups: the tracker's groups.
        prefix: the tag prefix.

    Returns:
        ``{category: {chart title: ["Multiline", [regex, ...]]}}``, as ``SummaryWriter.add_custom_scalars``
        takes it.

    Example:
        >>> lay = custom_scalars_layout(
        ...     ["shockmon/quotient/rescale/mlp.0/path_mass_max", "shockmon/raw/mlp.0.weight"],
        ...     ["rescale/mlp.0"],
        ... )
        >>> lay["shockmon: quotient vs raw"]["mlp.0"]
        ['Multiline', ['^shockmon/quotient/[^/]+/mlp\\\\.0/', '^shockmon/raw/mlp\\\\.0[./]']]
        >>> lay["shockmon: forecasts and alerts"]["rescale/mlp.0"][1][0]
        '^shockmon/forecast/rescale/mlp\\\\.0$'
    """
    p = regex_escape(prefix)
    tags = list(tags)
    paths = dict.fromkeys(m for m in (_module_path(t, prefix) for t in tags) if m is not None)
    # A module's raw tags: ``raw/<module>/<name>`` and its parameters' ``raw/<module>.<param>``.
    quotient_vs_raw = {
        path: [
            "Multiline",
            [f"^{p}/quotient/[^/]+/{regex_escape(path)}/", f"^{p}/raw/{regex_escape(path)}[./]"],
        ]
        for path in paths
    }
    if not quotient_vs_raw and any(t.startswith(f"{prefix}/raw/") for t in tags):
        quotient_vs_raw["raw (no symmetry found)"] = ["Multiline", [f"^{p}/raw/"]]
    forecasts = {}
    for g in groups:
        e = regex_escape(g)
        forecasts[g] = ["Multiline", [f"^{p}/forecast/{e}$", f"^{p}/alerts/{e}$", f"^{p}/state/{e}$"]]
    tracker = {
        "steps to shock, shock, alerts": [
            "Multiline",
            [f"^{p}/steps_to_shock$", f"^{p}/shock$", f"^{p}/alerts$"],
        ],
        "viscosity": ["Multiline", [f"^{p}/viscosity/"]],
        "step-length growth": ["Multiline", [f"^{p}/growth/"]],
        "Burgers consistency": ["Multiline", [f"^{p}/burgers_consistency$"]],
    }
    if any(t.startswith(f"{prefix}/dynamics/") for t in tags):
        tracker["dynamics"] = ["Multiline", [f"^{p}/dynamics/"]]
    layout: dict[str, Any] = {}
    if quotient_vs_raw:
        layout[f"{prefix}: quotient vs raw"] = quotient_vs_raw
    if forecasts:
        layout[f"{prefix}: forecasts and alerts"] = forecasts
    layout[f"{prefix}: tracker"] = tracker
    return layout
