"""Cost of per-sample attribution: a measured step with ``sample_ids`` against the same measured step without.

    python -m benchmarks.attribution                         # MLP, CNN, transformer at T=4; writes ATTRIBUTION.md
    python -m benchmarks.attribution --workload gpt2-small --tasks 4 --output /tmp/a.md
    python -m benchmarks.attribution --smoke                 # every route once on tiny models; exit 1 on an error
    python -m benchmarks.attribution --accumulation 4        # each step one group of 4 micro-batches

Like every benchmark here it measures the *installed* gradconflict (benchmarks/__init__.py); to measure a
checkout's own copy, import it first: ``python -c "import gradconflict, sys; from benchmarks.attribution import
main; sys.exit(main(sys.argv[1:]))" --smoke``.

Routes, each one full training step (forward, the route's gradient work, ``.grad`` of every parameter) on its
own copy of the same model and batch, timed round-robin (benchmarks/timing.py: medians after warm-up):

* plain: ``sum(losses).backward()``;
* measured: ``monitor.backward(losses)`` (``strategy="auto"``: the faster of the batched pass and the per-task
  loop for this shape);
* measured, batched: the same with ``strategy="batched"``;
* attributed: ``monitor.backward(losses, sample_ids=ids)`` (``strategy="auto"``: the faster of the batched pass
  and the per-task loop whose taps report each task's output gradients, timed apart for attributed steps).

The figure the issue sets a target for (at most 1.15) is attributed / measured. Every route runs
``2 * TRIALS`` steps before it is timed, so that both automatic choices are settled.

With ``--accumulation K``, a step is one group of K micro-batches (the workload's batch cut into K), each
monitored route with ``accumulation_steps=K`` and the plain route K backward calls: an attributed group holds each
micro-batch's tapped inputs and output gradients until its end, and attributes them against the group's gradients.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.run import machine
from benchmarks.timing import fmt_bytes, median, peak_memory, round_robin, spread
from benchmarks.workloads import SMOKE, WORKLOADS, Workload, task_losses
from gradconflict import ConflictMonitor
from gradconflict.measure.engine.tapped import TRIALS

HERE = Path(__file__).resolve().parent
ROUTES = ("plain", "measured", "measured-batched", "attributed")
DEFAULT_WORKLOADS = ("mlp-b64", "cnn", "transformer")


Part = tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]


def micro_batches(x: torch.Tensor, targets: dict[str, torch.Tensor], k: int) -> list[Part]:
    """The batch cut into ``k`` equal micro-batches: ``(x, targets, ids)`` each."""
    if x.shape[0] % k:
        raise SystemExit(f"--accumulation {k} does not divide the batch of {x.shape[0]}")
    size = x.shape[0] // k
    cuts = [slice(i * size, (i + 1) * size) for i in range(k)]
    return [(x[c], {t: y[c] for t, y in targets.items()}, torch.arange(x.shape[0])[c]) for c in cuts]


def build(
    route: str, wl: Workload, T: int, parts: list[Part]
) -> tuple[Callable[[], None], ConflictMonitor | None, torch.nn.Module]:
    """``(step, monitor, model)`` of one route on a fresh copy of the workload's model; a step runs every
    micro-batch of ``parts`` (one, without accumulation)."""
    model = wl.model(T)
    if route == "plain":
        def plain() -> None:
            for x, targets, _ in parts:
                torch.stack(list(task_losses(model(x), targets).values())).sum().backward()

        return plain, None, model
    strategy = "batched" if route == "measured-batched" else "auto"
    monitor = ConflictMonitor(model, shared=model.backbone, strategy=strategy, accumulation_steps=len(parts))

    def step() -> None:
        for x, targets, ids in parts:
            losses = task_losses(model(x), targets)
            report = monitor.backward(losses, sample_ids=ids if route == "attributed" else None)
        if route == "attributed":
            assert report is not None and report.samples is not None and report.samples.residual < 1e-3

    return step, monitor, model


def run(wl: Workload, T: int, args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Each route's timing and peak memory, and the strategy each monitored route settled on."""
    parts = micro_batches(*wl.data(T), args.accumulation)
    built = {r: build(r, wl, T, parts) for r in ROUTES}
    out: dict[str, dict[str, float]] = {r: {} for r in ROUTES}
    for r, (step, _, model) in built.items():
        for _ in range(2 * TRIALS):  # the auto strategy times its candidates on its first steps
            step()
            model.zero_grad(set_to_none=True)
        out[r]["peak"] = peak_memory(step, torch.device("cpu")) or 0
        model.zero_grad(set_to_none=True)
    if not args.smoke:
        times = round_robin(
            {r: b[0] for r, b in built.items()}, warmup=args.warmup, reps=args.reps, device=torch.device("cpu"),
            before={r: (lambda m=b[2]: m.zero_grad(set_to_none=True)) for r, b in built.items()},
            budget_s=args.budget, min_reps=5,
        )
        for r, ts in times.items():
            out[r]["ms"], out[r]["spread"] = median(ts) * 1e3, spread(ts)
    chosen = {
        r: ", ".join(str(c["strategy"]) for c in monitor.plan["choices"]) or monitor.plan["strategy"]
        for r, (_, monitor, _) in built.items()
        if monitor is not None
    }
    for _, monitor, _ in built.values():
        if monitor is not None:
            monitor.close()
    return out, chosen


