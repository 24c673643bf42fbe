"""Read a ShockMonitor run back from its TensorBoard event files: ``shockmon report``.

Example::

    >>> from shockmon.report import report, to_text
    >>> results, skipped = report("lightning_logs", out="shockmon_report")  # doctest: +SKIP
    >>> print(to_text(results))  # doctest: +SKIP
"""

from __future__ import annotations

from shockmon.report.read import (
    ReportError,
    RunData,
    check_event_file,
    find_runs,
    load_run,
    parse_alerts,
    report,
    write_plots,
)
from shockmon.report.render import FORMATS, to_json, to_markdown, to_text

__all__ = [
    "FORMATS",
    "ReportError",
    "RunData",
    "check_event_file",
    "find_runs",
    "load_run",
    "parse_alerts",
    "report",
    "to_json",
    "to_markdown",
    "to_text",
    "write_plots",
]
