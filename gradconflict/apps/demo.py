"""``gradconflict demo``: the whole workflow on offline data: monitor, diagnose, compare, save.

The model reads two overlaid handwritten digits (:func:`gradconflict.fixtures.datasets.overlaid_digits`) through one
shared MLP backbone. Three tasks share it: ``left`` and ``right`` classify the two digits; ``contrary`` is built
to conflict with them: its head is the synthetic generators' frozen suppression readout (the mean of the shared
features; frozen, so it cannot absorb anything) and its target is -1 for every canvas, below anything the
non-negative (post-ReLU) features can reach, so its gradient pushes every shared feature down, away from what the
digit tasks need. Every step goes through :meth:`ConflictMonitor.backward`. Then the demo prints the final report, the
split advice, runs the comparison experiment (shared, independent, LoRA, branched at the advised point) with a
small budget, prints its table, reads the comparison back into the advice (the ceiling warning), and saves the
history (JSONL), the advice and the comparison (JSON) and the HTML report (``report.html``, which needs
matplotlib).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradconflict.diagnosis import Advice
from gradconflict.fixtures.datasets import MultiTaskData, overlaid_digits
from gradconflict.fixtures.synthetic import suppression_readout
from gradconflict.monitor import ConflictMonitor
from gradconflict.records.pairs import pair_key
from gradconflict.split import ComparisonResult, MultiTaskNet, compare

__all__ = ["DemoResult", "run_demo"]


def demo_data(n: int = 3000, seed: int = 0) -> MultiTaskData:
    """The overlaid digits, with the target of the third, conflicting task ``contrary``: -1 for every canvas."""
    data = overlaid_digits(n, seed=seed)
    return MultiTaskData(data.x, {**data.targets, "contrary": torch.full((len(data),), -1.0)})


def demo_model(in_features: int = 96, width: int = 128, seed: int | None = 0) -> MultiTaskNet:
    """A shared 3-layer MLP backbone, a linear classifier per digit and, for ``contrary``, the synthetic
    generators' frozen suppression readout (a fixed head cannot absorb the conflict: the backbone has to).

    Initialised from ``seed`` without touching the global RNG (restored after), or from the global RNG when
    ``seed`` is ``None`` (as ``compare(seed=...)`` seeds it)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(),
        )
        heads = {"left": nn.Linear(width, 10), "right": nn.Linear(width, 10), "contrary": suppression_readout(width)}
        return MultiTaskNet(backbone, heads)


def _contrary_loss(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output.squeeze(-1), target)


LOSS_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "left": F.cross_entropy,
    "right": F.cross_entropy,
    "contrary": _contrary_loss,
}


def _accuracy(output: Tensor, target: Tensor) -> float:
    return float((output.argmax(1) == target).float().mean())


def _neg_mse(output: Tensor, target: Tensor) -> float:
    return float(_contrary_loss(output, target))


METRICS = {"left": (_accuracy, "max"), "right": (_accuracy, "max"), "contrary": (_neg_mse, "min")}


@dataclass
class DemoResult:
    """What the demo produced: the monitor (with its history), held-out metrics, the advice, the comparison
    (``None`` when skipped) and the saved files."""

    monitor: ConflictMonitor
    metrics: dict[str, float]
    advice: Advice
    comparison: ComparisonResult | None
    files: dict[str, Path]
    seconds: float


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:

        class _Quiet:
            def update(self, n: int = 1) -> None: ...

            def set_postfix_str(self, s: str) -> None: ...

            def write(self, s: str) -> None:
                print(s)

        yield _Quiet()
        return
    # disable=None: a bar only on a terminal; captured output and logs get no carriage-return soup.
    with tqdm(total=total, desc="training", unit="step", leave=False, disable=None) as bar:
        yield bar


