"""Notebook display: the tables of the HTML report for one object, as Jupyter shows it.

Jupyter shows an object through its ``_repr_html_``. :class:`~gradconflict.ConflictReport`,
:class:`~gradconflict.Advice`, :class:`~gradconflict.ComparisonResult` and
:class:`~gradconflict.SplitEvaluation` each have one that calls the function here for its type: the same tables
(and, for the advice, the same verdict box) as :mod:`gradconflict.reporting.html`, drawn by the same functions,
with the page's table style scoped to the cell. No script, no figure: a cell stays light and safe to share.

>>> import torch
>>> from gradconflict import ConflictReport
>>> cell = ConflictReport(("a", "b"), torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))._repr_html_()
>>> cell.startswith('<div class="gradconflict">'), "<script" in cell, "<td>-0.500</td>" in cell
(True, False, True)
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gradconflict.records.sinks.scalars import scalars
from gradconflict.reporting.html import (
    TABLE_STYLE,
    _comparison,
    _e,
    _evidence,
    _fmt,
    _groups_table,
    _profile_table,
    _table,
    _verdict,
)

if TYPE_CHECKING:
    from gradconflict.diagnosis.advice import Advice
    from gradconflict.measure.report import ConflictReport
    from gradconflict.records.comparison import ComparisonResult
    from gradconflict.split.evaluate import SplitEvaluation

__all__ = ["advice_html", "comparison_html", "evaluation_html", "report_html"]

SCOPE = "gradconflict"


def _scoped(css: str) -> str:
    """``css`` with every selector limited to the cell's ``<div class="gradconflict">``, so that a notebook's own
    tables keep their style."""

    def scope(match: re.Match[str]) -> str:
        selectors = ", ".join(f".{SCOPE} {s.strip()}" for s in match.group(1).split(","))
        return f"{selectors} {{{match.group(2)}}}"

    return re.sub(r"([^{}]+)\{([^}]*)\}", scope, css).strip()


def _cell(body: str) -> str:
    return f'<div class="{SCOPE}"><style>{_scoped(TABLE_STYLE)}</style>{body}</div>'


def report_html(report: ConflictReport) -> str:
    """One step: how it was measured, the step's quantities, each pair, each task and each shared layer."""
    how = ", ".join(
        part for part in (
            f"engine {report.engine}" + (f" ({report.strategy})" if report.strategy else ""),
            f"sync {report.sync}" if report.sync else "",
            "approximate" if report.approximate else "",
        ) if part
    )
    head = f"<p><b>Step {report.step}</b>: tasks {_e(', '.join(report.tasks))}; {_e(how)}.</p>"
    if report.skipped:
        return _cell(head + f'<p class="warning">Skipped: {_e(report.skip_reason)}</p>')
    tasks, T = report.tasks, len(report.tasks)
    cosine, similarity = report.cosine.tolist(), report.magnitude_similarity.tolist()
    quantities = _table(
        ["quantity", "value"],
        [
            ("conflict fraction (pairs with cosine < S = " + _fmt(report.threshold, ".3g") + ")",
             _fmt(float(report.conflict_fraction), ".0%")),
            ("magnitude cancellation", _fmt(float(report.cancellation), ".3f")),
            ("update norm", _fmt(float(report.update_norm), ".3g")),
            ("condition number", _fmt(float(report.condition_number), ".3g")),
        ],
    )
    pairs = _table(
        ["pair", "cosine", "conflicts", "magnitude similarity"],
        [
            (f"{tasks[i]}/{tasks[j]}", _fmt(cosine[i][j], "+.3f"), "yes" if cosine[i][j] < report.threshold else "no",
             _fmt(similarity[i][j], ".3f"))
            for i in range(T) for j in range(i + 1, T)
        ],
    )
    losses = [None] * T if report.losses is None else report.losses.tolist()
    per_task = _table(
        ["task", "weight", "loss", "gradient norm", "alignment with the update"],
        [
            (task, _fmt(w, ".3g"), _fmt(loss, ".4g"), _fmt(norm, ".3g"), _fmt(align, "+.3f"))
            for task, w, loss, norm, align in zip(
                tasks, report.weights.tolist(), losses, report.task_norms.tolist(), report.alignment.tolist()
            )
        ],
    )
    layers = ""
    if report.layers:
        values = scalars(report, layers=True)  # the logged figures: each layer's worst cosine and conflict fraction
        rows = [
            (name, layer.num_params, layer.route, _fmt(values.get(f"layer/{name}/worst_cosine"), "+.3f"),
             _fmt(values.get(f"layer/{name}/conflict_fraction"), ".0%"))
            for name, layer in report.layers.items()
        ]
        layers = _table(["layer", "parameters", "route", "worst pair cosine", "conflict fraction"], rows)
    return _cell(head + quantities + pairs + per_task + layers)


def advice_html(advice: Advice) -> str:
    """The advice as the HTML report shows it: the verdict box, the signals with their evidence, the verdict and
    the next step as code, then the layer profile and the task groups."""
    return _cell(_verdict(advice) + _evidence(advice) + _profile_table(advice) + _groups_table(advice))


def comparison_html(result: ComparisonResult) -> str:
    """The comparison experiment's table and notes, as at the end of the HTML report."""
    return _cell(_comparison(result))


def evaluation_html(evaluation: SplitEvaluation) -> str:
    """Each criterion of a split's evaluation: whether it held, the evidence, and the warning when it failed."""
    outcome = {True: "held", False: "FAILED", None: "n/a"}
    rows = [
        (c.name, outcome[c.passed], c.evidence, c.warning if c.passed is False else "") for c in evaluation.criteria
    ]
    return _cell(_table(["criterion", "outcome", "evidence", "warning"], rows))
