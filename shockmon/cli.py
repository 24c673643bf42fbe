"""The ``shockmon`` console script.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its parser and sets ``func`` to
``_run_<name>(args) -> int``. Adding one (``report``, ...) means writing that pair and listing ``_add_<name>``
in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1  # not an integer: the same error as one out of range
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32 - 1], got {text!r}")
    return value


# ------------------------------------------------------------------------------------------------ demo
# Kept here (and checked against shockmon.demo by the tests): `shockmon --help` does not import Lightning.
DEMO_MODELS = ("mlp", "transformer")
DEMO_DEVICES = ("auto", "cpu", "cuda")
DEMO_DEFAULT_STEPS = {"mlp": 1200, "transformer": 2500}


def _add_demo(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a model that groks modular addition, with ShockMonitor and TensorBoard logging",
        description=(
            "Trains a small network on (a + b) mod 97 until it groks (test accuracy jumps long after the"
            " training set is fit), with ShockMonitor watching, logs to TensorBoard and prints when the jump"
            " happened and"
            " which alerts fired before it."
        ),
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="optimizer steps (default: "
        + ", ".join(f"{n} for {m}" for m, n in DEMO_DEFAULT_STEPS.items())
        + ")",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data split and the weights (default: 0)")
    p.add_argument(
        "--out", default="./shockmon_runs", help="TensorBoard log directory (default: ./shockmon_runs)"
    )
    p.add_argument(
        "--device", choices=DEMO_DEVICES, default="auto", help="auto: cuda when available (default: auto)"
    )
    p.add_argument("--model", choices=DEMO_MODELS, default="mlp", help="network to train (default: mlp)")
    p.add_argument(
        "--eval-every", type=_positive_int, default=10, help="steps between accuracy checks (default: 10)"
    )
    p.add_argument(
        "--log-every", type=_positive_int, default=10, help="steps between log writes (default: 10)"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads (default: half the cores, at most 4; 1 on two cores)",
    )
    p.add_argument(
        "--no-progress-bar", dest="progress_bar", action="store_false", help="hide the progress bar"
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from shockmon.demo import format_summary, run_demo

    try:
        result = run_demo(
            steps=args.steps,
            seed=args.seed,
            out=args.out,
            device=args.device,
            model=args.model,
            eval_every=args.eval_every,
            log_every=args.log_every,
            progress_bar=args.progress_bar,
            threads=args.threads,
        )
    except ValueError as err:
        print(f"shockmon demo: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. --out not writable (found before training starts)
        print(f"shockmon demo: error: {err.strerror or err}: {err.filename!r} (--out {args.out!r})", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0


# ---------------------------------------------------------------------------------------------- report
REPORT_FORMATS = ("text", "json", "markdown")  # checked against shockmon.report.FORMATS by the tests


def _add_report(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="read a run's TensorBoard event files back: events, Burgers consistency, symmetry, plots",
        description=(
            "Reads the event files of a run logged by ShockMonitor with a TensorBoardLogger (or of every run"
            " under a directory such as lightning_logs/; a run still being written is read as far as it"
            " goes),"
            " prints its events (kind, group, step, forecast shock step, lead, strength), the Burgers"
            " consistency over time and the symmetry summary, and writes PNGs: the characteristic diagram of"
            " each alerted group, the forecast over time, quotient vs raw norms per layer (needs matplotlib)."
            " Exit status 2 on bad input."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's log directory, or a directory of runs")
    p.add_argument(
        "--out", default="shockmon_report", help="where the PNGs go (default: ./shockmon_report; one"
        " subdirectory per run when RUN_DIR holds several)"
    )
    p.add_argument("--format", choices=REPORT_FORMATS, default="text", help="output format (default: text)")
    p.add_argument("--prefix", default=None, help="the ShockMonitor tag prefix (default: every one found)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNGs")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from shockmon.report import ReportError, report, to_json, to_markdown, to_text

    try:
        results, skipped = report(args.run_dir, out=args.out, prefix=args.prefix, plots=args.plots)
    except ReportError as err:
        print(f"shockmon report: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. --out not writable
        print(f"shockmon report: error: {err.strerror or err}: {err.filename!r}", file=sys.stderr)
        return 2
    for warning in [*skipped, *(w for r in results for w in r.warnings)]:
        print(f"shockmon report: warning: {warning}", file=sys.stderr)
    root = Path(args.run_dir)
    if args.format == "json":
        print(json.dumps(to_json(results, skipped, root), indent=1))
    elif args.format == "markdown":
        print(to_markdown(results, root, Path(args.out)))
    else:
        print(to_text(results, root))
    return 0


# ---------------------------------------------------------------------------------------------- parser
SUBCOMMANDS: list[Callable[[Any], None]] = [_add_demo, _add_report]


def build_parser() -> argparse.ArgumentParser:
    """The ``shockmon`` argument parser, with every subcommand in :data:`SUBCOMMANDS`."""
    from shockmon import __version__

    parser = argparse.ArgumentParser(
        prog="shockmon",
        description="Forecast training phase transitions from symmetry-reduced observables.",
    )
    parser.add_argument("--version", action="version", version=f"shockmon {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shockmon`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
