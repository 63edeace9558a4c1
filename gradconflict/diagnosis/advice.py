"""The answer to "should we split the shared backbone, where, and into which task groups?", with the evidence.

:func:`advise` reads a run's history (and, optionally, the model, a probe batch, an evaluation table, an exact
lookahead, the results of the comparison experiment) and returns an :class:`Advice`:

- ``physical_split``: some pair of tasks conflicts persistently (signal 1 says ``split``), on the whole backbone
  or only on some layers, and the layer profile finds the depth from which the layers conflict: copy the
  backbone from ``branch_point`` up, one copy per task group. A conflict confined to the upper layers is reason
  enough, however calm the whole backbone looks.
- ``lora_split``: some signal says ``split`` but there is no consistent depth to branch at (or the trouble is
  heavy heads, zero-sum evaluations or negative transference rather than diverging gradients): freeze the
  shared backbone and train one LoRA adapter per group.
- ``keep_shared``: no signal says ``split``; or the comparison experiment shows that no split lifts a ceiling
  (no gain above the 1% floor in a paired test across seeds that vary: capacity was not the limit), whatever
  the gradients say; or the conflict could not
  be measured (no step carried two tasks together, as in round-robin training; the reason says what to measure).

Verdict, branch point, groups and next step agree: the groups come from the affinity through the layers from
the branch point up (what the branches would share), and the next step runs exactly the split advised. The
:class:`Uncertainty` says how settled the verdict is: the p-value of the persistent conflict behind a split, or
"not enough steps yet: measure about N more".

Tasks are tracked by name: the diagnosis works on the sorted union of the task names over the measured steps
(:mod:`~gradconflict.diagnosis.aligned`), so the order of the losses dict never changes the advice, and steps
may carry a subset of the tasks (each pair is judged on the steps that carried both). Groups list their tasks in
sorted order, and the groups are sorted by their first task.

>>> import torch
>>> from gradconflict import ConflictReport, LayerReport
>>> fight, agree = torch.tensor([[1.0, -0.8], [-0.8, 1.0]]), torch.tensor([[1.0, 0.9], [0.9, 1.0]])
>>> layers = {"top": LayerReport("top", "ab", fight, num_params=10),
...           "bottom": LayerReport("bottom", "ab", agree * 3, num_params=10)}
>>> run = [ConflictReport("ab", fight + agree * 3, losses=torch.ones(2), layers=layers, step=s) for s in range(12)]
>>> advice = advise(run, layer_order=["bottom", "top"])    # the whole backbone agrees; the top layer does not
>>> advice.verdict, advice.branch_point, advice.groups, advice.uncertainty.decided
('physical_split', 'top', [['a'], ['b']], True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from gradconflict._strict_json import strict
from gradconflict.diagnosis.affinity import lookahead_transference, mean_transference, normalized
from gradconflict.diagnosis.aligned import Run, align, no_pair_reason
from gradconflict.diagnosis.conflicts import conflict_tests
from gradconflict.diagnosis.evaluations import Pairs
from gradconflict.diagnosis.groups import Grouping, group_tasks, magnitude_free
from gradconflict.diagnosis.persistence import CHANCE, PERSISTENT_RATE
from gradconflict.diagnosis.profile import Profile, layer_profile, share_from
from gradconflict.diagnosis.recon import ReconSelection, recon_layers
from gradconflict.diagnosis.signals import (
    ALARMS,
    MAGNITUDE_WEIGHTINGS,
    REWEIGHT,
    WARNINGS,
    PairFinding,
    Signal,
    ceiling,
    diverging_objectives,
    heavy_heads,
    magnitude_dominance,
    oscillating_conflict,
    oscillation_cause,
    single_point_of_risk,
    zero_sum,
)
from gradconflict.diagnosis.thresholds import Thresholds
from gradconflict.diagnosis.trends import QuantitySummary, summarize
from gradconflict.records.comparison import ComparisonResult
from gradconflict.records.history import EMA_DECAY, History
from gradconflict.records.pairs import pair_key, pair_words

__all__ = ["Advice", "Uncertainty", "advise", "advise_from_jsonl", "next_step_code"]

Verdict = Literal["keep_shared", "lora_split", "physical_split"]
DecidedBy = Literal["ceiling", "diverging", "heuristics", "none"]

_VARIANTS: dict[str, tuple[str, ...]] = {
    "physical_split": ("shared", "independent", "branched"),
    "lora_split": ("shared", "independent", "lora"),
    "keep_shared": ("shared", "independent"),
}


#: The share of the best branch's gain a higher branch point must recover to be the economical one.
RECOVERED_SHARE = 0.8
#: The most branch points the next step compares (spread evenly from the conflict onset to the top).
MAX_CANDIDATES = 4


def next_step_code(
    verdict: Verdict,
    branch_at: str | Sequence[str] | None,
    groups: Sequence[Sequence[str]],
    seeds: int = 3,
    conflict: bool = False,
    reweight: bool = False,
    *,
    steps: int | None = None,
    lr: float | None = None,
) -> str:
    """Python code defining ``next_step(history, model_factory, loss_fns, train_data, eval_data, metrics, ...)``,
    which runs the comparison experiment that checks this advice over ``seeds`` seeds and returns the advice with
    its outcome read back (the ``ceiling`` signal: the paired test across seeds). Every input is an argument.

    ``branch_at``: one branch point, or the candidate blocks to compare (from the conflict onset up: the advice's
    ``branch_point`` is then the highest block recovering :data:`RECOVERED_SHARE` of the best one's gain).
    ``steps`` and ``lr`` (the monitored run's budget) become the defaults of the function's ``steps`` and ``lr``;
    unknown (``None``), the printed call asks for them (``lr=...``) and the optimizer factory says what to pass.
    The code ends by calling the function on the inputs it names. Without ``eval_data`` (``None``), the function
    says that Delta-m is then measured on the training loss. The shared model and fully independent models are
    always compared (capacity is invisible to gradients). With ``conflict`` (diverging gradients), the shared
    model is also trained with conflict-aware updates (``upgrad``, ``pcgrad``); with ``reweight`` (one task's
    gradient dominates by its magnitude), with the magnitude-aware weightings
    (:data:`~gradconflict.diagnosis.signals.MAGNITUDE_WEIGHTINGS`):
    the cheaper cures, which a split must beat.

    >>> code = next_step_code("physical_split", ["backbone.2", "backbone.3"], [["a"], ["b"]], steps=400)
    >>> print([line for line in code.splitlines() if "for branch_at" in line][0].strip())
    for branch_at in ['backbone.2', 'backbone.3']
    >>> print(code.splitlines()[3].split("*, ")[1])
    lr=None, steps=400, seeds=3):
    >>> print(code.splitlines()[-2])
    advice = next_step(history, model_factory, loss_fns, train_data, eval_data, metrics, lr=...)
    """
    points = [branch_at] if branch_at is None or isinstance(branch_at, str) else list(branch_at)
    why = {
        "physical_split": "the shared model against one backbone copy per group, branching at "
        + (repr(points[0]) if len(points) == 1 else f"each of {points}"),
        "lora_split": "the shared model against a frozen shared backbone with one LoRA adapter per group",
        "keep_shared": "the shared model against fully independent models (capacity is invisible to gradients)",
    }[verdict]
    variants = _VARIANTS[verdict]
    weightings = (["upgrad", "pcgrad"] if conflict else []) + (list(MAGNITUDE_WEIGHTINGS) if reweight else [])
    lines = [
        "import torch",
        "from gradconflict import advise, compare",
        "",
        f"def next_step(history, model_factory, loss_fns, train_data, eval_data, metrics=None, *, lr={lr!r}, "
        f"steps={steps!r}, seeds={seeds}):",
        f'    """Compares {why}; returns advise(history, comparison=...).',
        "",
        "    history: the monitored run (monitor.history or a History); model_factory: () -> a fresh model whose",
        "    initialisation follows the global seed; loss_fns: {task: (output, target) -> loss}; train_data and",
        "    eval_data: re-iterable batches, eval_data held out; metrics: {task: (fn, 'max' | 'min')} (default:",
        "    each task's loss on eval_data); lr and steps: the monitored run's learning rate and budget.",
    ]
    if weightings:
        lines += [
            "    The shared model is also trained with " + ", ".join(weightings) + ": cheaper cures than a split,",
            "    which a split must beat ('upgrad', 'imtl-g', 'aligned-mtl' need pip install",
            "    'gradconflict[weighting]').",
        ]
    lines += [
        '    """',
        "    if eval_data is None:",
        '        print("no held-out eval_data: Delta-m is measured on the training loss, which favours memorising")',
        "",
        "    def optimizer_factory(params):",
        "        if not isinstance(lr, (int, float)) or steps is None:  # lr=... in the call: asked for",
        '            raise ValueError("pass lr= and steps=, the learning rate and the training steps of the "',
        '                             "monitored run (the history does not record them)")',
        "        return torch.optim.Adam(params, lr=lr)",
        "",
        "    results = [",
        "        compare(model_factory, loss_fns, train_data, steps=steps, optimizer_factory=optimizer_factory,",
        f"                eval_data=eval_data, metrics=metrics, variants={variants!r},",
        "                branch_at=" + ("branch_at" if len(points) > 1 else repr(points[0]))
        + f", groups={[list(g) for g in groups]!r},",
        f"                weightings={weightings!r}, seed=seed, progress=False)",
    ]
    if len(points) > 1:
        lines.append(f"        for branch_at in {points!r}")
    lines += [
        "        for seed in range(seeds)",
        "    ]",
        "    print(results[0].to_markdown())",
        "    return advise(history, comparison=results)",
        "",
        "",
        "advice = next_step(history, model_factory, loss_fns, train_data, eval_data, metrics"
        + (", lr=..." if lr is None else "") + ")",
        "print(advice)",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Uncertainty:
    """How settled a verdict is.

    Attributes:
        decided: False when more measured steps could still change the verdict (or nothing could be measured).
        statement: one sentence: what settles the verdict, or what to measure.
        p_value: the adjusted p-value of the persistent conflict behind a split (``None`` otherwise).
        steps_needed: measured steps to add, about, before the verdict is settled (``None`` when decided).
        training_steps_needed: the same in training steps (``steps_needed`` times ``k`` under ``every=k``).
        awaits: what would settle a provisional verdict: ``"steps"`` (more measured steps, for the persistence
            tests), ``"comparison"`` (the comparison experiment over seeds that vary: ``next_step``); empty when
            decided. A ``keep_shared`` with ``awaits == ("comparison",)`` is *provisional on capacity*: the
            gradients show no persistent conflict, and only the comparison can tell whether the shared backbone is
            too small for the tasks.
    """

    decided: bool
    statement: str
    p_value: float | None = None
    steps_needed: int | None = None
    training_steps_needed: int | None = None
    awaits: tuple[str, ...] = ()

    def __str__(self) -> str:
        return ("decided: " if self.decided else "provisional: ") + self.statement


@dataclass
class Advice:
    """Whether, where and how to split the shared backbone, with the evidence.

    Attributes:
        verdict: ``"keep_shared"``, ``"lora_split"`` or ``"physical_split"``.
        branch_point: the economical block from which the backbone becomes task-specific (``physical_split``
            only): with a comparison branched at several blocks, the highest block whose branched gain is confirmed
            by the paired test and recovers at least :data:`RECOVERED_SHARE` (80%) of the best block's gain; without
            one, :attr:`conflict_onset` (and ``next_step`` compares the candidate blocks from there up).
        groups: the task groups that should share a backbone (copy or adapter); one group for ``keep_shared``.
        signals: the :class:`~gradconflict.diagnosis.signals.Signal` s: the four warning signals, then the two
            warnings about what a split cannot cure (oscillating conflict, an unmoved ceiling). Look one up by
            name with :meth:`signal` (or :attr:`by_name`), not by position.
        next_step: Python code running the comparison experiment that checks this advice.
        reason: one sentence on why this verdict.
        uncertainty: how settled the verdict is (:class:`Uncertainty`).
        duplicated_share: share of the profiled backbone parameters a physical split at ``branch_point``
            duplicates (0 otherwise).
        profile: the layer conflict profile (``None`` when the reports have no layers).
        recon: Recon's top-K layers next to the branch point (``None`` without layers).
        grouping: the task grouping search (best partition per number of groups, with scores).
        trends: a summary (mean, EMA, windows, trend) of each aggregated quantity.
        decided_by: what decided the verdict: ``"ceiling"`` (the comparison experiment), ``"diverging"`` (a
            persistent conflict, signal 1), ``"heuristics"`` (other signals that say split) or ``"none"`` (no
            signal says split).
        conflict_onset: the layer where the persistent conflict starts (the profile's branch point; ``None``
            without one). Without a comparison branched at several blocks, ``branch_point`` is this layer.
        weighting: the update rule to train the shared model with (a :data:`gradconflict.weighting.METHODS`
            name), when the comparison showed a re-weighted shared model beating shared and no split beating it;
            else ``None``.
    """

    verdict: Verdict
    branch_point: str | None
    groups: list[list[str]]
    signals: list[Signal]
    next_step: str
    reason: str
    uncertainty: Uncertainty
    duplicated_share: float = 0.0
    profile: Profile | None = None
    recon: ReconSelection | None = None
    grouping: Grouping | None = None
    trends: dict[str, QuantitySummary] = field(default_factory=dict)
    decided_by: DecidedBy = "none"
    weighting: str | None = None
    conflict_onset: str | None = None

    @property
    def by_name(self) -> dict[str, Signal]:
        """The signals keyed by name (see :data:`~gradconflict.diagnosis.signals.SIGNALS`)."""
        return {s.name: s for s in self.signals}

    def signal(self, name: str) -> Signal:
        """The signal called ``name``; ``KeyError`` naming the signals for any other name."""
        try:
            return self.by_name[name]
        except KeyError:
            raise KeyError(f"no signal {name!r}; the signals are {[s.name for s in self.signals]}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) view; a value that could not be measured (NaN: a pair never measured
        together) is ``None``."""
        u = self.uncertainty
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "decided_by": self.decided_by,
            "weighting": self.weighting,
            "branch_point": self.branch_point,
            "conflict_onset": self.conflict_onset,
            "groups": self.groups,
            "reason": self.reason,
            "uncertainty": {
                "decided": u.decided, "statement": u.statement, "p_value": u.p_value,
                "steps_needed": u.steps_needed, "training_steps_needed": u.training_steps_needed,
                "awaits": list(u.awaits),
            },
            "duplicated_share": self.duplicated_share,
            "signals": [s.to_dict() for s in self.signals],
            "next_step": self.next_step,
            "trends": {
                k: {"mean": q.mean, "ema": q.ema, "first_window": q.first_window, "last_window": q.last_window,
                    "slope": q.trend.slope, "tau": q.trend.tau, "p_value": q.trend.p_value}
                for k, q in self.trends.items()
            },
        }
        if self.profile is not None:
            out["profile"] = {
                "branch_point": self.profile.branch_point,
                "alpha": self.profile.alpha,
                "layers": [
                    {"name": lp.name, "num_params": lp.num_params, "steps": lp.steps, "score": lp.score,
                     "status": lp.status, "worst_persistence": lp.worst_persistence,
                     "persistence": lp.persistence.tolist(), "mean_cosine": lp.mean_cosine.tolist(),
                     "together": None if lp.together is None else lp.together.tolist(),
                     "p_adjusted": None if lp.tests is None else lp.tests.p_adjusted.tolist(),
                     "tau": None if lp.tests is None else lp.tests.tau.tolist()}
                    for lp in self.profile.layers
                ],
            }
        if self.recon is not None:
            out["recon"] = {
                "layers": self.recon.layers, "scores": self.recon.scores, "k": self.recon.k,
                "window": list(self.recon.window),
            }
        if self.grouping is not None:
            out["grouping"] = {
                "method": self.grouping.method,
                "by_count": {str(k): {"groups": g, "score": s} for k, (g, s) in self.grouping.by_count.items()},
            }
        return strict(out)

    def summary(self) -> str:
        """The verdict and the evidence behind it in a few lines: the uncertainty, which layers conflict and how
        persistently, the branch point and Recon's layers, and which warning about what a split cannot cure
        applies.

        >>> import torch
        >>> from gradconflict import ConflictReport
        >>> fight = ConflictReport("ab", torch.tensor([[1.0, -0.9], [-0.9, 1.0]]), losses=torch.ones(2))
        >>> print(advise([fight] * 8).summary().splitlines()[1][:62])
        how persistent: tasks a/b conflict on 100% of 8 measured steps
        """
        lines = [f"verdict: {self.verdict} ({self.uncertainty})"]
        decisive = self.signal("diverging_objectives").finding
        if decisive is not None:
            lines.append(
                f"how persistent: tasks {pair_key(*decisive.pair)} conflict on {decisive.persistence:.0%} of "
                f"{decisive.steps} measured steps on {decisive.where} (conflict rate {decisive.rate:.0%} against "
                f"{CHANCE:.0%} for unrelated gradients; {decisive.effective_steps:.0f} effective steps)"
            )
        if self.profile is not None:
            conflicting = [lp.name for lp in self.profile.layers if lp.status == "conflict"]
            lines.append(
                "layers in persistent conflict: " + (", ".join(conflicting) if conflicting else "none")
                + (f"; branch point {self.branch_point} (duplicates {self.duplicated_share:.0%} of the backbone)"
                   if self.branch_point is not None else "")
            )
        if self.recon is not None and self.recon.layers:
            lines.append(f"Recon's top-{self.recon.k} layers: {', '.join(self.recon.layers)}")
        lines.append("groups: " + " | ".join("[" + ", ".join(g) + "]" for g in self.groups))
        warnings = [self.signal(name) for name in WARNINGS if name in self.by_name]
        lines += [f"warning {s.name} [{s.status}]: {s.evidence}" for s in warnings if s.status != "n/a"]
        if all(s.status == "n/a" for s in warnings) or not any(s.status != "ok" for s in warnings):
            lines.append(
                "warnings: the conflict does not oscillate at chance"
                + ("; no comparison experiment yet (run the next step)" if self.signal("ceiling").status == "n/a"
                   else "")
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The verdict box, the signals, the profile and the groups as HTML tables for Jupyter, those of the HTML report
        (:mod:`gradconflict.reporting.notebook`)."""
        from gradconflict.reporting.notebook import advice_html

        return advice_html(self)

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict} ({self.uncertainty})"]
        if self.branch_point is not None:
            lines.append(
                f"branch point: {self.branch_point} (duplicates {self.duplicated_share:.0%} of the profiled "
                "backbone parameters)"
            )
        lines.append("groups: " + " | ".join("[" + ", ".join(g) + "]" for g in self.groups))
        lines += [f"why: {self.reason}", "", "signals:"]
        lines += [f"  {s}" for s in self.signals]
        if self.profile is not None:
            lines += ["", "layer conflict profile (bottom to top; p: persistent conflict against chance):"]
            lines += ["  " + row for row in self.profile.table().splitlines()]
        if self.recon is not None:
            lines += [
                "",
                f"Recon's top-{self.recon.k} layers (S-conflict score over steps {self.recon.window[0]}.."
                f"{self.recon.window[1]}): " + (", ".join(f"{n} ({self.recon.scores[n]})" for n in self.recon.layers)
                                                or "none"),
            ]
        if self.grouping is not None:
            lines += ["", f"task groups ({self.grouping.method} search; score per number of groups):"]
            lines += [
                f"  {k}: {' | '.join('[' + ', '.join(g) + ']' for g in gs)}  score {s:+.3f}"
                for k, (gs, s) in self.grouping.by_count.items()
            ]
        if self.trends:
            lines += ["", "over training (mean, last window, Theil-Sen slope per step, Mann-Kendall p):"]
            lines += [
                f"  {k:<24} {q.mean:+.3f}  {q.last_window:+.3f}  {q.trend.slope:+.2e}  p={q.trend.p_value:.2g}"
                for k, q in self.trends.items()
            ]
        lines += ["", "next step:"] + ["  " + row for row in self.next_step.splitlines()]
        return "\n".join(lines)


