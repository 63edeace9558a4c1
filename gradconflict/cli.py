"""The ``gradconflict`` command line: ``demo``, and ``report`` and ``advise`` on a saved history.

Saved histories may hold steps that carry different tasks (partial labels, round-robin training): ``report``
then says which tasks and pairs the measured steps carried, and ``advise`` judges each pair on the steps that
carried both (see :mod:`gradconflict.diagnosis`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradconflict.report import ConflictReport

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from gradconflict.demo import run_demo

    steps = args.steps if args.steps is not None else (150 if args.quick else 400)
    compare_steps = args.compare_steps if args.compare_steps is not None else (60 if args.quick else 200)
    run_demo(
        steps=steps, compare_steps=compare_steps, out_dir=args.out, seed=args.seed, progress=not args.no_progress
    )
    return 0


def _coverage(reports: Sequence[ConflictReport]) -> list[str]:
    """Lines on which tasks the measured steps carried, when some step lacked some task (else none)."""
    from gradconflict.diagnosis.aligned import align, no_pair_reason

    aligned = align(reports)
    if bool(aligned.present.all()):
        return []
    counts, tasks, S = aligned.pair_counts(), aligned.tasks, aligned.num_steps
    lines = [
        "tasks (measured steps carrying each): " + ", ".join(f"{t} {counts[k, k]}" for k, t in enumerate(tasks))
        + f" of {S}"
    ]
    if len(tasks) > 1:
        pairs = [f"{a}/{b} {counts[i, j]}" for i, a in enumerate(tasks) for j, b in enumerate(tasks) if i < j]
        lines.append(
            f"pairs measured together: {', '.join(pairs)} of {S}; {int(aligned.multi.sum())} of {S} measured steps "
            "carried two tasks or more"
        )
    why = no_pair_reason(aligned)
    if why is not None and len(tasks) > 1:
        lines.append(f"warning: {why}")
    return lines


def _report(args: argparse.Namespace) -> int:
    from gradconflict.history import History

    history = History.from_jsonl(args.history)
    reports = history.reports
    measured = [r for r in reports if not r.skipped]
    if not measured:
        print(f"{args.history}: no measured step")
        return 1
    for r in reports[:: max(1, len(reports) // args.lines)]:
        print(r.summary())
    for line in _coverage(measured):
        print(line)
    print(f"{len(measured)} measured steps of {len(reports)}; last: {measured[-1].summary()}")
    return 0


def _advise(args: argparse.Namespace) -> int:
    import json

    from gradconflict.diagnosis import advise_from_jsonl

    thresholds = {}
    for item in args.threshold:
        name, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--threshold takes NAME=VALUE, got {item!r}")
        thresholds[name] = float(value)
    advice = advise_from_jsonl(args.history, thresholds=thresholds or None)
    print(json.dumps(advice.to_dict(), indent=2) if args.json else advice.summary() if args.brief else advice)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradconflict`` command."""
    parser = argparse.ArgumentParser(prog="gradconflict", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="monitor, diagnose and compare splits of a multi-task model (offline digits)")
    demo.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    demo.add_argument("--steps", type=int, default=None, help="monitored steps (default 400, 150 quick)")
    demo.add_argument(
        "--compare-steps", type=int, default=None, help="steps per compared variant (default 200, 60 quick; 0: none)"
    )
    demo.add_argument("--out", default="gradconflict-run", help="output folder (default: gradconflict-run)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    report = sub.add_parser("report", help="summarise a saved history (JSONL)")
    report.add_argument("history", help="a history written by History.to_jsonl (e.g. gradconflict-run/history.jsonl)")
    report.add_argument("--lines", type=int, default=10, help="about how many steps to show")
    report.set_defaults(func=_report)
    advise = sub.add_parser("advise", help="should the backbone be split? advice from a saved history (JSONL)")
    advise.add_argument("history", help="a history written by History.to_jsonl")
    advise.add_argument("--json", action="store_true", help="print the advice as JSON")
    advise.add_argument(
        "--brief", action="store_true", help="print the verdict and the evidence behind it in a few lines"
    )
    advise.add_argument(
        "--threshold", action="append", default=[], metavar="NAME=VALUE", help="override one threshold (repeatable)"
    )
    advise.set_defaults(func=_advise)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradconflict`` console script and of ``python -m gradconflict``."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"gradconflict {args.command}: {err}", file=sys.stderr)
        return 2
