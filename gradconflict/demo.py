"""``gradconflict demo``: monitor the training of a small multi-task model on offline data, end to end.

The model reads two overlaid handwritten digits (see :func:`gradconflict.datasets.overlaid_digits`) through
one shared backbone with a head per task. Every step goes through :meth:`ConflictMonitor.backward`; the demo
prints a conflict summary as it trains, the last report's key figures and per-layer conflict, and saves the
history as JSONL in the output folder.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradconflict.datasets import overlaid_digits
from gradconflict.monitor import ConflictMonitor

__all__ = ["DemoResult", "run_demo"]


class DigitsNet(nn.Module):
    """A shared MLP backbone over the canvas, one linear head per task; ``forward`` returns ``{task: logits}``."""

    def __init__(self, tasks: list[str], in_features: int = 96, width: int = 128) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(width, 10) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.backbone(x)
        return {t: head(h) for t, head in self.heads.items()}


@dataclass
class DemoResult:
    """What the demo produced: the monitor (with its history), held-out accuracy per task, and the saved files."""

    monitor: ConflictMonitor
    accuracy: dict[str, float]
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
    with tqdm(total=total, desc="training", unit="step", leave=False) as bar:
        yield bar


def run_demo(
    steps: int = 300,
    batch_size: int = 64,
    out_dir: str | Path = "gradconflict-run",
    seed: int = 0,
    progress: bool = True,
    log_every: int = 50,
    echo: Any = print,
) -> DemoResult:
    """Train the digits model for ``steps`` steps under a :class:`ConflictMonitor`, print what it measured,
    and save the history to ``out_dir/history.jsonl``.

    >>> result = run_demo(steps=4, progress=False, log_every=2, out_dir=getfixture("tmp_path"), echo=lambda s: None)
    >>> len(result.monitor.history), sorted(result.accuracy)
    (4, ['left', 'right'])
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    data = overlaid_digits(3000, seed=seed)
    train, test = data.split(0.8)
    tasks = list(data.targets)
    model = DigitsNet(tasks, in_features=data.x[0].numel())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    echo(f"gradconflict demo: {len(tasks)} tasks {tasks}, {len(train)} training canvases, {steps} steps")
    batches = train.batches(batch_size, seed=seed)
    with ConflictMonitor(model, shared=model.backbone) as monitor, _progress(steps, progress) as bar:
        say = bar.write if echo is print else echo  # tqdm.write keeps the bar intact
        for step in range(steps):
            x, y = next(batches)
            out = model(x)
            report = monitor.backward({t: loss_fn(out[t], y[t]) for t in tasks})
            optimizer.step()
            optimizer.zero_grad()
            bar.update(1)
            if report is not None:
                bar.set_postfix_str(f"conflict={float(report.conflict_fraction):.2f}")
                if step % log_every == 0 or step == steps - 1:
                    say("  " + report.summary())
    model.eval()
    with torch.no_grad():
        out = model(test.x)
        accuracy = {t: float((out[t].argmax(1) == test.targets[t]).float().mean()) for t in tasks}
    out_dir = Path(out_dir)
    files = {"history": monitor.history.to_jsonl(out_dir / "history.jsonl")}
    result = DemoResult(monitor, accuracy, files, time.perf_counter() - started)
    echo(describe(result))
    return result


def describe(result: DemoResult) -> str:
    """The final report's key figures, the per-layer conflict, and where the run was saved."""
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
    for name in last.layers:
        cos = [float(r.layers[name].cosine[0, 1]) for r in history.measured if name in r.layers]
        lines.append(f"    {name:<14} {sum(cos) / len(cos):+.3f}   params {last.layers[name].num_params}")
    lines.append(f"  held-out accuracy     {', '.join(f'{t} {a:.3f}' for t, a in result.accuracy.items())}")
    lines.append(f"saved: {', '.join(str(p) for p in result.files.values())}   ({result.seconds:.1f} s)")
    return "\n".join(lines)


def _named(tasks: Any, values: Tensor) -> str:
    return ", ".join(f"{t} {v:+.3f}" for t, v in zip(tasks, values.tolist()))


def _pairs(tasks: Any, C: Tensor) -> str:
    T = len(tasks)
    return ", ".join(f"{tasks[i]}/{tasks[j]} {float(C[i, j]):+.3f}" for i in range(T) for j in range(i + 1, T))
