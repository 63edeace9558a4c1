"""The HTML report: one self-contained page that tells the story of a run, with every figure embedded.

:func:`write_html` (what ``gradconflict report RUN.jsonl -o report.html`` and ``gradconflict demo`` run) draws
the figures of :mod:`gradconflict.reporting.plots` and the tables of :mod:`gradconflict.reporting.summary`, in
the order a reader asks the questions:

1. the verdict: keep the backbone shared, split it with LoRA adapters, or branch it, and why;
2. the pairwise cosines over time, and each pair's mean cosine and persistence;
3. magnitude cancellation and the norm of the update over time;
4. each task's gradient norm and its alignment with the update;
5. a layers x steps heat-map of the conflict;
6. the layer profile with the advised branch point;
7. the affinity matrix and the task groups;
8. the advice's seven signals with their evidence, the trends, and the next step as code;
9. the examples that carry each pair's conflict, when some steps were measured with ``sample_ids``;
10. the comparison experiment, when one was run.

The page has no script and loads nothing: the figures are PNGs inside the file (``data:`` URIs), so it can be
mailed or attached to a ticket as it is. ``png_dir=`` also writes each figure as a PNG file. Needs matplotlib.

>>> import tempfile
>>> from gradconflict.fixtures.synthetic import make_problem
>>> monitor = make_problem("opposed", seed=0).train(steps=20)
>>> path = write_html(monitor.history, tempfile.mkdtemp() + "/report.html")
>>> text = path.read_text()
>>> text.startswith("<!DOCTYPE html>"), text.count("data:image/png;base64,")
(True, 7)
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradconflict import __version__
from gradconflict.diagnosis.advice import Advice, advise
from gradconflict.diagnosis.affinity import mean_transference, normalized
from gradconflict.diagnosis.aligned import Aligned, align
from gradconflict.diagnosis.examples import ConflictingExamples, carried_curve, pairs_with_examples
from gradconflict.measure.report import ConflictReport
from gradconflict.records.history import History
from gradconflict.records.pairs import pair_key
from gradconflict.records.samples import SampleTally
from gradconflict.reporting.summary import QUANTITIES, RunSummary, summarize_run

if TYPE_CHECKING:
    from gradconflict.records.comparison import ComparisonResult

__all__ = ["render_html", "write_html"]

Run = History | Iterable[ConflictReport]

#: What each figure shows and how to read it, keyed by the names of :func:`gradconflict.reporting.plots.run_figures`.
CAPTIONS = {
    "cosines": "Cosine of each pair of task gradients on the shared parameters, on the steps that carried both "
    "tasks. Below the dashed line (the threshold S) the pair conflicts: a step for one task works against the "
    "other. Faint lines are the raw values, bold ones a moving mean.",
    "cancellation": "Top: the share of the gradient magnitude lost because the task gradients point different "
    "ways, 1 - |sum w_i g_i| / sum w_i |g_i| (0: none lost; 1: they cancel out). Bottom: the norm of the update "
    "the optimiser receives on the shared parameters.",
    "norms": "Top: each task's gradient norm on the shared parameters (a task much larger than the others drives "
    "the shared update). Bottom: the cosine of each task's gradient with the update; below 0, the step raises "
    "that task's loss (to first order).",
    "layers": "Each shared layer (bottom of the network at the bottom) at each step: the lowest cosine over the "
    "pairs of tasks, on that layer's parameters. Red: the layer's task gradients conflict; blue: they agree; "
    "grey: not measured. Long runs are averaged into bins of steps.",
    "profile": "For each layer, how often its most conflicting pair conflicts (persistence). A layer conflicts from "
    "the dashed threshold on; the branch point is the lowest conflicting layer from which the layers above "
    "conflict on average. The layers drawn darker would be copied per task group by a physical split.",
    "mean_cosine": "Mean cosine of each pair over the steps that carried both tasks (n/a: never measured together).",
    "affinity": "Normalised affinity N_ij = Z_ij / Z_jj: how much a step on task i (row) lowers the loss of task j "
    "(column), compared with a step on j itself (first order, TAG's transference from the measured Grams). "
    "Tasks that help each other belong in one group; the outlined blocks are the advised groups.",
    "examples": "Left: the ids ranked by their mean within-example agreement between the two tasks (lowest "
    "first), against the share of the pair's negative inner product (each id's summed part in 2 G_ij, where "
    "negative) that the first ids carry; the dashed diagonal is a conflict spread evenly over the data, the dotted "
    "line the named set. Right: each named id's share.",
}

#: Most rows per pair in the examples' table (the first of the ranking; the advice lists every named id).
EXAMPLE_ROWS = 20

#: The tables', the verdict box's and the statuses' rules: the page's, and (scoped) a notebook cell's.
TABLE_STYLE = """
.verdict { border-radius: 8px; padding: 16px 20px; margin: 20px 0; border-left: 8px solid; }
.verdict.keep_shared { background: #edf7ee; border-color: #3a8c47; }
.verdict.lora_split { background: #fff6e5; border-color: #d68a00; }
.verdict.physical_split { background: #fdecea; border-color: #c62828; }
.verdict .name { font-size: 24px; font-weight: 700; }
table { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
th, td { border-bottom: 1px solid #e3e6eb; padding: 4px 10px; text-align: right; vertical-align: top; }
th { background: #f0f2f5; }
td.text, th.text { text-align: left; }
.status { font-weight: 700; border-radius: 4px; padding: 1px 6px; }
.status.split { background: #fdecea; color: #b71c1c; }
.status.watch { background: #fff6e5; color: #a86a00; }
.status.ok { background: #edf7ee; color: #2e7d32; }
.status.na { background: #eceff1; color: #546e7a; }
pre { background: #f6f8fa; padding: 12px; border-radius: 6px; overflow-x: auto; font-size: 13px; }
.warning { background: #fff6e5; padding: 8px 12px; border-radius: 6px; }
"""

STYLE = TABLE_STYLE + """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1d2330;
       background: #f4f5f7; line-height: 1.45; }
main { max-width: 1160px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { margin: 0 0 4px; font-size: 28px; } h2 { margin-top: 36px; border-bottom: 1px solid #dde1e7; padding-bottom: 4px; }
.meta { color: #5b6475; font-size: 14px; }
figure { margin: 16px 0; } figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #4a5263; font-size: 14px; margin-top: 6px; max-width: 1000px; }
.pair { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
.pair figure { flex: 1 1 420px; max-width: 540px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: float | None, spec: str) -> str:
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return "-"
    return format(value, spec)


def _numeric(value: Any) -> bool:
    """Whether a cell reads as a number (right-aligned) rather than as text."""
    if isinstance(value, (int, float)):
        return True
    text = str(value).strip().rstrip("%")
    try:
        float(text)
    except ValueError:
        return text in ("-", "")
    return True


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table; text columns (judged on the first row) are left-aligned, numbers right-aligned."""
    rows = [list(r) for r in rows]
    text = [not _numeric(v) for v in rows[0]] if rows else [True] * len(header)

    def cell(tag: str, k: int, value: Any) -> str:
        cls = ' class="text"' if k < len(text) and text[k] else ""
        return f"<{tag}{cls}>{_e(value)}</{tag}>"

    head = "".join(cell("th", k, h) for k, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", k, v) for k, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(png: bytes, name: str, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="fig-{name}"><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(CAPTIONS[name])}</figcaption></figure>"
    )


def _verdict(advice: Advice) -> str:
    words = {
        "keep_shared": "Keep the backbone shared",
        "lora_split": "Split logically: one LoRA adapter per task group on a frozen backbone",
        "physical_split": "Split physically: copy the backbone per task group from the branch point up",
    }[advice.verdict]
    parts = [f'<div class="verdict {advice.verdict}"><div class="name">{_e(words)}</div>',
             f"<p><b>Why:</b> {_e(advice.reason)}</p>"]
    if advice.branch_point is not None:
        parts.append(
            f"<p><b>Branch point:</b> <code>{_e(advice.branch_point)}</code> (a split copies "
            f"{advice.duplicated_share:.0%} of the profiled backbone parameters per group)</p>"
        )
    groups = " | ".join("[" + ", ".join(g) + "]" for g in advice.groups)
    parts.append(f"<p><b>Task groups:</b> {_e(groups)}</p>")
    parts += [f"<p><b>Examples ({_e(pair_key(*e.pair))}):</b> {_e(e.sentence())}</p>" for e in advice.examples]
    parts.append("</div>")
    return "".join(parts)


def _run_facts(summary: RunSummary) -> str:
    skipped = sum(summary.skipped.values())
    why = "; ".join(f"{n} {reason}" for reason, n in summary.skipped.items())
    facts = (
        f"<p>{summary.steps} steps ({summary.measured} measured, {skipped} skipped{': ' + _e(why) if why else ''}), "
        f"training steps {summary.first_step} to {summary.last_step}; tasks {_e(', '.join(summary.tasks))}; a pair "
        f"conflicts when its cosine is below S = {summary.threshold:.3g}.</p>"
    )
    warnings = "".join(f'<p class="warning">{_e(line)}</p>' for line in summary.coverage())
    rows = []
    for key, words in QUANTITIES.items():
        q = summary.quantities.get(key)
        if q is None:
            rows.append((words, "-", "-", "-", "-", "-"))
        else:
            rows.append((words, f"{q.mean:+.3f}", f"{q.first_window:+.3f}", f"{q.last_window:+.3f}",
                         f"{q.trend.slope:+.2e}", f"{q.trend.p_value:.2g}"))
    rows.append(("update norm", f"{summary.mean_update_norm:.3g}", "", "", "", ""))
    header = ["over the run", "mean", "first quarter", "last quarter", "trend per step (Theil-Sen)", "p (Mann-Kendall)"]
    return facts + warnings + _table(header, rows)


def _pairs_table(summary: RunSummary) -> str:
    if not summary.pairs:
        return ""
    rows = [
        (p.name, p.together, _fmt(p.mean_cosine, "+.3f"), _fmt(p.persistence, ".0%"), _fmt(p.last_cosine, "+.3f"))
        for p in summary.pairs
    ]
    header = ["pair", "steps together", "mean cosine", "conflicts on (persistence)", "mean cosine, last quarter"]
    return _table(header, rows)


def _tasks_table(summary: RunSummary) -> str:
    rows = [
        (t.name, t.steps, _fmt(t.mean_norm, ".3g"), _fmt(t.mean_alignment, "+.3f"), _fmt(t.against, ".0%"))
        for t in summary.task_rows
    ]
    return _table(["task", "steps", "mean gradient norm", "mean alignment", "update works against it on"], rows)


def _profile_table(advice: Advice) -> str:
    if advice.profile is None:
        return ""
    profile, body = advice.profile, []
    for layer in profile.layers:
        worst = profile.worst_pair(layer)
        pair, persist, cos = "-", "-", "-"
        if worst is not None:
            i, j = worst
            pair = pair_key(profile.tasks[i], profile.tasks[j])
            persist, cos = f"{float(layer.persistence[i, j]):.2f}", f"{float(layer.mean_cosine[i, j]):+.2f}"
        branch = "branch point" if layer.name == profile.branch_point else ""
        body.append((layer.name, layer.num_params, layer.score, pair, persist, cos, branch))
    return _table(["layer", "parameters", "S-conflict score", "worst pair", "persistence", "mean cosine", ""], body)


def _groups_table(advice: Advice) -> str:
    if advice.grouping is None:
        return ""
    rows = [
        (k, " | ".join("[" + ", ".join(g) + "]" for g in groups), f"{score:+.3f}")
        for k, (groups, score) in advice.grouping.by_count.items()
    ]
    return (
        f"<p>Best partition for each number of groups ({_e(advice.grouping.method)} search; the chosen one has the "
        "fewest groups among those within the tolerance of the best score):</p>"
        + _table(["groups", "partition", "score"], rows)
    )


def _signals(advice: Advice) -> str:
    rows = []
    for s in advice.signals:
        status = "na" if s.status == "n/a" else s.status
        value = _fmt(s.value, ".3g")
        rows.append(
            f'<tr><td class="text">{_e(s.name)}</td><td class="text"><span class="status {status}">{_e(s.status)}'
            f"</span></td><td>{value}</td><td>{_fmt(s.threshold, '.3g')}</td><td class=\"text\">{_e(s.evidence)}"
            "</td></tr>"
        )
    head = (
        '<tr><th class="text">signal</th><th class="text">status</th><th>value</th><th>split at</th>'
        '<th class="text">evidence</th></tr>'
    )
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _evidence(advice: Advice) -> str:
    """The signals' table, the verdict and the next step as code."""
    return (
        _signals(advice)
        + f"<p><b>Verdict:</b> <code>{_e(advice.verdict)}</code>: {_e(advice.reason)}</p>"
        + "<p>The next step, the comparison experiment that checks this advice:</p>"
        + f"<pre><code>{_e(advice.next_step)}</code></pre>"
    )


def _examples_table(found: Sequence[ConflictingExamples]) -> str:
    """Per pair, the named examples' sentence and their rows (the first :data:`EXAMPLE_ROWS`)."""
    parts = []
    for f in found:
        parts.append(f"<p><b>{_e(pair_key(*f.pair))}</b>: {_e(f.sentence())}</p>")
        rows = [
            (k + 1, e.id, e.steps, f"{e.agreement:+.3f}", f"{e.push:+.3e}", f"{e.apart:.0%}", f"{e.share:.1%}")
            for k, e in enumerate(f.examples[:EXAMPLE_ROWS])
        ]
        if rows:
            parts.append(_table(
                ["rank", "id", "steps", "mean agreement", "mean push", "pushed apart on", "share of the negative push"],
                rows,
            ))
    return "".join(parts)


def _comparison(result: ComparisonResult) -> str:
    """The comparison's Markdown table as an HTML table, and its notes as paragraphs."""
    lines = result.to_markdown().splitlines()
    table = [line.strip("|").split("|") for line in lines if line.startswith("|") and "---" not in line]
    notes = "".join(f"<p>{_e(line)}</p>" for line in lines if line and not line.startswith("|"))
    header, rows = [c.strip() for c in table[0]], [[c.strip() for c in r] for r in table[1:]]
    return _table(header, rows) + notes


def _prepare(
    run: Run, advice: Advice | None, summary: RunSummary | None, aligned: Aligned | None,
    samples: SampleTally | None,
) -> tuple[Advice, RunSummary, dict[str, Any]]:
    """The advice and the summary (each computed when not given) and the figures of a run, aligned once (a
    History is read through its stacked records, without a report per step)."""
    try:
        from gradconflict.reporting.plots import run_figures
    except ImportError as err:
        raise ImportError(f'the HTML report needs matplotlib ({err}): pip install "gradconflict[plots]"') from err
    run = run if isinstance(run, History) else list(run)
    aligned = aligned if aligned is not None else align(run)
    if not aligned.num_steps:
        raise ValueError("the run has no measured step: nothing to report (run some steps under a ConflictMonitor)")
    advice = advice if advice is not None else advise(aligned, samples=samples)
    summary = summary if summary is not None else summarize_run(run, profile=advice.profile, aligned=aligned)
    affinity = normalized(mean_transference(aligned))
    return advice, summary, run_figures(aligned, advice, affinity)


def render_html(
    run: Run,
    *,
    advice: Advice | None = None,
    comparison: ComparisonResult | None = None,
    title: str = "gradconflict report",
    source: str = "",
    png_dir: str | Path | None = None,
    summary: RunSummary | None = None,
    aligned: Aligned | None = None,
    samples: SampleTally | None = None,
) -> str:
    """The report of ``run`` (a :class:`~gradconflict.History` or any iterable of reports) as one HTML string.

    Args:
        run: the run's steps; partial and round-robin runs are fine (what could not be measured is said).
        advice: the advice to show (e.g. from ``monitor.advise(probe=...)``, which knows the model); by default
            :func:`gradconflict.advise` on the run alone.
        comparison: the comparison experiment's result, shown at the end when given.
        title: the page's title.
        source: where the run came from (a file name), shown under the title.
        png_dir: also write each figure there as ``<name>.png``.
        summary: the run's :func:`~gradconflict.reporting.summary.summarize_run`, when the caller has it already.
        aligned: the run's :func:`~gradconflict.diagnosis.align`, when the caller has it already.
        samples: the run's per-example tally (default: ``run.samples`` of a History): with attributed steps, the
            page shows the examples that carry each pair's conflict (table and figure).
    """
    from gradconflict.reporting.plots import conflicting_examples_figure, figure_to_png

    if samples is None and isinstance(run, History):
        samples = run.samples
    advice, summary, figures = _prepare(run, advice, summary, aligned, samples)
    found: list[ConflictingExamples] = []
    if samples is not None and samples.pairs:
        found = pairs_with_examples(samples)
        curves = {f.pair: carried_curve(samples, *f.pair) for f in found}
        figures["examples"] = conflicting_examples_figure(found, curves)
    pngs = {name: figure_to_png(fig) for name, fig in figures.items()}
    if png_dir is not None:
        folder = Path(png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, png in pngs.items():
            (folder / f"{name}.png").write_bytes(png)
    made = time.strftime("%Y-%m-%d %H:%M")
    meta = f"{_e(source)} · " if source else ""
    sections = [
        f"<h1>{_e(title)}</h1><p class=\"meta\">{meta}made {made} by gradconflict {__version__}</p>",
        _verdict(advice),
        "<h2>The run</h2>" + _run_facts(summary),
        "<h2>Pairwise cosines over time</h2>" + _figure(pngs["cosines"], "cosines", "pairwise cosines")
        + _pairs_table(summary),
        "<h2>Cancellation and update norm</h2>" + _figure(pngs["cancellation"], "cancellation", "cancellation"),
        "<h2>Task norms and alignment</h2>" + _figure(pngs["norms"], "norms", "task norms") + _tasks_table(summary),
        "<h2>Conflict per layer over time</h2>" + _figure(pngs["layers"], "layers", "layer heat-map"),
        "<h2>Layer profile and branch point</h2>" + _figure(pngs["profile"], "profile", "layer profile")
        + _profile_table(advice),
        "<h2>Affinity and task groups</h2><div class=\"pair\">"
        + _figure(pngs["affinity"], "affinity", "affinity matrix")
        + _figure(pngs["mean_cosine"], "mean_cosine", "mean cosine matrix") + "</div>" + _groups_table(advice),
        "<h2>Advice and evidence</h2>" + _evidence(advice),
    ]
    if found:
        sections.append(
            "<h2>Examples that carry the conflict</h2>"
            + _figure(pngs["examples"], "examples", "examples that carry the conflict") + _examples_table(found)
        )
    if comparison is not None:
        sections.append("<h2>Comparison experiment</h2>" + _comparison(comparison))
    body = "\n".join(f"<section>{s}</section>" for s in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
        f"<body><main>\n{body}\n</main></body></html>\n"
    )


def write_html(
    run: Run,
    path: str | Path,
    *,
    advice: Advice | None = None,
    comparison: ComparisonResult | None = None,
    title: str = "gradconflict report",
    source: str = "",
    png_dir: str | Path | None = None,
    summary: RunSummary | None = None,
    aligned: Aligned | None = None,
    samples: SampleTally | None = None,
) -> Path:
    """Write :func:`render_html`'s page to ``path`` (its folder is created); returns the path."""
    path = Path(path)
    page = render_html(
        run, advice=advice, comparison=comparison, title=title, source=source, png_dir=png_dir, summary=summary,
        aligned=aligned, samples=samples,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
