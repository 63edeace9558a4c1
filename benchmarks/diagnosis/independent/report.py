"""The independent benchmark's section of ``benchmarks/DIAGNOSIS.md``: hit rates and a per-problem table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from . import truth as truth_rules
from .advice import AdviceOutcome, Reading
from .problems import Problem
from .truth import Truth

START, END = "<!-- independent-benchmark:start -->", "<!-- independent-benchmark:end -->"

TARGETS = {
    "verdict, first look": "90%",
    "verdict, first look (a provisional reading counts when its next step gets it right)": "90%",
    "verdict after next_step": "95%",
    "economical branch point (exact block), first look": "-",
    "branch point within the acceptable blocks, first look": "80%",
    "branch point within the acceptable blocks, after next_step": "80%",
    "groups, first look": "90%",
    "groups, first look, problems of 3 or more tasks": "90%",
    "groups after next_step": "90%",
}


def _rate(values: Sequence[bool | None]) -> str:
    scored = [v for v in values if v is not None]
    if not scored:
        return "-"
    return f"{sum(scored)} / {len(scored)} ({100 * sum(scored) / len(scored):.0f}%)"


def _scores(outcomes: Sequence[AdviceOutcome], problems: dict[str, Problem]) -> dict[str, list[bool | None]]:
    """Each measure's hits and misses (``None``: not scored), one per problem."""
    def col(key: str) -> list[bool | None]:
        return [o.scores.get(key) for o in outcomes]

    lenient = [
        bool(o.scores["first_verdict"] or (not o.first.decided and o.scores.get("after_verdict")))
        for o in outcomes
    ]
    many: list[bool | None] = [o.scores["first_groups"] for o in outcomes if len(problems[o.name].tasks) >= 3]
    return {
        "verdict, first look": col("first_verdict"),
        "verdict, first look (a provisional reading counts when its next step gets it right)": list(lenient),
        "verdict after next_step": col("after_verdict"),
        "economical branch point (exact block), first look": col("first_economical"),
        "branch point within the acceptable blocks, first look": col("first_acceptable_block"),
        "branch point within the acceptable blocks, after next_step": col("after_acceptable_block"),
        "groups, first look": col("first_groups"),
        "groups, first look, problems of 3 or more tasks": many,
        "groups after next_step": col("after_groups"),
    }


def hit_rates(outcomes: Sequence[AdviceOutcome], problems: dict[str, Problem]) -> dict[str, str]:
    return {k: _rate(v) for k, v in _scores(outcomes, problems).items()}


def by_seed(runs: dict[int, Sequence[AdviceOutcome]], problems: dict[str, Problem]) -> list[str]:
    """The hit rates of advice runs on several seeds' monitored runs (``--advice-seed``), side by side and pooled:
    how much the rates move with the run the advice reads."""
    scores = {seed: _scores(outcomes, problems) for seed, outcomes in sorted(runs.items())}
    lines = [
        "| measure | " + " | ".join(f"seed {seed}" for seed in scores) + " | pooled | target |",
        "| --- |" + " --- |" * (len(scores) + 2),
    ]
    for measure, target in TARGETS.items():
        cells = [_rate(s[measure]) for s in scores.values()]
        pooled = _rate([v for s in scores.values() for v in s[measure]])
        lines.append(f"| {measure} | " + " | ".join(cells) + f" | {pooled} | {target} |")
    return lines


def _groups(groups: Sequence[Sequence[str]]) -> str:
    return " ".join("[" + ",".join(g) + "]" for g in groups)


def _reading(r: Reading | None, error: str | None = None) -> str:
    if r is None:
        return f"error: {error[:80]}" if error else "-"
    where = f" @{r.block}" if r.block else ""
    weighting = f" with {r.weighting}" if r.weighting else ""
    return f"{r.verdict}{where}{weighting} ({'decided' if r.decided else 'provisional'})"