def _more_steps(d: PairFinding, gap: int) -> Uncertainty | None:
    """What the persistence test of the closest undetermined pair still asks for (``None`` when it is settled)."""
    if d.outcome != "undetermined":
        return None
    if not math.isfinite(d.steps_needed):  # no number of steps would settle it at this rate
        return Uncertainty(
            False, f"tasks {pair_key(*d.pair)} on {d.where} sit on the edge of a persistent conflict",
            awaits=("comparison",),
        )
    n = int(d.steps_needed)
    return Uncertainty(
        False,
        f"not enough steps yet: measure about {n} more steps"
        + (f" ({n * gap} training steps at every={gap})" if gap > 1 else "")
        + f" to tell whether tasks {pair_words(*d.pair)} conflict persistently on {d.where} "
        f"({d.persistence:.0%} of {d.steps} steps so far, {d.effective_steps:.1f} effective steps)",
        steps_needed=n,
        training_steps_needed=n * gap,
        awaits=("steps", "comparison"),
    )


def _uncertainty(verdict_from: DecidedBy, diverging: Signal, alarms: Sequence[str], gap: int) -> Uncertainty:
    """How settled the verdict is, from what decided it (``gap``: training steps between measured steps).

    Decided only by the comparison over seeds that vary, or by the persistence tests on enough effective steps (a
    persistent conflict behind a split); heuristic signals alone, an unsettled test, or gradients that show no
    conflict (capacity is then unjudged) leave the verdict provisional, with what would settle it."""
    if verdict_from == "ceiling":
        return Uncertainty(True, "measured: the comparison experiment's paired test over seeds that vary decided it")
    d = diverging.finding
    if verdict_from == "diverging" and d is not None:
        return Uncertainty(
            True,
            f"tasks {pair_words(*d.pair)} conflict persistently on {d.where} (p = {d.p_adjusted:.2g}, adjusted over "
            f"{d.family} pair tests, on {d.effective_steps:.0f} effective steps)",
            p_value=d.p_adjusted,
        )
    if diverging.status == "n/a" or d is None:
        return Uncertainty(
            False, f"the conflict could not be measured: {diverging.evidence}", awaits=("steps", "comparison")
        )
    more = _more_steps(d, gap)
    if verdict_from == "heuristics":
        statement = (
            f"only heuristic thresholds say split ({', '.join(alarms)}), not a test: the comparison experiment "
            "(next_step, over seeds that vary) confirms or rejects it"
        )
        if more is not None:
            return Uncertainty(
                False, f"{statement}; {more.statement}", steps_needed=more.steps_needed,
                training_steps_needed=more.training_steps_needed, awaits=more.awaits,
            )
        return Uncertainty(False, statement, awaits=("comparison",))
    if more is not None:
        return more
    return Uncertainty(
        False,
        f"provisional on capacity: every pair's conflict rate is significantly below a persistent conflict's "
        f"({PERSISTENT_RATE:.0%}) or its conflict weaker than small, so the gradients show no conflict; but "
        "capacity (a backbone too small for the tasks) is invisible to gradients and only the comparison "
        "experiment can judge it: run next_step (shared against independent)",
        awaits=("comparison",),
    )


