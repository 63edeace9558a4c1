"""Run the independent benchmark: the truth (cached), the advice, and its section of ``benchmarks/DIAGNOSIS.md``.

    nice -n 10 python -m benchmarks.diagnosis.independent.run               # truth where not cached, then advice
    python -m benchmarks.diagnosis.independent.run --advice-only            # advice against the cached truth
    python -m benchmarks.diagnosis.independent.run --advice-only --no-next-step --problems disjoint-inputs-2
    python -m benchmarks.diagnosis.independent.run --truth-only --retruth   # measure the truth again
    python -m benchmarks.diagnosis.independent.run --report-only            # the report from the two caches

Single-threaded torch; ``--jobs 2`` solves problems in parallel processes. The truth is cached in ``truth.json``
(keyed by each problem's fingerprint), the last advice run in ``advice.json`` (a run over some ``--problems``
replaces their entries only); the report covers every problem with both. See the package docstring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

import gradconflict

from . import advice as advice_mod
from . import truth as truth_mod
from .advice import AdviceOutcome, advise_problem
from .problems import Problem, problems
from .report import section, write_section

DIAGNOSIS = Path(__file__).resolve().parents[2] / "DIAGNOSIS.md"
ADVICE = Path(__file__).resolve().parent / "advice.json"


def machine_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return (
        f"{platform.platform()}; python {platform.python_version()}; torch {torch.__version__}; "
        f"{os.cpu_count()} logical cores, torch on 1 thread (load average {'/'.join(f'{x:.1f}' for x in load)}; "
        "the machine is shared)"
    )


def _now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"


def _by_name(names: list[str]) -> dict[str, Problem]:
    return {p.name: p for p in problems()}


def _truth_job(name: str, seeds: int) -> truth_mod.Truth:
    torch.set_num_threads(1)
    return truth_mod.measure(_by_name([name])[name], seeds, log=lambda s: print(s, flush=True))


def _advice_job(name: str, next_step: bool, seed: int) -> AdviceOutcome:
    torch.set_num_threads(1)
    outcome = advise_problem(_by_name([name])[name], next_step, seed)
    f, a = outcome.first, outcome.after
    print(
        f"{name:30} first {f.verdict:15} "
        f"{f.block or '-':11} {'decided' if f.decided else 'provisional'} | after "
        f"{(a.verdict + ' ' + (a.block or '-')) if a else (outcome.error or '-')[:60]} ({outcome.seconds:.0f} s)",
        flush=True,
    )
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnosis.independent.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="*", default=None, help="problem names (default: all)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds of the truth (default 8)")
    parser.add_argument("--advice-only", action="store_true", help="use the cached truth; fail where it is stale")
    parser.add_argument("--truth-only", action="store_true", help="measure (or refresh) the truth, no advice")
    parser.add_argument("--retruth", action="store_true", help="measure the truth even where it is cached")
    parser.add_argument("--no-next-step", action="store_true", help="score the first look only")
    parser.add_argument("--advice-seed", type=int, default=0,
                        help="the seed of the advice's monitored run and of its next step's batches (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help="problems in parallel processes (default 1)")
    parser.add_argument("--output", default=str(DIAGNOSIS), help="the Markdown file whose section is written")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the two caches")
    parser.add_argument("--cache", default=str(truth_mod.CACHE), help="the truth's JSON cache")
    parser.add_argument("--advice-cache", default=str(ADVICE), help="the last advice run's JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    every = {p.name: p for p in problems()}
    unknown = sorted(set(args.problems or []) - set(every))
    if unknown:
        parser.error(f"unknown problems {unknown}; they are {sorted(every)}")
    chosen = [n for n in every if args.problems is None or n in args.problems]
    cache_path = Path(args.cache)
    cache = truth_mod.load_cache(cache_path)
    meta = truth_mod.load_meta(cache_path)
    stale = [n for n in chosen
             if args.retruth or n not in cache or not truth_mod.is_current(cache[n], every[n], args.seeds)]
    pool = ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    if stale and (args.advice_only or args.report_only):
        print(f"no current cached truth for {stale}: the report leaves them out (run without --advice-only)")
    elif stale:
        started = time.perf_counter()
        if pool is None:
            measured = ((name, _truth_job(name, args.seeds)) for name in stale)
        else:
            futures = {pool.submit(_truth_job, name, args.seeds): name for name in stale}
            measured = ((futures[f], f.result()) for f in as_completed(futures))
        for name, t in measured:  # saved as each problem is done, so an interrupted run keeps them
            cache[name] = t
            truth_mod.save_cache(cache, meta, cache_path)
        meta = {"date": _now(), "machine": machine_line(), "seeds": args.seeds,
                "seconds": sum(t.seconds for t in cache.values()),
                "cpu_seconds": sum(t.cpu_seconds for t in cache.values()),
                "elapsed": time.perf_counter() - started, "jobs": args.jobs,
                "command": "nice -n 10 python -m benchmarks.diagnosis.independent.run "
                + " ".join(argv if argv is not None else sys.argv[1:])}
        truth_mod.save_cache(cache, meta, cache_path)
        print(f"truth measured for {len(stale)} problems in {time.perf_counter() - started:.0f} s")
    if args.truth_only:
        return 0
    advice_path = Path(args.advice_cache)
    stored = json.loads(advice_path.read_text(encoding="utf-8")) if advice_path.exists() else {"problems": {}}
    if not args.report_only:
        command = "python -m benchmarks.diagnosis.independent.run " + " ".join(
            argv if argv is not None else sys.argv[1:])
        run = {"date": _now(), "machine": machine_line(), "command": command.strip(),
               "gradconflict": f"{gradconflict.__version__} from {Path(gradconflict.__file__).resolve().parent}"}
        next_step = not args.no_next_step
        if pool is None:
            done = (_advice_job(name, next_step, args.advice_seed) for name in chosen)
        else:
            jobs = [pool.submit(_advice_job, n, next_step, args.advice_seed) for n in chosen]
            done = (f.result() for f in as_completed(jobs))
        stored["advice_seed"] = args.advice_seed
        for outcome in done:  # saved as each problem is done
            stored["problems"][outcome.name] = {**advice_mod.to_dict(outcome), "run": run}
            advice_path.write_text(json.dumps(stored, indent=1) + "\n", encoding="utf-8")
    if pool is not None:
        pool.shutdown()
    names = [n for n in every if n in stored["problems"] and n in cache and n not in stale]
    outcomes = [advice_mod.scored(advice_mod.from_dict(stored["problems"][n]), cache[n]) for n in names]
    runs = {json.dumps(stored["problems"][n]["run"], sort_keys=True) for n in names}
    machine = [f"- advice run: {r['date']}; `{r['command']}`; {r['machine']}; gradconflict "
               f"{r['gradconflict']}" for r in map(json.loads, sorted(runs))]
    others: dict[int, Sequence[AdviceOutcome]] = {}  # the advice on other seeds' monitored runs, cached beside this one
    for path in sorted(advice_path.parent.glob("advice-seed*.json")):
        other = json.loads(path.read_text(encoding="utf-8"))
        if path.resolve() != advice_path.resolve() and other.get("advice_seed") != stored.get("advice_seed", 0):
            others[other["advice_seed"]] = [advice_mod.scored(advice_mod.from_dict(other["problems"][n]), cache[n])
                                            for n in names if n in other["problems"]]
    text = section(every, cache, outcomes, machine=machine, truth_meta=meta, seed=stored.get("advice_seed", 0),
                   other_seeds=others)
    write_section(Path(args.output), text)
    print(f"wrote {args.output} ({len(outcomes)} problems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
