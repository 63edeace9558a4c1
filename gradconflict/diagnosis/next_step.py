"""The next step's code: :func:`next_step_code` writes the comparison experiment that settles a verdict, and the
constants that choose its candidate branch points."""

from __future__ import annotations

from collections.abc import Sequence

from gradconflict.diagnosis.advice_types import Verdict
from gradconflict.diagnosis.signals import MAGNITUDE_WEIGHTINGS
from gradconflict.records.gains import MAX_SEEDS as PLANNED_SEEDS

_VARIANTS: dict[str, tuple[str, ...]] = {
    "physical_split": ("shared", "independent", "branched"),
    "lora_split": ("shared", "independent", "lora"),
    "keep_shared": ("shared", "independent"),
}


#: The most branch points the next step compares (spread evenly from the conflict onset to the top).
MAX_CANDIDATES = 4
#: The most seeds the next step runs when its first seeds cannot tell: the most the gain test ever plans
#: (:data:`gradconflict.records.gains.MAX_SEEDS`, 20). Its second look runs the seeds the test plans for 80% power;
#: when those cannot tell either, its last look runs all 20, where the test decides: a gain 20 seeds do not confirm
#: is no gain worth a split.
#: Every variant but the branched copies trains once per seed, whatever the number of candidate blocks.
MAX_SEEDS = PLANNED_SEEDS


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
    ``branch_point`` is then the highest block recovering
    :data:`~gradconflict.diagnosis.signals.ceiling.RECOVERED_SHARE` of the best one's gain), all in one
    ``compare(branch_at=[...])`` call per seed: the other variants train once, and one copy per block
    (``branched@<block>``) branches from the same shared checkpoint.
    ``steps`` and ``lr`` (the monitored run's budget) become the defaults of the function's ``steps`` and ``lr``;
    unknown (``None``), the printed call asks for them (``lr=...``) and the optimizer factory says what to pass.
    The code ends by calling the function on the inputs it names. Without ``eval_data`` (``None``), the function
    says that Delta-m is then measured on the training loss. The shared model and fully independent models are
    always compared (capacity is invisible to gradients); for ``keep_shared``, ``branch_at`` (the candidate
    blocks from the bottom up) adds the branched copies, capacity running short at any depth. With ``conflict``
    (diverging gradients), the shared model is also trained with conflict-aware updates (``upgrad``,
    ``pcgrad``); with ``reweight`` (one task's gradient dominates by its magnitude), with the magnitude-aware
    weightings (:data:`~gradconflict.diagnosis.signals.MAGNITUDE_WEIGHTINGS`): the cheaper cures, which a split
    must beat.

    When the comparison over ``seeds`` seeds cannot tell whether a split beats the shared model (a mean gain above
    the floor the paired test does not confirm), the function runs the seeds its test says would settle it
    (``seeds_needed``, up to ``max_seeds``, :data:`MAX_SEEDS` by default) and reads the advice again on all of
    them: a second look, planned from the first. When that cannot tell either (a plan from few seeds falls short
    about one time in five), a last look runs ``max_seeds`` seeds, where the test decides. Each look tests at 2.5%
    (:data:`~gradconflict.records.gains.GAIN_ALPHA`), so that together they keep the chance of a false "split" (a
    gain no larger than the floor called a win) under 5%.

    >>> code = next_step_code("physical_split", ["backbone.2", "backbone.3"], [["a"], ["b"]], steps=400)
    >>> print([line for line in code.splitlines() if "branch_at=" in line][0].strip())
    branch_at=['backbone.2', 'backbone.3'], groups=[['a'], ['b']],
    >>> print(code.splitlines()[3].split("*, ")[1])
    lr=None, steps=400, seeds=3, max_seeds=20):
    >>> print(code.splitlines()[-2])
    advice = next_step(history, model_factory, loss_fns, train_data, eval_data, metrics, lr=...)
    """
    points = [branch_at] if branch_at is None or isinstance(branch_at, str) else list(branch_at)
    at = repr(points[0]) if len(points) == 1 else f"each of {points}"
    capacity_copies = verdict == "keep_shared" and points != [None]  # capacity checked at these blocks too
    why = {
        "physical_split": f"the shared model against one backbone copy per group, branching at {at}",
        "lora_split": "the shared model against a frozen shared backbone with one LoRA adapter per group",
        "keep_shared": "the shared model against fully independent models"
        + (f" and copies branching at {at}" if capacity_copies else "")
        + " (capacity is invisible to gradients)",
    }[verdict]
    variants = _VARIANTS[verdict] + (("branched",) if capacity_copies else ())
    weightings = (["upgrad", "pcgrad"] if conflict else []) + (list(MAGNITUDE_WEIGHTINGS) if reweight else [])
    lines = [
        "import torch",
        "from gradconflict import advise, compare",
        "",
        f"def next_step(history, model_factory, loss_fns, train_data, eval_data, metrics=None, *, lr={lr!r}, "
        f"steps={steps!r}, seeds={seeds}, max_seeds={MAX_SEEDS}):",
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
        "    def run(seed_range):",
        "        return [",
        "            compare(model_factory, loss_fns, train_data, steps=steps, optimizer_factory=optimizer_factory,",
        f"                    eval_data=eval_data, metrics=metrics, variants={variants!r},",
        "                    branch_at=" + repr(points if len(points) > 1 else points[0])
        + f", groups={[list(g) for g in groups]!r},",
        f"                    weightings={weightings!r}, seed=seed, progress=False)",
        "            for seed in seed_range",
        "        ]",
        "",
        "    results = run(range(seeds))",
        "    advice = advise(history, comparison=results)",
        "    for last in (False, True):  # the test cannot tell yet: look again on the seeds it plans, then max_seeds",
        "        needed = advice.signal('ceiling').details.get('seeds_needed')",
        "        if not needed or len(results) >= max_seeds:",
        "            break",
        "        results += run(range(len(results), max_seeds if last else min(needed, max_seeds)))",
        "        advice = advise(history, comparison=results)",
        "    print(results[0].to_markdown())",
        "    return advice",
        "",
        "",
        "advice = next_step(history, model_factory, loss_fns, train_data, eval_data, metrics"
        + (", lr=..." if lr is None else "") + ")",
        "print(advice)",
    ]
    return "\n".join(lines)
