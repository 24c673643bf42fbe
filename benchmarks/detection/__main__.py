"""``python -m benchmarks.detection``: the detection benchmark (see ``benchmarks/detection/__init__.py``).

Usage::

    python -m benchmarks.detection                      # full: every case, seeds 0-5, fresh runs
    python -m benchmarks.detection --quick --out /tmp/d   # one seed, shortened runs: checks the pipeline only
    python -m benchmarks.detection --replay             # reuse cached recordings, re-run only the tracker
    python -m benchmarks.detection --replay --every-n-steps 4   # ... as ShockMonitor(every_n_steps=4) would see them
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.detection import baselines as bl
from benchmarks.detection import scoring as sc
from benchmarks.detection.cases import Case, all_cases
from benchmarks.detection.record import Recording, replay, run_case

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(__file__).resolve().parent / ".cache"
SHOCKMON = "shockmon"
DETECTORS = (SHOCKMON, *bl.LABEL_FREE, *bl.REFERENCE)
CACHE_VERSION = 1
MAX_ALERTS = 50  # per detector and run in the JSON (counts are complete)


def _cache_path(cache: Path, case: str, seed: int, quick: bool) -> Path:
    return cache / f"v{CACHE_VERSION}{'_quick' if quick else ''}" / f"{case}_s{seed}.npz"


def get_recording(case: Case, seed: int, quick: bool, cache: Path, fresh: bool, log: Any) -> Recording:
    path = _cache_path(cache, case.name, seed, quick)
    if not fresh and path.exists():
        return Recording.load(path)
    t = time.perf_counter()
    rec = run_case(case.name, seed, case.build(seed, quick))
    rec.save(path)
    log(f"  ran {case.name} seed {seed}: {len(rec.steps)} steps, {rec.cpu_seconds:.1f} s CPU "
        f"({time.perf_counter() - t:.1f} s wall), transitions {case.transitions(rec)}, "
        f"{len(rec.events)} shockmon events")
    return rec


def shockmon_alerts(
    rec: Recording, use_replay: bool, every_n_steps: int = 1
) -> tuple[list[dict[str, Any]], list[int], list[float]]:
    events = replay(rec, every_n_steps=every_n_steps) if use_replay else rec.events
    steps = [int(e["step"]) for e in events]
    pred = [float(e["predicted_step"]) if math.isfinite(float(e["predicted_step"])) else math.nan for e in events]
    return events, steps, pred


def _fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.detection", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, shortened runs: checks the pipeline only")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0-5; quick: 0)")
    ap.add_argument("--select-seeds", type=int, nargs="+", default=None,
                    help="seeds on which thresholds are chosen (default 0-2; quick: the one seed)")
    ap.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output directory")
    ap.add_argument("--name", default=None, help="output file stem (default detection, quick: detection_quick)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="recordings cache (git-ignored)")
    ap.add_argument("--cached", action="store_true",
                    help="reuse cached recordings (run the missing ones) with the events their live monitor gave")
    ap.add_argument("--replay", action="store_true",
                    help="reuse cached recordings (run the missing ones) and re-run the current tracker on them")
    ap.add_argument("--every-n-steps", type=int, default=1,
                    help="with --replay: feed the tracker every this many steps, as ShockMonitor(every_n_steps=...)"
                         " would observe them (the baselines still see every step)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--check-replay", action="store_true",
                    help="check that replaying each recording gives the live monitor's events (on in --quick)")
    args = ap.parse_args(argv)
    if args.every_n_steps < 1:
        ap.error(f"--every-n-steps must be >= 1, got {args.every_n_steps}")
    if args.every_n_steps > 1 and not args.replay:
        ap.error("--every-n-steps needs --replay (the recordings are made at every step)")

    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cases = all_cases()
    names = [c.name for c in cases]
    if args.cases:
        bad = [c for c in args.cases if c not in names]
        if bad:
            ap.error(f"unknown case(s) {bad}; choose from {names}")
        cases = [c for c in cases if c.name in args.cases]
    else:
        cases = [c for c in cases if c.default]
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(range(6)))
    select = args.select_seeds if args.select_seeds is not None else ([seeds[0]] if args.quick else [0, 1, 2])
    report = [s for s in seeds if s not in select] or list(select)
    stem = args.name or ("detection_quick" if args.quick else "detection")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cpu0 = time.process_time()
    runs: dict[tuple[str, int], Recording] = {}
    for case in cases:
        for seed in sorted(set(seeds) | set(select)):
            runs[(case.name, seed)] = get_recording(case, seed, args.quick, args.cache,
                                                      not (args.replay or args.cached), log)
    train_cpu = sum(r.cpu_seconds for r in runs.values())

    # ---- alerts of every detector on every run
    by_case = {c.name: c for c in cases}
    transitions = {k: by_case[k[0]].transitions(r) for k, r in runs.items()}

    def run_alerts(key: tuple[str, int], alerts: list[int], pred: list[float] | None = None) -> sc.RunAlerts:
        c, r = by_case[key[0]], runs[key]
        return sc.RunAlerts(c.name, key[1], c.control, transitions[key], c.window, int(len(r.steps)), alerts,
                            pred or [])

    sm_events: dict[tuple[str, int], list[dict[str, Any]]] = {}
    alerts: dict[str, dict[tuple[str, int], sc.RunAlerts]] = {SHOCKMON: {}}
    for key, rec in runs.items():
        ev, st, pr = shockmon_alerts(rec, args.replay, args.every_n_steps)
        sm_events[key] = ev
        alerts[SHOCKMON][key] = run_alerts(key, st, pr)
    replay_ok = None
    if args.check_replay or args.quick:
        replay_ok = all(replay(rec) == rec.events for rec in runs.values())
    thresholds: dict[str, float | None] = {SHOCKMON: None}
    for det in (*bl.LABEL_FREE, *bl.REFERENCE):
        cand = {th: {k: run_alerts(k, bl.detect(det, r, th)) for k, r in runs.items()} for th in bl.GRIDS[det]}
        th = sc.choose({t: [a for k, a in d.items() if k[1] in select] for t, d in cand.items()})
        thresholds[det] = th
        alerts[det] = cand[th]

    # ---- scores on the report seeds
    results: dict[str, Any] = {}
    for det in DETECTORS:
        rep = [a for k, a in alerts[det].items() if k[1] in report]
        sel = [a for k, a in alerts[det].items() if k[1] in select]
        per_case = {c.name: sc.score([a for a in rep if a.case == c.name]).row() for c in cases}
        results[det] = {
            "threshold": thresholds[det],
            "report": sc.score(rep).row(),
            "selection": sc.score(sel).row(),
            "per_case": per_case,
        }
    doc = {
        "command": "python -m benchmarks.detection" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                        if (argv if argv is not None else sys.argv[1:]) else ""),
        "quick": args.quick,
        "seeds": seeds,
        "selection_seeds": select,
        "report_seeds": report,
        "replay": args.replay,
        "every_n_steps": args.every_n_steps,
        "cached": args.cached,
        "replay_matches_live": replay_ok,
        "torch": torch.__version__,
        "cases": [{"name": c.name, "family": c.family, "window": c.window, "rule": c.rule, "control": c.control}
                  for c in cases],
        "threshold_grids": bl.GRIDS,
        "results": results,
        "runs": [
            {
                "case": k[0], "seed": k[1], "steps": int(len(r.steps)), "transitions": transitions[k],
                "cpu_seconds": r.cpu_seconds, "wall_seconds": r.wall_seconds, "config": r.config,
                "shockmon_events": sm_events[k],
                "alerts": {d: alerts[d][k].alerts[:MAX_ALERTS] for d in DETECTORS},
                "alert_counts": {d: len(alerts[d][k].alerts) for d in DETECTORS},
            }
            for k, r in runs.items()
        ],
        "cpu_seconds_training": train_cpu,  # Trainer + ShockMonitor runs, cached or not
        "cpu_seconds_total": None,
    }
    tables = render_tables(doc, cases)
    print(tables)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        from benchmarks.detection import plots

        for c in cases:
            seed = report[0]
            key = (c.name, seed)
            plots.case_figure(runs[key], c, transitions[key], {d: alerts[d][key] for d in DETECTORS},
                              args.out / f"{stem}_{c.name}.png")
    doc["cpu_seconds_total"] = time.process_time() - cpu0  # this invocation (cached runs not included)
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    (args.out / f"{stem}.md").write_text(tables + "\n")
    log(f"wrote {args.out / (stem + '.json')} and .md; CPU: training {train_cpu:.0f} s, "
        f"total {doc['cpu_seconds_total']:.0f} s")
    return doc


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def render_tables(doc: dict[str, Any], cases: list[Case]) -> str:
    res = doc["results"]
    lines = [
        f"Detection benchmark: thresholds chosen on seeds {doc['selection_seeds']}, "
        f"scores on seeds {doc['report_seeds']}" + (" (QUICK: pipeline check, not a result)" if doc["quick"] else "")
        + (f"; shockmon observing every {doc['every_n_steps']} steps" if doc.get("every_n_steps", 1) > 1 else ""),
        "",
        "| detector | threshold | recall | precision | median lead (steps) | false alarms / 1e4 control steps"
        " | forecast error (steps) | forecast error / lead |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    chance_all = res[SHOCKMON]["report"]["chance_precision"]
    lines[0] += f"; chance precision (alerts at random steps): {_fmt(chance_all)}"
    for det in DETECTORS:
        r = res[det]["report"]
        th = res[det]["threshold"]
        name = det + (" (needs labels)" if det in bl.REFERENCE else "")
        lines.append(
            f"| {name} | {'default' if th is None else format(th, 'g')} | {_fmt(r['recall'])} "
            f"({r['detected']}/{r['transitions']}) | {_fmt(r['precision'])} ({r['tp']}/{r['tp'] + r['fp']}) | "
            f"{_fmt(r['median_lead'], '.0f')} | {_fmt(r['false_alarms_per_1e4_control_steps'], '.1f')} | "
            f"{_fmt(r['median_forecast_error'], '.0f')} | {_fmt(r['median_forecast_error_over_lead'])} |"
        )
    lines += ["", "Per case (report seeds): recall / precision / median lead; controls: false alarms. Chance: the"
              " precision of alerts at random steps (the share of steps inside a warning window).", "",
              "| case | W | chance | " + " | ".join(DETECTORS) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in DETECTORS) + " |"]
    for c in cases:
        cells = []
        for det in DETECTORS:
            r = res[det]["per_case"][c.name]
            if c.control:
                cells.append(f"{r['fp']} FA")
            else:
                cells.append(f"{_fmt(r['recall'], '.2f')} / {_fmt(r['precision'], '.2f')} / "
                             f"{_fmt(r['median_lead'], '.0f')}")
        chance = res[SHOCKMON]["per_case"][c.name]["chance_precision"]
        lines.append(f"| {c.name} | {c.window if not c.control else '-'} | {_fmt(chance)} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
