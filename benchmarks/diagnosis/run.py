"""Run the diagnosis benchmark and write its report.

    python -m benchmarks.diagnosis.run                       # every problem, 4 seeds: writes benchmarks/DIAGNOSIS.md
    python -m benchmarks.diagnosis.run --problems upper-2 opposed-2 --seeds 2 --output /tmp/d.md
    python -m benchmarks.diagnosis.run --jobs 2              # problems in parallel processes

See the package docstring for what is measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import gradconflict
from gradconflict.fixtures.synthetic import FAMILY, Spec

from .advice_run import advice_run, block_of
from .independent.report import kept_section
from .report import Outcome, markdown
from .truth import truth

HERE = Path(__file__).resolve().parent


def solve(spec: Spec, seeds: int) -> Outcome:
    """Advice and truth of one problem (single-threaded torch: the models are tiny)."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    advice = advice_run(spec)
    measured = truth(spec, seeds)
    measured.seconds = time.perf_counter() - started
    return Outcome(spec, measured, advice)


def machine() -> list[str]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- platform: {platform.platform()}; python {platform.python_version()}; {os.cpu_count()} logical cores "
        f"(load average {'/'.join(f'{x:.1f}' for x in load)} at the end; the machine is shared)",
        f"- torch {torch.__version__}; gradconflict {gradconflict.__version__} from "
        f"{Path(gradconflict.__file__).resolve().parent}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnosis.run", description=__doc__)
    parser.add_argument("--problems", nargs="*", default=None, help="FAMILY names (default: all)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds of the comparison experiment (default 4)")
    parser.add_argument("--jobs", type=int, default=1, help="problems solved in parallel processes (default 1)")
    parser.add_argument("--output", default=str(HERE.parent / "DIAGNOSIS.md"), help="the report (Markdown)")
    args = parser.parse_args(argv)
    specs = [s for s in FAMILY if args.problems is None or s.name in args.problems]
    unknown = sorted(set(args.problems or []) - {s.name for s in specs})
    if unknown:
        parser.error(f"unknown problems {unknown}; the family is {[s.name for s in FAMILY]}")
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else _Inline() as pool:
        for outcome in pool.map(solve, specs, [args.seeds] * len(specs)):
            a = outcome.advice.final
            print(
                f"{outcome.spec.name:24} truth {outcome.truth.verdict:15} {outcome.truth.branch or '-':11} "
                f"advice {a.verdict:15} {block_of(a.branch_point) or '-':11} "
                f"{'ok' if outcome.verdict_ok and outcome.branch_ok in (True, None) else 'WRONG'}  "
                f"({outcome.truth.seconds:.0f} s)",
                flush=True,
            )
            outcomes.append(outcome)
    seconds = time.perf_counter() - started
    command = "python -m benchmarks.diagnosis.run " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(outcomes, command=command.strip(), seconds=seconds, machine=machine(), seeds=args.seeds)
    Path(args.output).write_text(text + kept_section(Path(args.output)), encoding="utf-8")
    print(f"wrote {args.output} ({seconds:.0f} s)")
    return 0


class _Inline:
    """``map`` in this process (``--jobs 1``), with the executor's interface."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn, *iterables):  # noqa: ANN001, ANN201
        return map(fn, *iterables)


if __name__ == "__main__":
    sys.exit(main())