def table(
    wl: Workload, T: int, res: dict[str, dict[str, float]], chosen: dict[str, str], accumulation: int
) -> list[str]:
    group = f", one group of {accumulation} micro-batches a step" if accumulation > 1 else ""
    lines = [
        f"### {wl.name}, T={T}{group}: {wl.description}", "",
        "| route | ms / step | x plain | x measured | spread | peak mem |", "|---|---|---|---|---|---|",
    ]
    for r in ROUTES:
        ms = res[r]["ms"]
        lines.append(
            f"| {r} | {ms:.1f} | {ms / res['plain']['ms']:.2f} | {ms / res['measured']['ms']:.2f} | "
            f"{res[r]['spread']:.2f} | {fmt_bytes(int(res[r]['peak']))} |"
        )
    ratio = res["attributed"]["ms"] / res["measured-batched"]["ms"]
    settled = "; ".join(f"{r}: {s}" for r, s in chosen.items())
    return [*lines, "", f"attributed / measured-batched: {ratio:.2f}; strategies: {settled}", ""]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attribution", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="every route once on tiny models; exit 1 on an error")
    p.add_argument("--workload", nargs="+", default=None, help=f"workloads ({', '.join(WORKLOADS)})")
    p.add_argument("--tasks", nargs="+", type=int, default=[4])
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (accumulation_steps)")
    p.add_argument("--warmup", type=int, default=2, help="discarded repetitions")
    p.add_argument("--reps", type=int, default=21, help="max timed repetitions")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timed repetitions per table (about)")
    p.add_argument("--output", type=Path, default=HERE / "ATTRIBUTION.md", help="where the Markdown report goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    table_ = SMOKE if args.smoke else WORKLOADS
    names = args.workload or (list(SMOKE) if args.smoke else list(DEFAULT_WORKLOADS))
    start = time.perf_counter()
    sections = []
    for name in names:
        for T in args.tasks:
            res, chosen = run(table_[name], T, args)
            if not args.smoke:
                sections += table(table_[name], T, res, chosen, args.accumulation)
                print("\n".join(sections[-(len(ROUTES) + 7):]), flush=True)
    if args.smoke:
        return 0
    text = "\n".join([
        "# Per-sample attribution: the cost of `sample_ids` on a measured step",
        "",
        "Generated by `benchmarks/attribution.py` (its docstring describes the routes); ratios from one run, not "
        "absolute times, are the figures that matter (the machine is shared and noisy). Peak mem: "
        "benchmarks/timing.py.",
        "",
        "## Machine and command",
        "",
        *machine(torch.device("cpu")),
        "",
        "```",
        " ".join(["python -m benchmarks.attribution", *argv]),
        "```",
        "",
        f"Total wall time {time.perf_counter() - start:.0f} s.",
        "",
        "## Results",
        "",
        *sections,
    ])
    args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
