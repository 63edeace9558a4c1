"""Benchmark of conflict-aware steps: each weighting through gradconflict's monitor, against TorchJD 0.18 with the
same aggregator (autojac: ``mtl_backward`` + ``jac_to_grad``; autogram: ``Engine`` + the weighting) and against
the naive loop of T backwards plus the method.

    python -m benchmarks.weighting                  # MLP B=64 at T=4 and 16, every method; writes WEIGHTING.md
    python -m benchmarks.weighting --smoke          # every route once on a tiny MLP; exit 1 on an error or a shared
                                                    # .grad off TorchJD's mtl_backward by > 1e-4
    python -m benchmarks.weighting --methods upgrad cagrad --tasks 4 --workload mlp-b512 --output /tmp/w.md

Every route is one full training step (forward, the route's gradient work, ``.grad`` of every parameter) on its
own copy of the same model and batch, timed round-robin with the plain step (``sum(losses).backward()``) and the
measured step without a weighting (``monitor.backward(losses)``); see benchmarks/timing.py.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.routes import Skip, shared_params
from benchmarks.run import machine
from benchmarks.timing import median, round_robin, spread
from benchmarks.workloads import SMOKE, WORKLOADS, MultiTask, Workload, task_losses

HERE = Path(__file__).resolve().parent
METHODS = ("upgrad", "mgda", "cagrad", "pcgrad", "imtl-g", "aligned-mtl", "nash-mtl", "dualproj")
KINDS = {
    "gc": "gradconflict `monitor.backward(losses, weighting=m)`: measured step + the method on its Gram + one "
    "routed backward",
    "autojac": "TorchJD `mtl_backward(losses, features=h)` + `jac_to_grad(backbone, aggregator)`",
    "autogram": "TorchJD `Engine(backbone).compute_gramian(losses)` + weighting + `losses.backward(weights)` "
    "(heads get w_i times their gradient, TorchJD's autogram recipe)",
    "naive": "T `autograd.grad(L_i, backbone + head_i)`, `J @ J.T`, the method, `.grad` = `J^T w` (heads: their own)",
}
SMOKE_TOL = 1e-4


def _aggregator(method: str, T: int) -> object:
    try:
        from torchjd import aggregation as A
    except ImportError as e:
        raise Skip(f"TorchJD not installed ({e})") from e
    return {
        "upgrad": A.UPGrad, "mgda": A.MGDA, "cagrad": lambda: A.CAGrad(c=0.4), "pcgrad": A.PCGrad,
        "imtl-g": A.IMTLG, "aligned-mtl": A.AlignedMTL, "nash-mtl": lambda: A.NashMTL(n_tasks=T),
        "dualproj": A.DualProj,
    }[method]()


def _features_and_losses(model: MultiTask, x: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
    h = model.backbone(x)
    return h, list(task_losses({k: head(h) for k, head in model.heads.items()}, targets).values())


def build(
    kind: str, method: str | None, model: MultiTask, x: Tensor, targets: dict[str, Tensor]
) -> tuple[Callable[[], object], Callable[[], None]]:
    """Route ``kind`` with ``method`` (``None``: no weighting) on ``model``: ``(one step, closer)``."""
    T = len(targets)
    if kind == "plain":
        return (lambda: sum(task_losses(model(x), targets).values()).backward()), (lambda: None)
    if kind == "gc":
        from gradconflict import ConflictMonitor

        monitor = ConflictMonitor(model, shared=model.backbone)
        return (lambda: monitor.backward(task_losses(model(x), targets), weighting=method)), monitor.close
    if kind == "naive":
        from gradconflict.weighting import make_weighting

        weighting, shared = make_weighting(method), shared_params(model)
        heads = {k: [p for p in h.parameters() if p.requires_grad] for k, h in model.heads.items()}

        def naive() -> None:
            losses = task_losses(model(x), targets)
            rows = []
            for i, (k, loss) in enumerate(losses.items()):
                grads = torch.autograd.grad(loss, shared + heads[k], retain_graph=i < T - 1)
                rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
                for p, g in zip(heads[k], grads[len(shared):]):
                    p.grad = g
            J = torch.stack(rows)
            w = weighting(J @ J.T, {k: v.item() for k, v in losses.items()}).to(J)
            update = w @ J
            for p, g in zip(shared, update.split([p.numel() for p in shared])):
                p.grad = g.view_as(p)

        return naive, (lambda: None)
    aggregator = _aggregator(method, T)
    if kind == "autojac":
        from torchjd.autojac import jac_to_grad, mtl_backward

        def autojac() -> None:
            h, losses = _features_and_losses(model, x, targets)
            mtl_backward(losses, features=h)
            jac_to_grad(shared_params(model), aggregator)

        return autojac, (lambda: None)
    from torchjd.autogram import Engine

    from gradconflict.weighting.peers import gram_factor

    engine = Engine(model.backbone, batch_dim=None)
    of_gram = getattr(aggregator, "gramian_weighting", None)

    def autogram() -> None:
        losses = torch.stack(_features_and_losses(model, x, targets)[1])
        gram = engine.compute_gramian(losses)
        with torch.no_grad():
            weights = of_gram(gram) if of_gram is not None else aggregator.weighting(gram_factor(gram))
        losses.backward(weights)

    return autogram, (lambda: None)


@dataclass
class Row:
    """One method: its routes' median times (with the plain and the measured step of the same round-robin), their
    spreads, and each route's shared ``.grad`` error against autojac's."""

    method: str
    ms: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)
    err: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ratio(self, kind: str, to: str = "plain") -> float:
        return self.ms.get(kind, float("nan")) / self.ms.get(to, float("nan"))


def _shared_grad(model: MultiTask) -> Tensor:
    return torch.cat([p.grad.flatten() for p in shared_params(model)])


def run_config(wl: Workload, T: int, methods: list[str], args: argparse.Namespace) -> tuple[int, list[Row]]:
    """Each method's routes, checked against autojac after a first step, then timed round-robin with the plain
    and the measured step (one round-robin per method: few routes, so many repetitions each)."""
    base = wl.model(T)
    x, targets = wl.data(T)
    baselines = {}
    for kind in ("plain", "measured"):
        model = copy.deepcopy(base)
        baselines[kind] = (model, *build("gc" if kind == "measured" else kind, None, model, x, targets))
    rows, failed = [], 0
    for method in methods:
        row, routes, reference = Row(method), dict(baselines), None
        for kind in ("autojac", "gc", "autogram", "naive"):
            model = copy.deepcopy(base)
            try:
                step, closer = build(kind, method, model, x, targets)
                with torch.random.fork_rng():
                    torch.manual_seed(0)  # TorchJD's PCGrad draws its orders from the global generator
                    step()  # warm-up and correctness
            except Skip as e:
                row.notes.append(f"{kind} skipped: {e}")
                continue
            except Exception as e:  # noqa: BLE001 -- a failing route is reported, the others still run
                row.notes.append(f"{kind} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                failed += 1
                continue
            grad = _shared_grad(model)
            if kind == "autojac":
                reference = grad
            elif reference is not None:
                row.err[kind] = float((grad - reference).norm() / reference.norm().clamp_min(1e-30))
            routes[kind] = (model, step, closer)
        if not args.smoke:
            times = round_robin(
                {k: r[1] for k, r in routes.items()}, warmup=args.warmup, reps=args.reps, device=torch.device("cpu"),
                before={k: (lambda m=r[0]: m.zero_grad(set_to_none=True)) for k, r in routes.items()},
                budget_s=args.budget, min_reps=5,
            )
            for kind, ts in times.items():
                row.ms[kind], row.spread[kind] = median(ts) * 1e3, spread(ts)
        for kind, route in routes.items():
            if kind not in baselines:
                route[2]()
        rows.append(row)
    for route in baselines.values():
        route[2]()
    return failed, rows


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| method | plain ms | measured x plain | gradconflict x plain | x measured | TorchJD autojac x plain "
        "| TorchJD autogram x plain | naive loop x plain | gc / autojac | gc / autogram | gc / naive "
        "| plain spread | shared .grad rel err vs autojac (gc, autogram, naive) | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        errs = ", ".join(_f(r.err.get(k), ".1e") for k in ("gc", "autogram", "naive"))
        notes = r.notes + (["random task orders differ between routes"] if r.method == "pcgrad" else [])
        lines.append(
            f"| {r.method} | {_f(r.ms.get('plain'), '.2f')} | {_f(r.ratio('measured'), '.2f')} "
            f"| {_f(r.ratio('gc'), '.2f')} | {_f(r.ratio('gc', 'measured'), '.2f')} "
            f"| {_f(r.ratio('autojac'), '.2f')} | {_f(r.ratio('autogram'), '.2f')} | {_f(r.ratio('naive'), '.2f')} "
            f"| {_f(r.ratio('gc', 'autojac'), '.2f')} | {_f(r.ratio('gc', 'autogram'), '.2f')} "
            f"| {_f(r.ratio('gc', 'naive'), '.2f')} | {_f(100 * r.spread.get('plain', float('nan')), '.0f')}% "
            f"| {errs} | {'; '.join(notes)} |"
        )
    return lines


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.weighting", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every route once on a tiny MLP; exit 1 on any failure")
    p.add_argument("--workload", nargs="+", default=None, help=f"workloads ({', '.join(WORKLOADS)}); default mlp-b64")
    p.add_argument("--tasks", nargs="+", type=int, default=None, help="numbers of tasks (default 4 16; smoke 3)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--warmup", type=int, default=2, help="discarded repetitions")
    p.add_argument("--reps", type=int, default=21, help="max timed repetitions")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed repetitions per method (about)")
    p.add_argument("--output", type=Path, default=HERE / "WEIGHTING.md", help="where the Markdown report goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    warnings.filterwarnings("ignore", message=".*not DPP")  # cvxpy, at each of Nash-MTL's solves
    table_ = SMOKE if args.smoke else WORKLOADS
    names = args.workload or ["mlp-b64"]
    tasks = args.tasks or ([3] if args.smoke else [4, 16])
    start = time.perf_counter()
    sections, failed = [], 0
    for name in names:
        wl = table_[name]
        for T in tasks:
            config_failed, rows = run_config(wl, T, args.methods, args)
            failed += config_failed
            worst = max((e for r in rows for k, e in r.err.items() if not (r.method == "pcgrad" and T > 2)),
                        default=0.0)
            print(f"{wl.name} T={T}: {config_failed} failed route(s), worst shared .grad rel err {worst:.1e}")
            if args.smoke:
                failed += worst > SMOKE_TOL
                continue
            sections += [f"### {wl.name}, T={T}: {wl.description}", "", *table(rows), ""]
    if args.smoke:
        return int(failed > 0)
    command = " ".join(["python -m benchmarks.weighting", *argv])
    text = "\n".join([
        "# Conflict-aware steps: gradconflict's weighting against TorchJD and the naive loop",
        "",
        "Generated by `benchmarks/weighting.py`; ratios from one run, not absolute times, are the figures that "
        "matter (the machine is shared and noisy).",
        "",
        "## Machine and command",
        "",
        *machine(torch.device("cpu")),
        f"- command: `{command}`; total wall time {time.perf_counter() - start:.0f} s",
        "",
        "## Routes",
        "",
        "Each route is one full training step of the same model and batch on its own copy (forward included, "
        "`zero_grad(set_to_none=True)` untimed before each call). Each method's four routes are timed round-robin "
        "with the plain step (`sum(losses).backward()`) and the measured step without a weighting "
        "(`monitor.backward(losses)`), one round-robin per method; medians after warm-up, ratios within a row. "
        "gradconflict, autojac and the naive loop give each head its own task's gradient; autogram scales it by "
        "the task's weight. The rel err column compares the backbone's `.grad` with autojac's after each route's "
        "first step (float32).",
        "",
        *[f"- **{kind}**: {text}" for kind, text in KINDS.items()],
        "",
        "## Results",
        "",
        *sections,
    ])
    args.output.write_text(text + "\n")
    print(f"wrote {args.output}")
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
