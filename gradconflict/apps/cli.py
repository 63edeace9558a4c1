"""The ``gradconflict`` command line: ``demo``, and ``report``, ``advise`` and ``samples`` on a saved history.

Saved histories may hold steps that carry different tasks (partial labels, round-robin training): ``report``
then says which tasks and pairs the measured steps carried, and ``advise`` judges each pair on the steps that
carried both (see :mod:`gradconflict.diagnosis`). Output piped into a reader that stops early (``| head``) ends
the command quietly.

``report``, ``advise`` and ``samples`` run torch on one thread: their tensors are small (a few numbers per step), and
on a busy machine more threads mostly wait for each other (a tenfold slowdown on two shared cores).

Whatever is wrong with the input (a missing file or a folder, a line of a foreign schema, an output path under a
regular file, a bad option) is said in one line on stderr, and the command exits with status 2; a warning (a
line cut short by a crash, skipped) is one line on stderr too.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Measure how the tasks of a multi-task model fight over their shared backbone, and whether to split it.

  gradconflict demo                          train, monitor, diagnose and compare splits on offline data
  gradconflict report RUN.jsonl              summarise a saved run (add -o report.html for the HTML report)
  gradconflict advise RUN.jsonl              should the backbone be split, where, into which groups?
  gradconflict samples RUN.jsonl --pair a,b  the examples that carry the conflict between tasks a and b

RUN.jsonl is a history written by History.to_jsonl() or a JSONLSink (the demo writes one).
"""


