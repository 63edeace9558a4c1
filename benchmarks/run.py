"""Benchmark of gradconflict's hot path against the other ways of getting the task-gradient Gram.

    python -m benchmarks.run              # full suite (~5 min on 2 quiet CPU cores), writes benchmarks/RESULTS.md
    python -m benchmarks.run --quick      # a subset (~1-2 min)
    python -m benchmarks.run --smoke      # every route once on tiny models; exit 1 on error or fp32 error > 1e-4
    python -m benchmarks.run --workload mlp-b64 --tasks 4 16 --device cuda --output /tmp/r.md

See benchmarks/routes.py for the exact definition of each route and benchmarks/timing.py for how time and
memory are measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from benchmarks import routes as R
from benchmarks.timing import fmt_bytes, median, peak_memory, round_robin, spread
from benchmarks.workloads import REAL_SCALE, SMOKE, WORKLOADS, Workload

HERE = Path(__file__).resolve().parent
SMOKE_TOL = 1e-4
G_TARGET = 1e-5


@dataclass
class Row:
    key: str
    ms: float = float("nan")
    mem: int | None = None
    g_err: float | None = None
    grad_err: float | None = None
    reps: int = 0
    spread: float = float("nan")  # (max - min) / median of the timed repetitions
    status: str = "ok"  # ok | skipped | failed
    note: str = ""

    @property
    def label(self) -> str:
        return R.ROUTES[self.key][0]


@dataclass
class Config:
    workload: Workload
    tasks: int
    rows: dict[str, Row] = field(default_factory=dict)
    seconds: float = 0.0

    def ms(self, key: str) -> float:
        row = self.rows.get(key)
        return row.ms if row is not None and row.status == "ok" else float("nan")

    def ratio(self, key: str, to: str = "plain") -> float:
        return self.ms(key) / self.ms(to)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.detach().double().cpu() - ref.cpu()).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def grad_err(route: R.Route, ref: list[torch.Tensor]) -> float:
    params = [p for p in route.model.parameters() if p.requires_grad]
    num = max(
        ((p.grad.double().cpu() if p.grad is not None else torch.zeros(p.shape, dtype=torch.float64)) - r.cpu())
        .abs().max().item()
        for p, r in zip(params, ref)
    )
    return num / max(r.abs().max().item() for r in ref)


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    notes = []
    for w in caught:
        text = str(w.message)
        m = re.search(r"(aten::\w+)", text) if "batching rule" in text else None
        note = f"vmap fallback (per-task loop) for {m.group(1)}" if m else f"warning: {text.splitlines()[0][:120]}"
        if note not in notes:
            notes.append(note)
    return notes


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


Step = Callable[[], "Tensor | None"]


def under_autocast(step: Step, device: torch.device, precision: str | None) -> Step:
    """``step`` run under ``torch.autocast`` at ``precision`` (``None``: as is, in the model's float32)."""
    if precision is None:
        return step

    def run() -> Tensor | None:
        with torch.autocast(device.type, dtype=AUTOCAST[precision]):
            return step()

    return run


def run_config(wl: Workload, T: int, args: argparse.Namespace, device: torch.device, keys: list[str]) -> Config:
    start = time.perf_counter()
    cfg = Config(wl, T)
    base = wl.model(T).to(device)
    x, targets = wl.data(T)
    x, targets = x.to(device), {k: t.to(device) for k, t in targets.items()}
    g_ref, grads_ref = R.reference(base, x, targets)

    built: dict[str, R.Route] = {}
    steps: dict[str, Step] = {}
    for key in keys:
        row = cfg.rows[key] = Row(key)
        try:
            route = R.build(key, base, x, targets, batchnorm=wl.batchnorm)
            step = steps[key] = under_autocast(route.step, device, args.autocast)
            route.zero_grad()
            # first (untimed) call: warm-up, correctness and (under the memory probe) peak memory; its warnings
            # (e.g. vmap falling back to a per-task loop for some operator) go into the route's note. A route
            # that times strategies on its first calls runs them first, so that its memory is the steady state's.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(0 if args.smoke else route.trial_calls):
                    step()
                    route.zero_grad()
                if args.smoke or args.no_memory:
                    gram = step()
                else:
                    box: list = []
                    row.mem = peak_memory(lambda s=step, b=box: b.append(s()), device)
                    gram = box[0]
            if gram is not None:
                row.g_err = rel_err(gram, g_ref)
            row.grad_err = grad_err(route, grads_ref)
            row.note = "; ".join(x for x in [route.note, *_warning_notes(caught)] if x)
            route.zero_grad()
            built[key] = route
        except R.Skip as e:
            row.status, row.note = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 -- a failing route is reported, the others still run
            row.status, row.note = "failed", f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if args.smoke or args.verbose:
                traceback.print_exc()

    def drop_grads() -> None:  # before each call, so that only one model's gradients are alive at a time
        for r in built.values():
            r.zero_grad()

    if not args.smoke and built:
        times = round_robin(
            {k: steps[k] for k in built},
            warmup=0 if wl.heavy else args.warmup, reps=args.reps, device=device,
            before={k: drop_grads for k in built},
            per_call={k: r.steps_per_call for k, r in built.items()},
            budget_s=args.budget, min_reps=min(args.min_reps, 3) if wl.heavy else args.min_reps,
        )
        for k, ts in times.items():
            cfg.rows[k].ms = median(ts) * 1e3
            cfg.rows[k].reps = len(ts)
            cfg.rows[k].spread = spread(ts)
            extra = built[k].describe() if built[k].describe is not None else ""
            cfg.rows[k].note = "; ".join(x for x in [cfg.rows[k].note, extra] if x)
    for r in built.values():
        r.close()
    cfg.seconds = time.perf_counter() - start
    return cfg


# ---------------------------------------------------------------------------------------------- reporting
def _f(v: float | None, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def table(cfg: Config) -> list[str]:
    lines = [
        "| route | median ms | x plain | x floor | peak mem | G rel err | grad rel err | reps | spread | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, row in cfg.rows.items():
        if row.status != "ok":
            lines.append(f"| {row.label} | {row.status} | | | | | | | | {row.note} |")
            continue
        lines.append(
            f"| {row.label} | {_f(row.ms, '.2f')} | {_f(cfg.ratio(key), '.2f')} | {_f(cfg.ratio(key, 'floor'), '.2f')} "
            f"| {fmt_bytes(row.mem)} | {_f(row.g_err, '.1e')} | {_f(row.grad_err, '.1e')} | {row.reps} "
            f"| {_f(100 * row.spread, '.0f')}{'%' if row.spread == row.spread else ''} | {row.note} |"
        )
    return lines


@dataclass
class Check:
    target: str
    where: str
    value: float
    limit: float
    lower_is_better: bool = True
    context: str = ""

    @property
    def ok(self) -> bool:
        return self.value <= self.limit if self.lower_is_better else self.value >= self.limit

    @property
    def verdict(self) -> str:
        if self.value != self.value:
            return "n/a"
        if self.ok:
            return "PASS"
        off = self.value / self.limit - 1 if self.lower_is_better else 1 - self.value / self.limit
        return f"MISS by {100 * off:.1f}%" if off < 0.1 else f"MISS by {100 * off:.0f}%"


#: the exact peers the default engine is held to
PEERS = ("naive", "batched", "torchjd", "torchjd-b0")
#: the workloads whose monitored step must peak within 1.1 x a plain step's memory
MEMORY_CASES = ("wide-linear", "gpt2-small")


def checks(results: dict[tuple[str, int], Config], fp32: bool = True) -> list[Check]:
    """Every target of the issue that the results cover, each with the measured value and some context (what
    bounds it) computed from the same tables."""
    out: list[Check] = []
    for (wl, T), c in results.items():
        peers = [k for k in PEERS if c.ms(k) == c.ms(k)]
        if peers and c.ms("gc") == c.ms("gc"):
            best = min(peers, key=c.ms)
            out.append(Check(
                "(e) <= 1.05 x the fastest exact peer", f"{wl} T={T}", c.ms("gc") / c.ms(best), 1.05,
                context=f"fastest peer {R.ROUTES[best][0]} {c.ratio(best):.2f} x plain, (e) {c.ratio('gc'):.2f}, "
                f"floor {c.ratio('floor'):.2f}",
            ))
    c = results.get(("mlp-b64", 4))
    if c is not None:
        out.append(Check(
            "(e) <= 2.2 x plain (`.grad` through autograd)", "mlp-b64 T=4", c.ratio("gc"), 2.2,
            context=f"the floor alone is {c.ratio('floor'):.2f} x plain",
        ))
    for (wl, T), c in results.items():
        expected = 1 + (c.ratio("gc") - 1) / 10
        out.append(Check(
            "(f) every=10 <= 1.12 x plain", f"{wl} T={T}", c.ratio("gc-every10"), 1.12,
            context=f"(e) amortised over 10 steps alone would give {expected:.2f}",
        ))
    for (wl, T), c in results.items():
        gc, plain = c.rows.get("gc"), c.rows.get("plain")
        if wl in MEMORY_CASES and gc is not None and plain is not None and gc.mem and plain.mem:
            out.append(Check(
                "(e) peak memory <= 1.1 x plain", f"{wl} T={T}", gc.mem / plain.mem, 1.1,
                context=f"{fmt_bytes(gc.mem)} vs plain {fmt_bytes(plain.mem)} above the step's start",
            ))
    for (wl, T), c in results.items():
        if T == 4 and c.rows.get("gc-repr") is not None and c.rows["gc-repr"].status == "ok":
            out.append(Check(
                "(g) representation <= 1.1 x plain", f"{wl} T={T}", c.ratio("gc-repr"), 1.1,
                context=f"{c.ms('gc-repr'):.2f} ms vs plain {c.ms('plain'):.2f} ms",
            ))
    errs = [(c.rows["gc"].g_err, wl, T) for (wl, T), c in results.items()
            if "gc" in c.rows and c.rows["gc"].g_err is not None]
    if errs and fp32:
        err, wl, T = max(errs)
        others = [f"{k} {results[(wl, T)].rows[k].g_err:.1e}" for k in ("naive", "batched", "torchjd")
                  if k in results[(wl, T)].rows and results[(wl, T)].rows[k].g_err is not None]
        above = [f"{w} T={t} ({e:.1e})" for e, w, t in errs if e > G_TARGET]
        out.append(Check(
            "(e) fp32 rel error of G <= 1e-5 (worst config)", f"{wl} T={T}", err, G_TARGET,
            context=f"{len(above)} of {len(errs)} configs above 1e-5" + (f": {', '.join(above)}" if above else "")
            + "; same config, other fp32 routes: " + ", ".join(others),
        ))
    return out


def summary(results: dict[tuple[str, int], Config]) -> list[str]:
    """One line per (workload, T): every route's time as a multiple of the plain step, and (e)'s G error."""
    keys = [k for k in R.ROUTES if any(k in c.rows for c in results.values())]
    short = {k: R.ROUTES[k][0].split(" ")[0] if R.ROUTES[k][0].startswith("(") else k for k in keys}
    lines = [
        "| workload | T | plain ms | " + " | ".join(short[k] for k in keys[1:])
        + " | (e)/floor | (b)/(e) | (e) G err |",
        "|---|---:|---:|" + "---:|" * (len(keys) - 1) + "---:|---:|---:|",
    ]
    for (wl, T), c in results.items():
        err = c.rows["gc"].g_err if "gc" in c.rows else None
        lines.append(
            f"| {wl} | {T} | {_f(c.ms('plain'), '.2f')} | "
            + " | ".join(_f(c.ratio(k), ".2f") for k in keys[1:])
            + f" | {_f(c.ratio('gc', 'floor'), '.2f')} | {_f(c.ms('naive') / c.ms('gc'), '.2f')} | {_f(err, '.1e')} |"
        )
    return lines


def check_lines(cs: list[Check]) -> list[str]:
    lines = ["| target | where | measured | limit | verdict | context |", "|---|---|---:|---:|---|---|"]
    for c in cs:
        spec = ".1e" if c.limit < 0.01 else ".2f"
        lines.append(
            f"| {c.target} | {c.where} | {_f(c.value, spec)} | {format(c.limit, spec)} | {c.verdict} | {c.context} |"
        )
    return lines


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


LOAD_AT_START = _load()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state(path: Path) -> str:
    """`` (git abc1234)`` or `` (git abc1234 + uncommitted changes)`` for a checkout, else ``""``."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "gradconflict"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {head}{' + uncommitted changes' if dirty else ''})"


def machine(device: torch.device, precision: str | None = None) -> list[str]:
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- platform: {platform.platform()}; python {platform.python_version()}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}",
        f"- load average (1/5/15 min) at start {LOAD_AT_START}, at end {_load()}: other jobs share these cores, so "
        "absolute times drift; every route of a table saw the same conditions (round-robin)",
        f"- torch {torch.__version__}; device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + (f"; every step under torch.autocast({precision})" if precision else "; float32"),
    ]
    try:
        import gradconflict

        where = Path(gradconflict.__file__).resolve().parent
        lines.append(f"- gradconflict {gradconflict.__version__} from {where}{_git_state(where.parent)}")
    except ImportError:
        pass
    try:
        import torchjd

        lines.append(f"- torchjd {getattr(torchjd, '__version__', None) or importlib.metadata.version('torchjd')}")
    except ImportError:
        lines.append("- torchjd: not installed (routes (d) skipped)")
    return lines


def markdown(
    results: dict[tuple[str, int], Config], device: torch.device, argv: list[str], total_s: float,
    precision: str | None = None,
) -> str:
    out = [
        "# gradconflict hot-path benchmark",
        "",
        "Generated by `benchmarks/run.py`; ratios, not absolute times, are the figures that matter "
        "(the machine is shared and noisy).",
        "",
        "## Machine",
        "",
        *machine(device, precision),
        "",
        "## Command",
        "",
        "```",
        " ".join(["python -m benchmarks.run", *argv]),
        "```",
        "",
        f"Total wall time {total_s:.0f} s.",
        "",
        "## Routes",
        "",
        "Each route is one full training step (forward included, `.grad` of every parameter filled with the "
        "gradient of the summed losses, `zero_grad(set_to_none=True)` untimed before each call) on its own copy "
        "of the same model and batch. Times: median over round-robin repetitions after warm-up. Peak mem: "
        "see benchmarks/timing.py (CPU: peak bytes held through torch's allocator above the step's start, from "
        "the profiler's memory events; CUDA: `max_memory_allocated` above the start), on the first call after the "
        "steps that time the strategies (routes (e) and (f): their steady state). G rel err: "
        "`max|G - G64| / max|G64|` against a float64 copy of the model (T separate `autograd.grad` calls); "
        "grad rel err: the same for the `.grad` of all parameters. Spread: (slowest - fastest) / median of the "
        "timed repetitions, a noise gauge (a table whose plain step shows a large spread was hit by other jobs).",
        "",
        *[f"- **{label}**: {definition}" for label, definition in R.ROUTES.values()],
        "",
        "## Targets",
        "",
        *check_lines(checks(results, fp32=precision is None)),
        "",
        "## Summary: time of each route as a multiple of the plain step (a)",
        "",
        *summary(results),
        "",
        "## Results",
        "",
    ]
    for (_, T), cfg in results.items():
        out += [f"### {cfg.workload.name}, T={T}: {cfg.workload.description}", "", *table(cfg), ""]
    analysis = HERE / "analysis.md"
    if analysis.exists():
        out += ["## Analysis", "", analysis.read_text().strip(), ""]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------------------- main
FULL_TASKS = (2, 4, 8, 16)
QUICK = (("mlp-b64", 4), ("mlp-b64", 16), ("mlp-b512", 4), ("cnn", 4))
#: the default suite: every workload at every T but the transformer at T=16 (about 100 s more on 2 cores; run it
#: with --workload transformer --tasks 16), and the peak-memory case at T=8 only
FULL = tuple(
    (w, T) for w in WORKLOADS if w not in (*REAL_SCALE, "wide-linear") for T in FULL_TASKS
    if (w, T) != ("transformer", 16)
) + (("wide-linear", 8),)
#: ``--full``: the suite above, then the models at real scale at T = 2, 4 and 8
REAL = tuple((w, T) for w in REAL_SCALE for T in (2, 4, 8))


def plan(args: argparse.Namespace) -> list[tuple[Workload, int]]:
    table_ = SMOKE if args.smoke else WORKLOADS
    names = args.workload or list(table_)
    for n in names:
        if n not in table_:
            sys.exit(f"unknown workload {n!r}; choose from {sorted(table_)}")
    if args.smoke:
        tasks = args.tasks or [3]
        return [(table_[n], T) for n in names for T in tasks]
    if not args.workload and not args.tasks:
        chosen = QUICK if args.quick else FULL + (REAL if args.full else ())
        return [(table_[n], T) for n, T in chosen]
    return [(table_[n], T) for n in names for T in (args.tasks or FULL_TASKS)]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a subset of workloads and T, fewer repetitions")
    p.add_argument("--full", action="store_true",
                   help="the default suite, then GPT-2 small and ResNet-50 at T = 2, 4, 8 (tens of minutes on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="every route once on tiny models; exit 1 on any failure")
    p.add_argument("--workload", nargs="+", help=f"workloads to run ({', '.join(WORKLOADS)}); with it or --tasks, "
                   "every chosen workload runs at every chosen T")
    p.add_argument("--tasks", nargs="+", type=int,
                   help=f"values of T (default {' '.join(map(str, FULL_TASKS))})")
    p.add_argument("--routes", nargs="+", choices=list(R.ROUTES),
                   help="routes to run (plain is always run; default all but the opt-in torchjd-b0, which costs "
                   "seconds per step)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--autocast", choices=list(AUTOCAST), default=None,
                   help="run every route's step under torch.autocast at this precision (default: float32)")
    p.add_argument("--warmup", type=int, default=None, help="discarded repetitions (default 2; quick 1)")
    p.add_argument("--reps", type=int, default=None, help="max timed repetitions (default 31; quick 9)")
    p.add_argument("--min-reps", type=int, default=5, help="min timed repetitions whatever the budget")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repetitions per (workload, T) (default 12; quick 6)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--output", type=Path, default=None,
                   help="markdown file to write (default benchmarks/RESULTS.md; not written by --smoke, "
                        "--quick or a filtered run unless given)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing routes")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if (args.quick or args.smoke) else 2
    if args.reps is None:
        args.reps = 9 if args.quick else 31
    if args.budget is None:
        args.budget = 6.0 if args.quick else 12.0
    args.min_reps = min(args.min_reps, args.reps)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    device = torch.device(args.device)
    wanted = args.routes or [k for k in R.ROUTES if k not in R.OPT_IN]
    keys = ["plain", *[k for k in R.ROUTES if k != "plain" and k in wanted]]
    start = time.perf_counter()
    results: dict[tuple[str, int], Config] = {}
    failures: list[str] = []
    strict = args.smoke and args.autocast is None  # under autocast, --smoke checks only that every route runs
    for wl, T in plan(args):
        cfg = run_config(wl, T, args, device, keys)
        results[(wl.name, T)] = cfg
        print(f"\n### {wl.name}, T={T}: {wl.description}  ({cfg.seconds:.1f} s)\n")
        print("\n".join(table(cfg)), flush=True)
        for key, row in cfg.rows.items():
            if row.status == "failed":
                failures.append(f"{wl.name} T={T} {key}: {row.note}")
            elif strict and key in R.EXACT and row.status == "ok":
                if row.g_err is None or row.g_err > SMOKE_TOL:
                    failures.append(f"{wl.name} T={T} {key}: G rel err {row.g_err} > {SMOKE_TOL}")
            if strict and row.status == "ok" and (row.grad_err is None or row.grad_err > SMOKE_TOL):
                failures.append(f"{wl.name} T={T} {key}: grad rel err {row.grad_err} > {SMOKE_TOL}")
    total = time.perf_counter() - start
    if not args.smoke:
        print("\n## Summary (x plain step)\n")
        print("\n".join(summary(results)))
        print("\n## Targets\n")
        print("\n".join(check_lines(checks(results, fp32=args.autocast is None))))
    print(f"\ntotal {total:.1f} s")
    output = args.output
    if output is None and not (args.smoke or args.quick or args.workload or args.tasks or args.routes):
        output = HERE / "RESULTS.md"
    if output is not None:
        output.write_text(markdown(results, device, argv, total, args.autocast))
        print(f"wrote {output}")
    if failures:
        print("\nFAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