def run_demo(
    steps: int = 300,
    compare_steps: int = 200,
    batch_size: int = 64,
    out_dir: str | Path = "gradconflict-run",
    seed: int = 0,
    progress: bool = True,
    log_every: int | None = 50,
    echo: Any = print,
) -> DemoResult:
    """Train the demo model for ``steps`` steps under a :class:`ConflictMonitor`, print what it measured and
    the split advice, run the comparison experiment for ``compare_steps`` steps per variant (0 skips it), and
    save everything to ``out_dir``.

    ``progress`` shows progress bars on a terminal (never in captured output or a log); ``log_every`` prints a
    measured step's one-line summary every that many steps (``None``: none).

    >>> r = run_demo(steps=6, compare_steps=0, log_every=3, progress=False, out_dir=getfixture("tmp_path"),
    ...              echo=lambda s: None)
    >>> len(r.monitor.history), sorted(r.metrics), r.advice.verdict in ("keep_shared", "lora_split", "physical_split")
    (6, ['contrary', 'left', 'right'], True)
    """
    started = time.perf_counter()
    data = demo_data(seed=seed)
    train, test = data.split(0.8)
    model = demo_model(in_features=data.x[0].numel(), seed=seed)
    tasks = list(data.targets)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    echo(f"gradconflict demo: tasks {tasks} on {len(train)} overlaid-digit canvases, {steps} monitored steps")
    batches = train.batches(batch_size, seed=seed)
    with ConflictMonitor(model, shared=model.backbone) as monitor, _progress(steps, progress) as bar:
        say = bar.write if echo is print else echo  # tqdm.write keeps the bar intact
        for step in range(steps):
            x, y = next(batches)
            out = model(x)
            report = monitor.backward({t: LOSS_FNS[t](out[t], y[t]) for t in tasks})
            optimizer.step()
            optimizer.zero_grad()
            bar.update(1)
            if report is not None and log_every is not None and (step % log_every == 0 or step == steps - 1):
                say("  " + report.summary())
    model.eval()
    with torch.no_grad():
        out = model(test.x)
        metrics = {t: METRICS[t][0](out[t], test.targets[t]) for t in tasks}
    advice = monitor.advise(probe=test.x[:256])
    result = DemoResult(monitor, metrics, advice, None, {}, 0.0)
    echo(describe(result))
    echo("\nadvice, the evidence in brief:\n" + advice.summary())
    echo("\nadvice in full:\n" + str(advice))
    if compare_steps > 0:
        echo(f"\ncomparison experiment: {compare_steps} steps per variant")
        stream = train.batches(batch_size, seed=seed + 1)
        # one Delta-m% baseline for the table and the advice: the shared model, which the advice's gains are against
        result.comparison = dataclasses.replace(compare(
            lambda: demo_model(in_features=data.x[0].numel(), seed=None),  # compare(seed=) seeds the init
            LOSS_FNS,
            [next(stream) for _ in range(40)],
            steps=compare_steps,
            optimizer_factory=lambda params: torch.optim.Adam(params, lr=2e-3),
            eval_data=[(test.x, test.targets)],
            metrics=METRICS,
            branch_at=advice.branch_point or "backbone.5",
            groups=advice.groups if len(advice.groups) > 1 else [[t] for t in tasks],
            seed=seed,
            progress=progress,
        ), baseline="shared")
        echo(result.comparison.to_markdown())
        result.advice = monitor.advise(probe=test.x[:256], comparison=result.comparison)
        echo("\nthe advice, read again with the comparison (one seed: run more seeds to judge the spread):\n"
             + result.advice.summary())
    result.files = _save(result, Path(out_dir), echo)
    result.seconds = time.perf_counter() - started
    echo(f"\nsaved: {', '.join(str(p) for p in result.files.values())}   ({result.seconds:.0f} s)")
    return result


def _save(result: DemoResult, out_dir: Path, echo: Any) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"history": result.monitor.history.to_jsonl(out_dir / "history.jsonl")}
    files["advice"] = out_dir / "advice.json"
    files["advice"].write_text(json.dumps(result.advice.to_dict(), indent=2), encoding="utf-8")
    if result.comparison is not None:
        files["comparison"] = out_dir / "comparison.json"
        files["comparison"].write_text(json.dumps(result.comparison.to_dict(), indent=2), encoding="utf-8")
    try:
        from gradconflict.reporting.html import write_html

        files["report"] = write_html(
            result.monitor.history, out_dir / "report.html", advice=result.advice, comparison=result.comparison,
            title="gradconflict demo", source="overlaid digits and a conflicting synthetic task",
        )
    except ImportError as err:  # the rest of the run is still worth saving
        echo(f"\nreport.html not written: {err}")
    return files


def describe(result: DemoResult) -> str:
    """The final report's key figures and the per-layer conflict over the run."""
    history = result.monitor.history
    last = history.measured[-1]
    ema = {k: float(v) for k, v in history.ema.items()}
    rate = sum(float(r.conflict_fraction) > 0 for r in history.measured) / max(len(history.measured), 1)
    lines = [
        "",
        "final report:",
        f"  tasks                 {', '.join(last.tasks)}",
        f"  cosine                {_pairs(last.tasks, last.cosine)}",
        f"  conflict fraction     {float(last.conflict_fraction):.3f}   (EMA {ema['conflict_fraction']:.3f})",
        f"  cancellation          {float(last.cancellation):.3f}   (EMA {ema['cancellation']:.3f})",
        f"  alignment             {_named(last.tasks, last.alignment)}",
        f"  task norms            {_named(last.tasks, last.task_norms)}",
        f"  condition number      {float(last.condition_number):.3g}",
        f"  steps with a conflict {rate:.0%} of {len(history.measured)} measured",
        "  per layer (mean cosine over the run):",
    ]
    for name in sorted(last.layers):
        means = torch.stack([r.layers[name].cosine for r in history.measured if name in r.layers]).mean(0)
        lines.append(f"    {name:<12} {_pairs(last.tasks, means)}   ({last.layers[name].num_params} params)")
    lines.append(f"  held-out              {', '.join(f'{t} {m:.3f}' for t, m in result.metrics.items())}")
    lines.append("                        (accuracy for the digits, mean squared error for contrary)")
    return "\n".join(lines)


def _named(tasks: Any, values: Tensor) -> str:
    return ", ".join(f"{t} {v:+.3f}" for t, v in zip(tasks, values.tolist()))


def _pairs(tasks: Any, C: Tensor) -> str:
    T = len(tasks)
    return ", ".join(f"{pair_key(tasks[i], tasks[j])} {float(C[i, j]):+.3f}" for i in range(T) for j in range(i + 1, T))