def _demo(args: argparse.Namespace) -> int:
    from gradconflict.apps.demo import run_demo

    steps = args.steps if args.steps is not None else (150 if args.quick else 400)
    compare_steps = args.compare_steps if args.compare_steps is not None else (60 if args.quick else 200)
    run_demo(
        steps=steps, compare_steps=compare_steps, out_dir=args.out, seed=args.seed,
        progress=not (args.no_progress or args.quiet), log_every=None if args.quiet else 50,
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from gradconflict.diagnosis import advise, align
    from gradconflict.records.history import History
    from gradconflict.reporting.summary import summarize_run

    for out in (args.output, args.png):
        _check_writable(out)
    history = History.from_jsonl(args.history)
    aligned = align(history)  # once: the advice, the summary and the HTML report read these arrays
    if not aligned.num_steps:
        print(f"{args.history}: no measured step", file=sys.stderr)
        return 1
    advice = advise(aligned, samples=history.samples)  # the aligned arrays leave the history's tally behind
    summary = summarize_run(history, profile=advice.profile, aligned=aligned)
    print(f"{args.history}: {summary.text()}")
    if args.lines > 0:
        print("\nsteps:")
        for k in range(0, len(history), max(1, -(-len(history) // args.lines))):
            print("  " + history[k].summary())
    groups = " | ".join("[" + ", ".join(g) + "]" for g in advice.groups)
    where = f", branch point {advice.branch_point}" if advice.branch_point is not None else ""
    print(f"\nadvice: {advice.verdict}{where}, groups {groups} (gradconflict advise {args.history}: the evidence)")
    if args.output is not None or args.png is not None:
        from gradconflict.reporting.html import render_html, write_html

        source = os.path.basename(args.history)
        if args.output is not None:
            path = write_html(
                history, args.output, advice=advice, source=source, png_dir=args.png, summary=summary, aligned=aligned
            )
            print(f"report: {path}")
        else:
            render_html(history, advice=advice, source=source, png_dir=args.png, summary=summary, aligned=aligned)
        if args.png is not None:
            print(f"figures: {args.png}/*.png")
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


def _check_writable(path: str | None) -> None:
    """Refuse an output path that cannot be written (under a regular file) before the run is read, not after."""
    if path is None:
        return
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder")
            return


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.filename}: {err.strerror[0].lower()}{err.strerror[1:]}"  # not Python's "[Errno 21] ..."
    return str(err).splitlines()[0] if str(err) else type(err).__name__


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run torch on ``count`` threads (``None``: as it is), and restore torch's setting after (``main`` may be called
    in-process)."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: The size above which the reading commands have glibc map each allocation on its own (``M_MMAP_THRESHOLD``).
_MMAP_THRESHOLD = 4 << 20
#: glibc's ``M_MMAP_THRESHOLD`` option of ``mallopt``, and the threshold it starts with.
_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD = -3, 128 << 10


@contextmanager
def _mapped_allocations(on: bool) -> Iterator[None]:
    """While a long run is read and diagnosed, have glibc map every allocation above 4 MiB on its
    own, so that each freed temporary goes back to the system at once. glibc otherwise raises its threshold to the
    size of the temporaries it frees, keeps the next ones in its heap, and the heap fragments: at 10^6 steps
    ``report`` and ``advise`` held about 100 MB more (``benchmarks/RESULTS.md``, "Long runs"). Its start value is
    set back after (``main`` may be called in-process). Nothing is done off glibc."""
    mallopt = None
    if on:
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018  # glibc only: musl and others have no such threshold
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            mallopt = None
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD)


@contextmanager
def _warnings_as_lines(command: str) -> Iterator[None]:
    """Show each warning as one line on stderr (no source line): the command line's user reads no traceback."""

    def show(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        text = str(message).removeprefix("gradconflict: ")
        print(f"gradconflict {command}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _samples(args: argparse.Namespace) -> int:
    from gradconflict.diagnosis.examples import conflicting_examples
    from gradconflict.records.samples import SampleTally

    a, comma, b = args.pair.partition(",")
    if not comma or not a or not b or "," in b:
        raise ValueError(f"--pair takes two task names separated by a comma (--pair seg,depth), got {args.pair!r}")
    tally = SampleTally.from_jsonl(args.history, max_ids=args.max_ids or None)
    if not tally.pairs:
        print(f"{args.history}: no step was measured with sample_ids (monitor.backward(losses, sample_ids=ids))",
              file=sys.stderr)
        return 1
    try:
        stats = tally.pair(a, b)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    found = conflicting_examples(tally, a, b, k=args.top, by=args.by)
    totals = tally.totals(a, b)
    share = "none" if found.push_share is None else f"{found.push_share:.0%}"
    about = f"{totals['ids']} ids attributed"
    if tally.approximate:
        about = f"about {about} (more than --max-ids: the {len(stats)} kept are ranked)"
    print(f"{args.history}: {about} for ({a}, {b}); the {len(found.examples)} below ({found.id_share:.1%} of the "
          f"ranked ids) carry {share} of the negative push between {a} and {b} (each id's pushes summed over its "
          "steps, as in the advice)")
    print(f"{'id':>12} {'steps':>6} {'agreement':>10} {'push':>11} {'apart':>6} {'share':>6}")
    for e in found.examples:
        print(f"{e.id:>12} {e.steps:>6} {e.agreement:>10.3f} {e.push:>11.3e} {e.apart:>6.0%} {e.share:>6.1%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradconflict`` command."""
    from gradconflict import __version__
    from gradconflict.records.samples import MAX_IDS

    parser = argparse.ArgumentParser(
        prog="gradconflict", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="monitor, diagnose and compare splits of a multi-task model (offline digits)",
        description="Train a three-task model on offline digits under a ConflictMonitor, print the report and the "
        "split advice, run the comparison experiment, and save the history, the advice, the comparison and the "
        "HTML report in the output folder.",
    )
    demo.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    demo.add_argument("--steps", type=int, default=None, help="monitored steps (default 400, 150 quick)")
    demo.add_argument(
        "--compare-steps", type=int, default=None, help="steps per compared variant (default 200, 60 quick; 0: none)"
    )
    demo.add_argument("--out", default="gradconflict-run", help="output folder (default: gradconflict-run)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--no-progress", action="store_true", help="no progress bar (there is none when output is not a terminal)"
    )
    demo.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar and no per-step lines: the results only"
    )
    demo.set_defaults(func=_demo)
    report = sub.add_parser(
        "report",
        help="summarise a saved run; -o writes the HTML report",
        description="Summarise a saved run: steps and tasks, the mean and trend of the conflict, each pair's mean "
        "cosine and persistence, each task's norm and alignment, the layer profile and the advice. With -o, also "
        "write one self-contained HTML page with the figures; with --png, each figure as a PNG file.",
    )
    report.add_argument("history", help="a history written by History.to_jsonl or a JSONLSink (e.g. run.jsonl)")
    report.add_argument("-o", "--output", metavar="HTML", default=None, help="write the HTML report to this file")
    report.add_argument("--png", metavar="DIR", default=None, help="write each figure to this folder as a PNG")
    report.add_argument("--lines", type=int, default=0, help="also show about this many steps' one-line summaries")
    report.set_defaults(func=_report)
    advise = sub.add_parser(
        "advise",
        help="should the backbone be split? advice from a saved run",
        description="Diagnose a saved run: the seven signals (four warning signs, two warnings about what a split "
        "cannot cure, magnitude dominance) with their evidence, the layer profile and "
        "branch point, the task groups, and the comparison experiment to run next.",
    )
    advise.add_argument("history", help="a history written by History.to_jsonl or a JSONLSink")
    advise.add_argument("--json", action="store_true", help="print the advice as JSON")
    advise.add_argument(
        "--brief", action="store_true", help="print the verdict and the evidence behind it in a few lines"
    )
    advise.add_argument(
        "--threshold", action="append", default=[], metavar="NAME=VALUE", help="override one threshold (repeatable)"
    )
    advise.set_defaults(func=_advise)
    samples = sub.add_parser(
        "samples",
        help="the examples that carry a pair's conflict, from a run measured with sample_ids",
        description="Rank the example ids of a saved run (steps measured with monitor.backward(losses, "
        "sample_ids=ids)) by how much they carry the conflict between two tasks: lowest mean within-example "
        "agreement first (see docs/attribution.md), with each id's steps, mean push (its part in 2 G_ab) and how "
        "often it pushed the pair apart.",
    )
    samples.add_argument("history", help="a history written by History.to_jsonl or a JSONLSink")
    samples.add_argument("--pair", required=True, metavar="A,B", help="the two tasks, e.g. --pair seg,depth")
    samples.add_argument("--top", type=int, default=50, help="how many ids to list (default 50)")
    samples.add_argument(
        "--by", choices=("agreement", "push", "apart"), default="agreement", help="the ranking (default agreement)"
    )
    samples.add_argument(
        "--max-ids", type=int, default=MAX_IDS, metavar="N",
        help=f"ids kept per pair; past it the ranking is approximate (default {MAX_IDS}; 0: keep every id)",
    )
    samples.set_defaults(func=_samples)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradconflict`` console script and of ``python -m gradconflict``.

    >>> main(["report", "no-such-run.jsonl"])       # the error goes to stderr, the status says it
    2
    """
    args = build_parser().parse_args(argv)
    try:
        reading = args.command != "demo"
        with _warnings_as_lines(args.command), _threads(1 if reading else None), _mapped_allocations(reading):
            return args.func(args)
    except BrokenPipeError:
        # The reader stopped early (`gradconflict report RUN.jsonl | head`): end quietly, as Unix tools do. Output
        # still buffered for the closed pipe goes to /dev/null, so the interpreter's own flush at exit is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status of a Unix tool stopped by a closed pipe
    except (OSError, ValueError, ImportError) as err:  # the input, the output path or an option: say which
        print(f"gradconflict {args.command}: {_one_line(err)}", file=sys.stderr)
        return 2