def _first_layer(profile: Profile | None, branch: str | None) -> int | None:
    """The position in the profile of the first layer at ``branch`` (a layer's name, or a block's path whose layers
    start with it), or ``None``."""
    if profile is None or branch is None:
        return None
    for k, lp in enumerate(profile.layers):
        if lp.name == branch or lp.name.startswith(branch + "."):
            return k
    return None


def _block_paths(model: nn.Module | None) -> list[str] | None:
    """The model's backbone blocks as :func:`~gradconflict.split.branch` reads them, bottom to top (``None``
    without a model following the split tools' convention)."""
    if model is None:
        return None
    # Lazily: the split floor sits above the diagnosis, and the blocks must be the ones branch() copies.
    from gradconflict.split.model import backbone_blocks

    try:
        return [path for path, _ in backbone_blocks(model)]
    except (TypeError, ValueError):
        return None


def _height(block: str, blocks: list[str] | None, profile: Profile | None) -> int:
    """Position of a branch point, bottom to top: a block index, or the block (else the first profiled layer)
    that a path names; -1 when unknown."""
    if block.isdigit():
        return int(block)
    for k, path in enumerate(blocks or []):
        if block == path or block.startswith(path + "."):
            return k
    layer = _first_layer(profile, block)
    return -1 if layer is None else layer


