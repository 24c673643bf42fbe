"""One figure per case: the training curve, the case's transition metric, the transition and every detector's
alerts (shockmon's with their forecast steps)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.detection.cases import Case
from benchmarks.detection.record import Recording

METRIC = ("test_acc", "sharpness", "directions", "heldout")


def case_figure(rec: Recording, case: Case, transitions: list[int], alerts: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7.5, 6.4), sharex=True,
                             gridspec_kw={"height_ratios": [2, 1.4, 1.6]})
    ax0, ax1, ax2 = axes
    loss = np.where(rec.loss > 0, rec.loss, np.nan)
    ax0.semilogy(rec.steps, loss, lw=0.8, color="k", label="training loss")
    ax0.set_ylabel("loss")
    metric = next((m for m in METRIC if m in rec.evals), None)
    if metric is not None:
        ax1.plot(rec.eval_steps, rec.evals[metric], lw=0.9, color="tab:blue")
        ax1.set_ylabel(metric)
        if metric == "sharpness" and "eta" in rec.config:
            ax1.axhline(2.0 / rec.config["eta"], ls=":", color="tab:blue", lw=0.8)
    for ax in (ax0, ax1):
        for t in transitions:
            ax.axvline(t, color="tab:red", lw=1.0)
            if case.window:
                ax.axvspan(t - case.window, t, color="tab:red", alpha=0.08, lw=0)
    names = list(alerts)
    for i, det in enumerate(names):
        a = alerts[det]
        y = len(names) - 1 - i
        ax2.scatter(a.alerts, [y] * len(a.alerts), s=14, marker="|", color="tab:green" if i == 0 else "0.3")
        if a.predicted:
            for s_, p in zip(a.alerts, a.predicted):
                if math.isfinite(p):
                    ax2.annotate("", xy=(p, y + 0.3), xytext=(s_, y + 0.3),
                                 arrowprops={"arrowstyle": "->", "color": "tab:green", "lw": 0.7})
    for t in transitions:
        ax2.axvline(t, color="tab:red", lw=1.0)
    ax2.set_yticks(range(len(names)))
    ax2.set_yticklabels(names[::-1], fontsize=7)
    ax2.set_ylim(-0.7, len(names) - 0.2)
    ax2.set_xlabel("step")
    ax0.set_title(f"{case.name} (seed {rec.seed}): transition(s) in red, warning window shaded; "
                  "shockmon arrows: forecast step", fontsize=8)
    ax2.set_xlim(0, float(rec.steps[-1]) if len(rec.steps) else 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