def _mark(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def _truth_cell(t: Truth) -> str:
    others = [v for v in t.verdicts if v != t.verdict]
    cell = t.verdict + (f" (or {', '.join(others)})" if others else "")
    if t.blocks:
        cell += f"; blocks {', '.join(b.split('.')[1] for b in t.blocks)}, economical {t.economical}"
    return cell


def _best(t: Truth) -> str:
    """The split variant that gains most (the re-weighted shared models are not splits)."""
    name, j = max(((v, j) for v, j in t.judged.items() if v not in truth_rules.CURES), key=lambda kv: kv[1].mean)
    return f"{name} {j.mean:+.1f} (p={j.p_value:.2g})"


def section(
    problems: dict[str, Problem], truths: dict[str, Truth], outcomes: Sequence[AdviceOutcome], *,
    machine: list[str], truth_meta: dict, seed: int = 0,
    other_seeds: dict[int, Sequence[AdviceOutcome]] | None = None,
) -> str:
    """The section of DIAGNOSIS.md for the advice run on ``seed``'s monitored run; ``other_seeds`` (seed ->
    outcomes of the same advice on another seed's monitored run) adds the hit rates by seed."""
    rates = hit_rates(outcomes, problems)
    lines = [
        START,
        "## Independent benchmark: problems built differently, truth from separate training code",
        "",
        f"Generated by `python -m benchmarks.diagnosis.independent.run` (`benchmarks/diagnosis/independent/`). "
        f"{len(outcomes)} problems on real "
        "bundled data (scikit-learn's digits and breast cancer), with MLP, conv and transformer backbones of four "
        "blocks and learnable heads, 2 to 4 tasks (see Constructions). The truth of each problem is measured by "
        "training every variant (shared, shared with each loss divided by its initial value (`balanced`), shared "
        f"with each of the weightings {', '.join(f'`{w}`' for w in truth_rules.WEIGHTINGS)} (TorchJD's aggregators "
        "on the Jacobian of the task losses with respect to the backbone), fully independent, per-task LoRA, "
        "branched at every block, and for 3+ "
        "tasks every partition into two groups and one group per task, at the economical block) with the "
        "benchmark's own training loop over "
        f"{truth_meta.get('seeds', '?')} seeds, the same batches per seed for every variant, and is cached in "
        "`benchmarks/diagnosis/independent/truth.json`; "
        "`python -m benchmarks.diagnosis.independent.run --advice-only` redoes only the advice side.",
        "",
        "Rules of the truth (stated before any advice was scored): Delta-m% of a variant against the same seed's "
        "shared model (mean over tasks of the relative change of the held-out metric: accuracy, or mean squared "
        f"error); a variant **beats shared** when its mean gain is at least {truth_rules.FLOOR:g}% and a one-sided "
        f"paired t-test across seeds gives p < {truth_rules.ALPHA:g}. Verdict: keep_shared when nothing beats "
        "shared, else physical_split (branched or independent) or lora_split, whichever gains more; the other is "
        f"also accepted when it beats shared and recovers {truth_rules.RECOVER:.0%} of that gain; so is keep_shared "
        "with a re-weighting (an advice that says keep_shared and names a weighting) when the shared model trained "
        "with the weighting the advice names, or the loss-balanced one, beats shared and recovers "
        f"{truth_rules.RECOVER:.0%} of the best split's gain (such an advice is credited with its one group, and "
        "has no branch point to score). Acceptable "
        f"blocks: those whose branched variant beats shared and recovers {truth_rules.RECOVER:.0%} of the best "
        "branched gain; the economical block is the highest of them. Groups: one group for keep_shared; for a "
        f"split of 3+ tasks, the partition with the fewest groups among those that beat shared and recover "
        f"{truth_rules.RECOVER:.0%} of the best partition's gain (any of those is accepted).",
        "",
        "The advice: the shared model of seed 0 (another with `--advice-seed`) trained for the problem's budget "
        "under a `ConflictMonitor`, every step measured, then `advise(history, model=model)` (first look); then "
        "the advice's `next_step` run as printed with the problem's inputs, its budget and held-out metrics, and "
        "the advice it asks for with the comparison (after next_step).",
        "",
        "### Machine",
        "",
        *machine,
        f"- truth: {truth_meta.get('date', '?')}; {truth_meta.get('elapsed', 0):.0f} s elapsed with "
        f"{truth_meta.get('jobs', 1)} parallel jobs; per problem, summed: {truth_meta.get('seconds', 0):.0f} s of "
        f"wall time, {truth_meta.get('cpu_seconds', 0):.0f} s of CPU time "
        f"({truth_meta.get('machine', '?')}); `{truth_meta.get('command', '?')}`",
        "",
        "### Hit rates",
        "",
        "| measure | result | issue 19 target |",
        "| --- | --- | --- |",
        *[f"| {k} | {v} | {TARGETS[k]} |" for k, v in rates.items()],
        "",
        "Branch points are scored on the problems whose truth accepts a physical split (save an advice credited "
        "with keep_shared and a re-weighting); an advice without a branch point there is a miss.",
        "",
    ]
    if other_seeds:
        lines += [
            "Hit rates by the seed of the monitored run the advice reads (and of its next step's batches; "
            "`--advice-seed`, the runs cached in `advice-seed<k>.json`): the same problems, truth and code.",
            "",
            *by_seed({**other_seeds, seed: outcomes}, problems),
            "",
        ]
    lines += [
        f"What splitting did agrees with what the problem was built for (verdict) on "
        f"{_rate([problems[o.name].expected[0] in truths[o.name].verdicts for o in outcomes])}; budgets: "
        + ", ".join(sorted({f'{problems[o.name].steps} steps' for o in outcomes}))
        + " of Adam on batches of 64 (short, to keep the truth within minutes of CPU: the models are not trained "
        "to convergence, and where the shared model learns slowly the split variants' head start counts).",
        "",
        "### Problems",
        "",
        "| problem | backbone | tasks | built for | truth | best split | groups (truth) | first look | groups "
        "(advice) | after next_step | verdict first / after | block first / after | groups first / after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        p, t = problems[o.name], truths[o.name]
        built = p.expected[0] + (f" @{p.expected[1]}" if p.expected[1] else "")
        s = o.scores
        lines.append(
            f"| {o.name} | {p.backbone} | {len(p.tasks)} | {built} | {_truth_cell(t)} | {_best(t)} | "
            f"{_groups(t.groups)} | {_reading(o.first)} | {_groups(o.first.groups)} | {_reading(o.after, o.error)} | "
            f"{_mark(s['first_verdict'])} / {_mark(s['after_verdict'])} | "
            f"{_mark(s['first_acceptable_block'])} / {_mark(s['after_acceptable_block'])} | "
            f"{_mark(s['first_groups'])} / {_mark(s['after_groups'])} |"
        )
    variants = list(truths[outcomes[0].name].judged) if outcomes else []
    lines += [
        "",
        "### Gains over shared (mean Delta-m% over the seeds; * beats shared)",
        "",
        "| problem | " + " | ".join(variants) + " |",
        "|" + " --- |" * (len(variants) + 1),
    ]
    for o in outcomes:
        t = truths[o.name]
        lines.append(
            f"| {o.name} | "
            + " | ".join(f"{t.judged[v].mean:+.1f}{'*' if t.judged[v].wins else ''}" for v in variants) + " |"
        )
    partitioned = [o.name for o in outcomes if truths[o.name].partitions]
    if partitioned:
        lines += ["", "Task partitions, branched at the economical block (mean Delta-m%; * beats shared):", ""]
        for name in partitioned:
            parts = truths[name].partitions
            lines.append(
                f"- **{name}**: "
                + "; ".join(f"{_groups(__import__('json').loads(k))} {j.mean:+.1f}{'*' if j.wins else ''}"
                            for k, j in sorted(parts.items(), key=lambda kv: -kv[1].mean))
            )
    errors = [o for o in outcomes if o.error]
    if errors:
        lines += ["", "Next steps that did not run:", ""]
        lines += [f"- **{o.name}**: {o.error}" for o in errors]
    lines += ["", "### Constructions", ""]
    lines += [f"- **{o.name}**: {problems[o.name].construction}." for o in outcomes]
    lines += ["", END]
    return "\n".join(lines)


def kept_section(path: Path) -> str:
    """The independent benchmark's section of ``path`` (with a leading blank line), or ``""``: what the family's
    report, which rewrites the whole file, carries over."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    found = re.search(re.escape(START) + ".*?" + re.escape(END), old, re.S)
    return "\n" + found.group(0) + "\n" if found else ""


def write_section(path: Path, text: str) -> None:
    """Put ``text`` into ``path`` between the markers, replacing an earlier section (appended the first time)."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
