"""A whole run in a few tables: what ``gradconflict report`` prints and the HTML report's tables show.

:func:`summarize_run` reads a run (a :class:`~gradconflict.History`, a JSONL path's history, or any iterable of
reports) and gives a :class:`RunSummary`: how many steps were measured or skipped and which tasks and pairs they
carried; the mean, first- and last-window means and trend of each run-level quantity; for each pair of tasks its
mean cosine and persistence (the share of the steps carrying both on which it conflicts); for each task its mean
gradient norm and alignment with the update; and the layer conflict profile with its branch point.

Everything follows the diagnosis (:mod:`gradconflict.diagnosis`): tasks in sorted order, each pair over the steps
that carried both tasks, each pair quantity over the steps that carried two tasks or more.

>>> import torch
>>> from gradconflict import ConflictReport
>>> run = [ConflictReport("ab", torch.tensor([[1.0, c], [c, 4.0]]), step=s) for s, c in enumerate([1.0, -1.0, -1.0])]
>>> summary = summarize_run(run)
>>> pair = summary.pairs[0]
>>> pair.name, pair.tasks, pair.together, round(pair.mean_cosine, 4), round(pair.persistence, 4)
('a/b', ('a', 'b'), 3, -0.1667, 0.6667)
>>> print(summary.text().splitlines()[0])
3 steps (3 measured, 0 skipped), steps 0 to 2; tasks a, b; a pair conflicts when its cosine < 0
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from gradconflict.diagnosis.aligned import Aligned, align, masked_mean, no_pair_reason
from gradconflict.diagnosis.profile import Profile, layer_profile
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import QuantitySummary, summarize
from gradconflict.measure.report import ConflictReport
from gradconflict.records.history import History
from gradconflict.records.pairs import pair_key

__all__ = ["PairSummary", "RunSummary", "TaskSummary", "summarize_run"]

#: The run-level quantities of the summary, with the words the tables use.
QUANTITIES = {
    "conflict_fraction": "conflict fraction",
    "cancellation": "cancellation",
    "worst_cosine": "worst pair cosine",
}


@dataclass(frozen=True)
class PairSummary:
    """One pair of tasks over the run (NaN where the two were never measured together).

    Attributes:
        name: the pair's key (:func:`~gradconflict.records.pairs.pair_key`, ``"a/b"``).
        together: measured steps that carried both tasks.
        mean_cosine: mean cosine over those steps.
        persistence: share of those steps on which the pair conflicts (``cosine < S``).
        last_cosine: mean cosine over the last quarter of those steps.
        tasks: the two task names, sorted.
    """

    name: str
    together: int
    mean_cosine: float
    persistence: float
    last_cosine: float
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSummary:
    """One task over the run.

    Attributes:
        name: the task.
        steps: measured steps that carried it.
        mean_norm: mean gradient norm on the shared parameters.
        mean_alignment: mean cosine with the update (over the steps that carried it and another task).
        against: share of those steps on which the update worked against it (alignment < 0).
    """

    name: str
    steps: int
    mean_norm: float
    mean_alignment: float
    against: float


@dataclass(frozen=True)
class RunSummary:
    """A run's summary (see the module docstring); ``text()`` is what ``gradconflict report`` prints.

    Attributes:
        steps: reports in the run (measured and skipped).
        measured: measured reports.
        skipped: skip reason -> number of steps.
        first_step: first training step measured (``-1`` without a measured step).
        last_step: last training step measured.
        tasks: the task names, sorted.
        threshold: the conflict cosine ``S`` the run was measured with.
        steps_with_pairs: measured steps that carried two tasks or more.
        task_steps: steps carrying each task, in the order of ``tasks``.
        quantities: mean, EMA, windows and trend of each run-level pair quantity (over the steps that carried a
            pair).
        mean_update_norm: mean norm of the update over the measured steps.
        pairs: one :class:`PairSummary` per pair of tasks.
        task_rows: one :class:`TaskSummary` per task.
        profile: the layer conflict profile (``None`` when the reports carry no layers).
        no_pair: why no pair quantity could be measured (``None`` when some step carried two tasks).
        earlier: steps of the run that came before the kept ones and are in none of these figures (a History
            keeps its last ``max_history`` steps; ``History.from_jsonl``, and so ``gradconflict report``, keeps
            every step of the file).
    """

    steps: int
    measured: int
    skipped: dict[str, int]
    first_step: int
    last_step: int
    tasks: tuple[str, ...]
    threshold: float
    steps_with_pairs: int
    task_steps: tuple[int, ...]
    quantities: dict[str, QuantitySummary]
    mean_update_norm: float
    pairs: list[PairSummary]
    task_rows: list[TaskSummary]
    profile: Profile | None
    no_pair: str | None
    earlier: int = 0

    @property
    def partial(self) -> bool:
        """True when some measured step lacked some task (partial labels, round-robin training)."""
        return any(n < self.measured for n in self.task_steps)

    def coverage(self) -> list[str]:
        """Lines on which steps the figures cover: that they are the last steps of a longer run, when the
        history dropped some (:attr:`earlier`), and which tasks and pairs the measured steps carried, when some
        step lacked some task (else none)."""
        lines = []
        if self.earlier:
            lines.append(
                f"these are the last {self.steps} steps of a run of {self.steps + self.earlier}: the history kept "
                "no more (max_history); read the run's JSONL file for all of them"
            )
        if not self.partial:
            return lines
        S = self.measured
        lines.append(
            "tasks (measured steps carrying each): "
            + ", ".join(f"{t} {n}" for t, n in zip(self.tasks, self.task_steps))
            + f" of {S}"
        )
        if len(self.tasks) > 1:
            lines.append(
                f"pairs measured together: {', '.join(f'{p.name} {p.together}' for p in self.pairs)} of {S}; "
                f"{self.steps_with_pairs} of {S} measured steps carried two tasks or more"
            )
        if self.no_pair is not None and len(self.tasks) > 1:
            lines.append(f"warning: {self.no_pair}")
        return lines

    def text(self) -> str:
        """The summary as plain-text tables."""
        skipped = sum(self.skipped.values())
        why = "; ".join(f"{n} {reason}" for reason, n in self.skipped.items())
        lines = [
            f"{self.steps} steps ({self.measured} measured, {skipped} skipped{': ' + why if why else ''}), "
            f"steps {self.first_step} to {self.last_step}; tasks {', '.join(self.tasks)}; a pair conflicts when "
            f"its cosine < {self.threshold:.3g}",
            *self.coverage(),
            "",
            f"{'over the run':<20} {'mean':>8} {'first 1/4':>10} {'last 1/4':>9} {'trend/step':>11} {'p':>7}",
        ]
        for key, words in QUANTITIES.items():
            q = self.quantities.get(key)
            if q is None:
                lines.append(f"{words:<20} {'-':>8}   (no step carried two tasks)")
            else:
                lines.append(
                    f"{words:<20} {q.mean:>+8.3f} {q.first_window:>+10.3f} {q.last_window:>+9.3f} "
                    f"{q.trend.slope:>+11.2e} {q.trend.p_value:>7.2g}"
                )
        trend = next((q.trend for q in self.quantities.values() if q.trend.n < q.trend.steps), None)
        if trend is not None:
            lines.append(
                f"{'':<20} (trend and p of {trend.n} means of bins of consecutive steps, {trend.steps} steps)"
            )
        lines.append(f"{'update norm':<20} {self.mean_update_norm:>8.3g}")
        if self.pairs:
            lines += ["", f"{'pair':<24} {'steps':>6} {'mean cos':>9} {'conflicts on':>13} {'last 1/4 cos':>13}"]
            lines += [
                f"{p.name:<24} {p.together:>6} {_num(p.mean_cosine, '+9.3f')} {_num(p.persistence, '13.0%')} "
                f"{_num(p.last_cosine, '+13.3f')}"
                for p in self.pairs
            ]
        lines += ["", f"{'task':<24} {'steps':>6} {'mean |g|':>9} {'alignment':>10} {'update against it':>18}"]
        lines += [
            f"{t.name:<24} {t.steps:>6} {_num(t.mean_norm, '9.3g')} {_num(t.mean_alignment, '+10.3f')} "
            f"{_num(t.against, '18.0%')}"
            for t in self.task_rows
        ]
        if self.profile is not None:
            lines += ["", "layer conflict profile (bottom to top; persistence of each layer's worst pair):"]
            lines += ["  " + row for row in self.profile.table().splitlines()]
            where = self.profile.branch_point or "none (no depth from which the layers conflict)"
            lines.append(f"  branch point: {where}")
        return "\n".join(lines)


def _num(value: float, spec: str) -> str:
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return f"{'-':>{width}}" if not np.isfinite(value) else format(value, spec)


def _pairs(aligned: Aligned, threshold: float) -> list[PairSummary]:
    T = len(aligned.tasks)
    together = aligned.together
    counts = together.sum(0)
    conflicts = aligned.conflicts(threshold).sum(0)
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
    cosine = aligned.cosine_pairs(pairs)  # [S, P]: the pairs alone, not the [S, T, T] (a long run has millions)
    out = []
    for (i, j), series in zip(pairs, cosine.T):
        both = series[together[:, i, j]]
        last = both[len(both) - max(1, len(both) // 4) :]
        out.append(
            PairSummary(
                name=pair_key(aligned.tasks[i], aligned.tasks[j]),
                together=int(counts[i, j]),
                mean_cosine=float(both.mean()) if len(both) else float("nan"),
                persistence=float(conflicts[i, j] / counts[i, j]) if counts[i, j] else float("nan"),
                last_cosine=float(last.mean()) if len(last) else float("nan"),
                tasks=(aligned.tasks[i], aligned.tasks[j]),
            )
        )
    return out


def _tasks(aligned: Aligned) -> list[TaskSummary]:
    norms = masked_mean(aligned.task_norms, aligned.present)
    paired = aligned.present & aligned.multi[:, None]
    alignment = masked_mean(aligned.alignment, paired)
    with np.errstate(invalid="ignore"):
        against = masked_mean((aligned.alignment < 0).astype(np.float64), paired)
    return [
        TaskSummary(t, int(aligned.present[:, k].sum()), float(norms[k]), float(alignment[k]), float(against[k]))
        for k, t in enumerate(aligned.tasks)
    ]


def summarize_run(
    run: History | Iterable[ConflictReport], *, profile: Profile | None = None, aligned: Aligned | None = None
) -> RunSummary:
    """The :class:`RunSummary` of a run. ``profile``: a layer profile already computed (e.g. ``advice.profile``);
    by default one is computed from the reports (layers in the run's own order, bottom to top, which a saved run
    keeps), with the run's own conflict threshold. ``aligned``: the run's :func:`~gradconflict.diagnosis.align`,
    when the caller has it already (a History is otherwise read through its stacked records, without a report per
    step). Raises ``ValueError`` when no step was measured."""
    earlier = 0
    if isinstance(run, History):
        steps, skipped = len(run), Counter(reason for _, reason in run.skipped_steps())
        earlier = run.steps_seen - steps
    else:
        reports = list(run)
        steps, skipped = len(reports), Counter(r.skip_reason for r in reports if r.skipped)
        run = reports
    aligned = aligned if aligned is not None else align(run)
    if not aligned.num_steps:
        raise ValueError("the run has no measured step: run some steps under a ConflictMonitor first")
    S = aligned.threshold
    if profile is None and aligned.layers:
        profile = layer_profile(aligned, thresholds=Thresholds(conflict_cosine=S))
    return RunSummary(
        steps=steps,
        measured=aligned.num_steps,
        skipped=dict(skipped),
        first_step=int(aligned.steps[0]),
        last_step=int(aligned.steps[-1]),
        tasks=aligned.tasks,
        threshold=S,
        steps_with_pairs=int(aligned.multi.sum()),
        task_steps=tuple(int(n) for n in aligned.present.sum(0)),
        quantities={k: v for k, v in summarize(aligned, threshold=S).items() if k in QUANTITIES},
        mean_update_norm=float(aligned.update_norm.mean()),
        pairs=_pairs(aligned, S),
        task_rows=_tasks(aligned),
        profile=profile,
        no_pair=no_pair_reason(aligned),
        earlier=earlier,
    )
