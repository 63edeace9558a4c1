"""How long ``import gradconflict`` takes on top of ``import torch``: ``python -m benchmarks.import_time``.

Each measurement is a fresh interpreter that imports torch, then times (``time.perf_counter``) one import
statement: ``import gradconflict`` (what a training loop pays), and the diagnosis, split toolkit and plots that
``import gradconflict`` leaves for first use. The interpreters run round-robin over the statements, ``--reps``
times; the report gives the median of each and the time of ``import torch`` itself, for scale.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

STATEMENTS = {
    "import torch (for scale)": ("", "import torch"),
    "import gradconflict": ("import torch", "import gradconflict"),
    "+ diagnosis (scipy)": ("import torch, gradconflict", "import gradconflict.diagnosis"),
    "+ split toolkit": ("import torch, gradconflict", "import gradconflict.split"),
    "+ plots (matplotlib)": ("import torch, gradconflict", "import gradconflict.reporting.plots"),
}


def _time(setup: str, statement: str) -> float:
    code = f"{setup}\nimport time\nt = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_time", description=__doc__)
    parser.add_argument("--reps", type=int, default=7, help="interpreters per statement (default 7)")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for _ in range(args.reps):
        for name, (setup, statement) in STATEMENTS.items():
            times[name].append(_time(setup, statement))
    print(f"median of {args.reps} fresh interpreters each, round-robin")
    for name, values in times.items():
        print(f"  {name:<28} {1000 * statistics.median(values):8.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
