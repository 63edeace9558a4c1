"""The advice side: what a user of gradconflict is told on each problem, and whether it matches the truth.

For each problem, the shared model of one seed (0 by default) trains for the problem's budget on the truth's
batches of that seed with
every step measured by a :class:`~gradconflict.ConflictMonitor`, and ``gradconflict.advise(history, model=...)``
reads the run: the **first look**. Then the advice's ``next_step`` is run as printed, with the problem's own
inputs: ``model_factory`` (a fresh model from torch's global generator, which ``compare`` seeds),
``loss_fns``, ``train_data`` (the same batches), ``eval_data`` (the held-out set), ``metrics`` (held-out accuracy
or mean squared error) and ``history``; every ``compare`` call it makes runs with the problem's budget (steps,
Adam at its learning rate) whatever the printed code says, and the advice it asks for with the comparison
(``advise(history, comparison=results)``) is read with ``model=`` too: the **advice after next_step**.
``next_step`` may be code (a string, or an object with a ``code`` string) or a callable taking those inputs by
name.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import gradconflict
from gradconflict import ConflictMonitor, advise
from gradconflict.diagnosis import Advice

from .problems import Problem
from .truth import Truth, canonical


@dataclass
class Reading:
    """One reading of the advice, as plain values."""

    verdict: str
    block: str | None  # the branch point's block (``backbone.k``)
    branch_point: str | None
    groups: list[list[str]]
    decided: bool
    uncertainty: str
    weighting: str | None = None  # the update rule the advice says to train the shared model with

    @classmethod
    def of(cls, advice: Advice) -> Reading:
        return cls(
            advice.verdict, block_of(advice.branch_point), advice.branch_point, canonical(advice.groups),
            advice.uncertainty.decided, str(advice.uncertainty), advice.weighting,
        )


@dataclass
class AdviceOutcome:
    """The advice on one problem and how it scores against the truth."""

    name: str
    first: Reading
    after: Reading | None
    error: str | None  # why there is no reading after next_step
    seconds: float
    scores: dict[str, bool | None] = field(default_factory=dict)


def block_of(layer: str | None) -> str | None:
    """``"backbone.2.1.weight"`` -> ``"backbone.2"``: the block a layer belongs to (the problems' backbones are
    ``nn.Sequential`` s of blocks)."""
    if layer is None:
        return None
    parts = layer.split(".")
    return ".".join(parts[:2]) if parts[0] == "backbone" and len(parts) > 1 else layer


def _inputs(problem: Problem, seed: int) -> dict[str, Any]:
    """What a next step may ask for, built from the problem (the batches of ``seed``)."""
    batches = [(problem.x[i], {t: y[i] for t, y in problem.y.items()}) for i in problem.batch_indices(seed)]
    return {
        "model_factory": lambda: problem.build(None),
        "loss_fns": problem.loss_fns(),
        "train_data": batches,
        "eval_data": [(problem.x_test, problem.y_test)],
        "metrics": problem.metrics(),
    }


def monitored_run(problem: Problem, seed: int = 0) -> tuple[ConflictMonitor, torch.nn.Module]:
    """The shared model of ``seed``, trained for the budget on that seed's batches with every step measured."""
    model = problem.model(seed)
    loss_fns = problem.loss_fns()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=problem.lr)
    with ConflictMonitor(model, max_history=None) as monitor:
        for idx in problem.batch_indices(seed):
            out = model(problem.x[idx])
            optimizer.zero_grad()
            monitor.backward({t: fn(out[t], problem.y[t][idx]) for t, fn in loss_fns.items()})
            optimizer.step()
    return monitor, model