def _economical(
    by_block: Mapping[str, Mapping[str, Any]], blocks: list[str] | None, profile: Profile | None
) -> str | None:
    """The rule for the economical branch point: among the blocks whose branched gain the paired test confirms,
    the highest one whose mean gain is at least :data:`RECOVERED_SHARE` of the best block's (``None`` without a
    comparison branched at two blocks or more, or when no block's gain is confirmed)."""
    confirmed = {b: v["mean"] for b, v in by_block.items() if v["beyond"] is True}
    if len(by_block) < 2 or not confirmed:
        return None
    best = max(confirmed.values())
    enough = [b for b, gain in confirmed.items() if gain >= RECOVERED_SHARE * best]
    return max(enough, key=lambda b: _height(b, blocks, profile))


def _candidates(onset: str, blocks: list[str] | None, profile: Profile | None) -> list[str]:
    """Branch points to compare, from the conflict onset up: the model's blocks from the onset's (else the
    profiled layers from the onset), at most :data:`MAX_CANDIDATES`, spread evenly with both ends kept."""
    if blocks:
        k = _height(onset, blocks, None)
        above = blocks[k:] if k >= 0 else [onset]
    else:
        first = _first_layer(profile, onset)
        above = [lp.name for lp in profile.layers[first:]] if profile is not None and first is not None else [onset]
    keep = np.unique(np.linspace(0, len(above) - 1, min(MAX_CANDIDATES, len(above))).round().astype(int))
    return [above[int(k)] for k in keep]


