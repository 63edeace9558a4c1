"""Ground truth: what splitting actually does on a problem, measured with ``compare()`` over several seeds.

For each seed, one ``compare()`` run trains the shared model, fully independent models, per-task LoRA adapters and
the backbone branched at every block (``branch_at=[...]``: one copy per block, ``branched@backbone.k``, each from
the same shared checkpoint). Every variant is read
at its final evaluation on held-out data (fresh label noise), and ``split_gains`` pairs it with the shared model of
the same seed, judged by the package's one ceiling rule (``judge_gain``): a split counts as better only when its
mean Delta-m% exceeds the 1% floor and a one-sided paired t-test across seeds confirms it (p < 0.05). (Until
0.2.0 the rule was "ahead on every seed by more than two standard deviations of the shared model's own
seed-to-seed variation"; the paired test counts consistent gains that the shared model's spread hid.)

The truth's verdict: ``physical_split`` when a branched variant (or the fully independent models, a branch at the
bottom) beats shared, ``lora_split`` when only the adapters do, ``keep_shared`` when nothing does. Its branch point:
the block the construction names when branching there beats shared; otherwise the highest block that does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gradconflict.fixtures.synthetic import Problem, Spec, build_problem
from gradconflict.split import ComparisonResult, SplitGain, compare, split_gains

#: Training budget of every variant (steps), the shared phase before lora and branched split (half), batch size.
STEPS, BATCH = 400, 64
LR = 3e-3


@dataclass
class Truth:
    """What splitting did on one problem."""

    verdict: str
    branch: str | None
    gains: dict[str, SplitGain]
    spread: float
    economical: str | None  # the highest block whose gain is within two spreads of the best branch's
    confirmed: bool  # the construction's branch point beats shared
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def branch_name(block: str) -> str:
    return f"branched@{block}"


def _batches(problem: Problem, seed: int) -> list:
    stream = problem.batches(BATCH, seed=1000 + seed)
    return [next(stream) for _ in range(STEPS)]


def seed_result(spec: Spec, seed: int) -> ComparisonResult:
    """One seed's comparison: shared, independent, lora and a branch at every block, joined in one result."""
    problem = build_problem(spec, 0)  # the problem's data is fixed; the seed moves the initialisation and the order
    groups = [list(g) for g in spec.expected_groups] if spec.expected_verdict != "keep_shared" else None

    def factory() -> torch.nn.Module:
        assert problem.factory is not None
        return problem.factory(seed)

    options = dict(
        steps=STEPS, optimizer_factory=lambda params: torch.optim.Adam(params, lr=LR),
        eval_data=[(problem.eval_x, problem.eval_targets)], groups=groups, seed=seed, progress=False, evals=4,
    )
    blocks = [f"backbone.{k}" for k in range(spec.depth)]
    return compare(factory, problem.loss_fns, _batches(problem, seed), branch_at=blocks, **options)


#: The truth's level: the conventional 5%. The truth reads its seeds once; the package's own level (2.5%) is halved
#: for the next step's two readings of one comparison.
TRUTH_ALPHA = 0.05


def truth(spec: Spec, seeds: int) -> Truth:
    """The measured truth of one problem over ``seeds`` seeds."""
    results = [seed_result(spec, s) for s in range(seeds)]
    gains = split_gains(results, alpha=TRUTH_ALPHA)
    spread = next(iter(gains.values())).spread
    winners = [name for name, g in gains.items() if g.beyond]
    branches = [name for name in gains if name.startswith("branched@")]
    won = [b for b in branches if b in winners]
    if won or "independent" in winners:
        verdict = "physical_split"
    elif "lora" in winners:
        verdict = "lora_split"
    else:
        verdict = "keep_shared"
    constructed = branch_name(spec.expected_branch) if spec.expected_branch else None
    confirmed = constructed in won if constructed else False
    branch = None
    if verdict == "physical_split":
        if confirmed:
            branch = spec.expected_branch
        elif won:
            branch = won[-1].split("@", 1)[1]
        else:
            branch = "backbone.0"  # only the fully independent models won: the full split
    best = max((gains[b].mean for b in branches), default=float("nan"))
    close = [b for b in branches if gains[b].mean >= best - 2 * spread and gains[b].beyond]
    economical = close[-1].split("@", 1)[1] if close else None
    return Truth(verdict, branch, gains, spread, economical, confirmed)