def follow_next_step(
    problem: Problem, first: Advice, history: Any, model: torch.nn.Module, seed: int = 0
) -> Advice:
    """Run ``first.next_step`` with the problem's inputs (the batches of ``seed``) and budget; the advice it reads
    with the comparison."""
    inputs = {**_inputs(problem, seed), "history": history}
    real_compare, real_advise = gradconflict.compare, gradconflict.advise
    seen: dict[str, Any] = {}

    def compare(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(
            steps=problem.steps, progress=False, eval_data=inputs["eval_data"], metrics=inputs["metrics"],
            optimizer_factory=lambda params: torch.optim.Adam(params, lr=problem.lr),
        )
        return real_compare(*args, **kwargs)

    def advise_with_model(*args: Any, **kwargs: Any) -> Advice:
        kwargs.setdefault("model", model)
        seen["advice"] = real_advise(*args, **kwargs)
        return seen["advice"]

    step = first.next_step
    code = step if isinstance(step, str) else getattr(step, "code", None)
    gradconflict.compare, gradconflict.advise = compare, advise_with_model  # what `from gradconflict import` gets
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if isinstance(code, str):
                namespace = dict(inputs)
                exec(compile(code, f"<next_step of {problem.name}>", "exec"), namespace)  # noqa: S102
                results = namespace.get("results")
            elif callable(step):
                wanted = inspect.signature(step).parameters
                results = step(**{k: v for k, v in inputs.items() if k in wanted})
            else:
                raise TypeError(f"next_step is a {type(step).__name__}: neither code nor a callable")
    finally:
        gradconflict.compare, gradconflict.advise = real_compare, real_advise
    if "advice" in seen:
        return seen["advice"]
    if isinstance(results, Advice):
        return results
    if results is None:
        raise RuntimeError("the next step neither asked for the advice nor left `results`")
    return real_advise(history, model=model, comparison=results)


def cured(truth: Truth, reading: Reading) -> bool:
    """Is ``reading`` a keep_shared with a re-weighting the truth accepts: the weighting it names, or the loss
    normalisation (``balanced``), beats shared and recovers most of the best split's gain (see :mod:`.truth`)?"""
    return (reading.verdict == "keep_shared" and reading.weighting is not None
            and any(f"keep_shared+{c}" in truth.verdicts for c in (reading.weighting, "balanced")))


def score(truth: Truth, reading: Reading | None) -> dict[str, bool | None]:
    """Verdict, branch point (economical, and within the acceptable blocks; problems whose truth branches) and
    groups, against the truth (``None``: not scored). A keep_shared with an accepted re-weighting (:func:`cured`)
    counts for the verdict, its one group for the groups, and has no branch point to score."""
    if reading is None:
        return {"verdict": None, "economical": None, "acceptable_block": None, "groups": None}
    cure = cured(truth, reading)
    branches = not cure and (truth.verdict == "physical_split" or "physical_split" in truth.verdicts
                             and bool(truth.blocks))
    physical = reading.verdict == "physical_split"
    one_group = [sorted(t for g in truth.groups for t in g)]
    return {
        "verdict": reading.verdict in truth.verdicts or cure,
        "economical": (physical and reading.block == truth.economical) if branches else None,
        "acceptable_block": (physical and reading.block in truth.blocks) if branches else None,
        "groups": any(reading.groups == canonical(g) for g in truth.groups_acceptable)
        or (cure and reading.groups == one_group),
        "groups_exact": reading.groups == canonical(truth.groups),
    }


def advise_problem(problem: Problem, next_step: bool = True, seed: int = 0) -> AdviceOutcome:
    """First look and (with ``next_step``) the advice after running its next step (scored later, by :func:`score`),
    on the monitored run of ``seed``."""
    started = time.perf_counter()
    monitor, model = monitored_run(problem, seed)
    first_advice = advise(monitor.history, model=model)
    first = Reading.of(first_advice)
    after, error = None, None
    if next_step:
        try:
            after = Reading.of(follow_next_step(problem, first_advice, monitor.history, model, seed))
        except Exception as err:  # a next step that does not run is a finding, not a crash of the benchmark
            error = f"{type(err).__name__}: {err}"
            traceback.print_exc()
    return AdviceOutcome(problem.name, first, after, error, time.perf_counter() - started)


def scored(outcome: AdviceOutcome, truth: Truth) -> AdviceOutcome:
    """``outcome`` with its scores against ``truth`` (``first_*`` and ``after_*``)."""
    outcome.scores = {f"first_{k}": v for k, v in score(truth, outcome.first).items()}
    outcome.scores |= {f"after_{k}": v for k, v in score(truth, outcome.after).items()}
    return outcome


def to_dict(outcome: AdviceOutcome) -> dict[str, Any]:
    return {"name": outcome.name, "first": asdict(outcome.first),
            "after": None if outcome.after is None else asdict(outcome.after),
            "error": outcome.error, "seconds": outcome.seconds}


def from_dict(d: dict[str, Any]) -> AdviceOutcome:
    return AdviceOutcome(d["name"], Reading(**d["first"]), None if d["after"] is None else Reading(**d["after"]),
                         d["error"], d["seconds"])