def _duplicated_share(model: nn.Module | None, at: str | None) -> float | None:
    """What :func:`~gradconflict.split.branch` copies when branching ``model`` at ``at`` (``None`` when it cannot
    be counted: no model following the convention, or a branch point naming no block)."""
    if model is None or at is None:
        return None
    from gradconflict.split.branch import duplicated_share  # lazily: the split floor sits above the diagnosis

    try:
        return duplicated_share(model, at=at)
    except (TypeError, ValueError):
        return None


def _groups(
    verdict: Verdict, tasks: list[str], affinity: np.ndarray, th: Thresholds, max_groups: int | None
) -> tuple[list[list[str]], Grouping]:
    grouping = group_tasks(
        magnitude_free(affinity), tasks, max_groups=max_groups, tolerance=th.group_tolerance,
        min_groups=2 if verdict != "keep_shared" else 1,
    )
    if verdict == "keep_shared":
        return [tasks], grouping
    return (grouping.groups if len(grouping.groups) > 1 else [[t] for t in tasks]), grouping


def advise(
    history: Run,
    *,
    model: nn.Module | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    backbone: nn.Module | None = None,
    probe: Any = None,
    evaluations: Sequence[Mapping[str, float]] | Any = None,
    directions: Mapping[str, str] | None = None,
    evaluation_pairs: Pairs = "consecutive",
    layer_order: Sequence[str] | None = None,
    thresholds: Thresholds | Mapping[str, Any] | None = None,
    lr: float = 1.0,
    lookahead: Callable[[], Mapping[str, Tensor]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    comparison: ComparisonResult | Sequence[ComparisonResult] | None = None,
    recon_k: int | None = None,
    recon_window: tuple[int, int] | None = None,
    max_groups: int | None = None,
    ema_decay: float = EMA_DECAY,
) -> Advice:
    """Diagnose a run and advise whether, where and how to split its shared backbone.

    Tasks are tracked by name, in sorted order: the key order of the losses dicts never matters, and steps may
    carry a subset of the tasks (partial labels: each pair is judged on the steps that carried both) or a single
    one (round-robin training: without a step carrying two tasks, the conflict cannot be measured, the gradient
    signals are ``n/a`` and the reason says what to measure). Raises ``ValueError`` when no step was measured.

    Args:
        history: the run (a :class:`~gradconflict.History`, any iterable of reports, or an
            :class:`~gradconflict.diagnosis.aligned.Aligned`).
        model: the model, for the layer order and, with ``.heads``/``.backbone``, the heavy-heads signal.
        heads: task -> head module (default ``model.heads``).
        backbone: the backbone module (default ``model.backbone``); also the shared parameters of the lookahead.
        probe: a batch for ``model(probe)``: measures how much each head rewrites the backbone's features.
        evaluations: per-task metrics across evaluations or runs (list of dicts or DataFrame) for signal 3.
        directions: ``{metric: "max" | "min"}``, the direction of each evaluation metric (required with
            ``evaluations``: no metric is assumed to be higher-is-better).
        evaluation_pairs: ``"consecutive"`` (evaluations over time) or ``"all"`` (unordered runs).
        layer_order: layer names bottom to top (default: order in ``model.named_modules()``, else natural).
        thresholds: a :class:`Thresholds` (used as is) or a dict of overrides of the defaults; with a dict (or
            ``None``) that does not set ``conflict_cosine``, ``S`` is the threshold the reports were measured
            with (``ConflictMonitor(threshold=...)``, 0 by default).
        lr: step size of the first-order transference ``lr G_ij / L_j`` (and of the exact lookahead's SGD step).
        lookahead: a closure returning ``{task: loss}`` of ``model`` on one fixed batch: computes TAG's exact
            lookahead transference on the shared parameters for signal 4 and the grouping (needs ``model``).
        optimizer: the run's optimizer, for the lookahead's step (TAG steps with the run's optimizer).
        comparison: the comparison experiment's results (:func:`~gradconflict.split.compare`, one per seed): the
            ``ceiling`` signal, which overrides the gradients when the paired test across seeds that vary finds no
            split beating shared.
        recon_k: how many layers Recon's selection names (default: the layers in persistent conflict).
        recon_window: first and last training step whose measurements Recon scores (default: all).
        max_groups: most task groups considered (default: the number of tasks).
        ema_decay: per-step decay of the EMAs in :attr:`Advice.trends`.
    """
    aligned = align(history)  # once: every part below reads these arrays
    if not aligned.num_steps:
        raise ValueError("the history has no measured step: run some steps under a ConflictMonitor first")
    if not isinstance(thresholds, Thresholds) and "conflict_cosine" not in (thresholds or {}):
        # The run was measured with a conflict threshold (the monitor's `threshold=`): judge it by the same S.
        thresholds = {**(thresholds or {}), "conflict_cosine": aligned.threshold}
    th = Thresholds.from_mapping(thresholds)
    tasks = list(aligned.tasks)
    exact = None
    if lookahead is not None:
        if model is None:
            raise ValueError("lookahead= needs model= (the lookahead steps the model's shared parameters)")
        exact = lookahead_transference(model, lookahead, lr, shared=backbone, optimizer=optimizer)
        missing = sorted(set(tasks) - set(exact[0]))
        if missing:
            raise ValueError(f"the lookahead closure returned no loss for task(s) {missing} of the history")
    tests = conflict_tests(aligned, th.conflict_cosine, th.alpha)
    signals = [
        diverging_objectives(aligned, th, tests=tests),
        heavy_heads(model=model, heads=heads, backbone=backbone, probe=probe, thresholds=th),
        zero_sum(aligned, evaluations=evaluations, directions=directions, pairs=evaluation_pairs, thresholds=th),
        single_point_of_risk(aligned, lr=lr, lookahead=exact, thresholds=th),
        oscillating_conflict(aligned, th, tests=tests),
        ceiling(comparison),
        magnitude_dominance(aligned, th),
    ]
    by_name = {s.name: s for s in signals}
    diverging, oscillating, measured_ceiling, dominance = (
        by_name["diverging_objectives"], by_name["oscillating_conflict"], by_name["ceiling"],
        by_name["magnitude_dominance"],
    )
    weighting = None
    profile = (
        layer_profile(aligned, model=model, layer_order=layer_order, thresholds=th, tests=tests)
        if aligned.layers else None
    )
    branch = profile.branch_point if profile is not None else None
    alarms = [name for name in ALARMS if by_name[name].status == "split"]
    verdict: Verdict
    decided_by: DecidedBy
    if measured_ceiling.status == "ok":  # a paired test over two seeds or more that vary found no gain
        verdict, branch, decided_by = "keep_shared", None, "ceiling"
        reason = measured_ceiling.evidence
        weighting = measured_ceiling.details.get("weighting")
        if alarms:
            reason += f" (although {', '.join(alarms)} say(s) split)"
    elif diverging.status == "split" and branch is not None and diverging.finding is not None:
        verdict, decided_by = "physical_split", "diverging"
        reason = (
            f"{diverging.finding.sentence()}: the layers conflict persistently from {branch} up; give each task "
            "group its own copy of the backbone from there"
        )
    elif measured_ceiling.status == "split":
        winners = measured_ceiling.details["winners"]
        decided_by = "ceiling"
        if "branched" in winners and measured_ceiling.details["branch_at"] is not None:
            verdict, branch = "physical_split", str(measured_ceiling.details["branch_at"])
        elif "independent" in winners and profile is not None and profile.layers:
            verdict, branch = "physical_split", profile.layers[0].name
        else:
            verdict, branch = "lora_split", None
        reason = measured_ceiling.evidence
    elif alarms:
        verdict, branch = "lora_split", None
        decided_by = "diverging" if "diverging_objectives" in alarms else "heuristics"
        where = (
            "no consistent depth to branch at"
            if "diverging_objectives" in alarms
            else "the gradients do not conflict persistently"
        )
        reason = (
            f"{', '.join(alarms)} say(s) split but {where}: freeze the shared backbone and train one LoRA adapter "
            "per group"
        )
    else:
        verdict, branch, decided_by = "keep_shared", None, "none"
        watching = [
            s.name for s in signals if s.status == "watch" and s.name not in ("oscillating_conflict", *REWEIGHT)
        ]
        reason = "no signal says split" + (f"; keep an eye on {', '.join(watching)}" if watching else "")
        if oscillating.status == "watch":
            reason += f"; {oscillation_cause(oscillating.pairs)}: the conflict oscillates"
        if dominance.status == "watch":
            dominated = ", ".join(pair_key(*p) for p in dominance.pairs)
            reason += (
                f"; but one task's gradient dominates by its magnitude ({dominated}): try a magnitude-aware "
                f"weighting first ({', '.join(MAGNITUDE_WEIGHTINGS)}, in the next step's comparison), and split only "
                "if the comparison shows a split beating it"
            )
    onset = profile.branch_point if profile is not None else None
    blocks = _block_paths(model)
    candidates: list[str] = []
    if verdict == "physical_split" and branch is not None:
        by_block = measured_ceiling.details.get("by_block") or {}
        economical = _economical(by_block, blocks, profile)
        if economical is not None:
            branch = economical
            reason += (
                f"; the economical branch point is {economical}: the highest block whose branched gain recovers "
                f"{RECOVERED_SHARE:.0%} of the best block's"
            )
        elif not by_block:
            candidates = _candidates(branch, blocks, profile)
    unmeasured = no_pair_reason(aligned) if len(tasks) > 1 else None
    counts = aligned.pair_counts()
    never = [pair_key(a, b) for k, a in enumerate(tasks) for m, b in enumerate(tasks) if k < m and counts[k, m] == 0]
    if unmeasured is not None:
        reason += f"; but that says little: {unmeasured}"
    elif never:
        reason += (
            f"; tasks {', '.join(never)} were never measured together (their affinity counts as neutral in the "
            "grouping): measure steps that carry every task to judge them"
        )
    start = _first_layer(profile, branch) if verdict == "physical_split" else None
    if exact is not None:
        order = [list(exact[0]).index(t) for t in tasks]
        affinity = normalized(np.asarray(exact[1], dtype=np.float64))[np.ix_(order, order)]
    elif profile is not None and start is not None:
        affinity = normalized(mean_transference(aligned, lr, layers=[lp.name for lp in profile.layers[start:]]))
    else:
        affinity = normalized(mean_transference(aligned, lr))
    groups, grouping = _groups(verdict, tasks, affinity, th, max_groups)
    if verdict == "keep_shared":
        code_groups: list[list[str]] = [[t] for t in tasks]  # the check: fully independent models
    else:
        code_groups = groups
    recon = None
    if profile is not None:
        k = recon_k if recon_k is not None else sum(lp.status == "conflict" for lp in profile.layers)
        recon = recon_layers(aligned, k, threshold=th.conflict_cosine, window=recon_window)
    share = _duplicated_share(model, branch) if verdict == "physical_split" and blocks else None
    if share is None:
        share = 0.0 if profile is None else share_from(profile.layers, start)
    return Advice(
        verdict=verdict,
        branch_point=branch,
        groups=groups,
        signals=signals,
        next_step=next_step_code(
            verdict, candidates if len(candidates) > 1 else branch, code_groups, conflict=diverging.status == "split",
            reweight=dominance.status == "watch", steps=int(aligned.steps.max()) + 1,
            lr=float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None,
        ),
        reason=reason,
        uncertainty=_uncertainty(decided_by, diverging, alarms, aligned.step_gap),
        duplicated_share=share,
        profile=profile,
        recon=recon,
        grouping=grouping,
        trends=summarize(aligned, decay=ema_decay, threshold=th.conflict_cosine),
        decided_by=decided_by,
        weighting=weighting,
        conflict_onset=onset,
    )


def advise_from_jsonl(path: str | Path, **kwargs: Any) -> Advice:
    """:func:`advise` on a history saved with ``History.to_jsonl`` (what ``gradconflict advise RUN.jsonl``
    runs); ``kwargs`` go to :func:`advise`."""
    return advise(History.from_jsonl(path), **kwargs)
