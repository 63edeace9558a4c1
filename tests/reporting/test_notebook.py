"""Notebook display: ConflictReport, Advice, ComparisonResult and SplitEvaluation render as HTML tables (no
script, balanced tags) holding the numbers of the object, computed here from its fields or by hand."""

from __future__ import annotations

import math

import pytest
import torch

from gradconflict import ConflictReport
from gradconflict.diagnosis.signals import SIGNALS
from gradconflict.records.comparison import ComparisonResult, VariantRecord
from gradconflict.split.evaluate import Criterion, SplitEvaluation
from tests.reporting.test_html import Page

pytest.importorskip("matplotlib")  # the reporting floor's html module draws figures with it


def cells(text: str) -> Page:
    page = Page(text)
    assert page.unbalanced == 0 and not page.open
    assert "<script" not in text.lower() and page.sources == [] and page.targets == []
    assert text.startswith('<div class="gradconflict"><style>')
    return page


def test_a_report_shows_its_pairs_tasks_and_layers():
    # g_a = (1, 0), g_b = (-1, 2), g_c = (0, 1): G by hand
    g = torch.tensor([[1.0, 0.0], [-1.0, 2.0], [0.0, 1.0]])
    gram = g @ g.T
    from gradconflict.measure.report import LayerReport

    weights = torch.tensor([1.0, 0.5, 2.0])
    layers = {"top": LayerReport("top", ("a", "b", "c"), gram, weights, num_params=2, route="ghost")}
    report = ConflictReport(("a", "b", "c"), gram, weights, losses=torch.tensor([0.25, 1.5, 3.0]), layers=layers,
                            step=7, engine="auto", strategy="batched")
    page = cells(report._repr_html_())
    rows = {r[0]: r[1:] for r in page.rows}
    n = g.norm(dim=1)
    cos_ab = float(g[0] @ g[1] / (n[0] * n[1]))  # -1/sqrt(5)
    assert rows["a/b"] == [f"{cos_ab:+.3f}", "yes", f"{float(2 * n[0] * n[1] / (n[0] ** 2 + n[1] ** 2)):.3f}"]
    assert rows["a/c"][:2] == ["+0.000", "no"] and rows["b/c"][1] == "no"
    update = (weights[:, None] * g).sum(0)
    alignment_b = float(g[1] @ update / (n[1] * update.norm()))
    assert rows["b"] == ["0.5", "1.5", f"{float(n[1]):.3g}", f"{alignment_b:+.3f}"]
    assert rows["top"] == ["2", "ghost", f"{cos_ab:+.3f}", "33%"]  # one pair in three conflicts
    cancellation = 1 - float(update.norm()) / float((weights * n).sum())
    assert rows["magnitude cancellation"] == [f"{cancellation:.3f}"]
    assert rows["update norm"] == [f"{float(update.norm()):.3g}"]
    assert "Step 7" in report._repr_html_() and "batched" in report._repr_html_()


def test_a_skipped_report_says_why():
    report = ConflictReport.skipped_step(("a", "b"), 3, "non-finite loss: a", torch.tensor([math.nan, 1.0]),
                                         "auto", torch.ones(2))
    text = report._repr_html_()
    cells(text)
    assert "Skipped: non-finite loss: a" in text


def test_advice_shows_the_verdict_box_and_the_signals_as_the_report_does():
    from gradconflict.fixtures.synthetic import make_problem

    advice = make_problem("top_conflict", seed=0).train(40).advise()
    page = cells(advice._repr_html_())
    assert f'class="verdict {advice.verdict}"' in advice._repr_html_()
    signals = {r[0]: r for r in page.rows if r and r[0] in {s.name for s in advice.signals}}
    assert len(signals) == len(advice.signals) == len(SIGNALS)
    for s in advice.signals:
        row = signals[s.name]
        assert row[1] == s.status
        assert row[2] == ("-" if s.value is None else f"{s.value:.3g}")
        assert row[3] == ("-" if math.isnan(s.threshold) else f"{s.threshold:.3g}")  # never 0.599335
        assert row[4] == s.evidence
    assert advice.next_step.splitlines()[0] in advice._repr_html_().replace("&quot;", '"').replace("&#x27;", "'")


def test_a_comparison_shows_its_rows_and_delta_m():
    shared = VariantRecord("shared", {"a": [1.0]}, [(1, {"a": 0.5})], {"a": "min"})
    single = VariantRecord("independent", {"a": [1.0]}, [(1, {"a": 0.4})], {"a": "min"})
    result = ComparisonResult({"shared": shared, "independent": single}, ["a"], steps=1, split_step=0)
    text = result._repr_html_()
    page = cells(text)
    by_variant = {r[0]: r for r in page.rows[1:]}
    assert set(by_variant) == {"shared", "independent"}
    assert by_variant["shared"][5] == "0.5" and by_variant["independent"][5] == "0.4"
    assert "shared -25.00" in text  # Delta-m%: (0.4 - 0.5) / 0.4, lower is better


def test_a_split_evaluation_shows_each_criterion():
    evaluation = SplitEvaluation((
        Criterion("convergence", True, "smoother after", "w1"),
        Criterion("cost", False, "latency x3.0", "the split is too dear"),
        Criterion("ceiling", None, "no evaluation", "w3"),
    ))
    page = cells(evaluation._repr_html_())
    assert page.rows[1:] == [
        ["convergence", "held", "smoother after", ""],
        ["cost", "FAILED", "latency x3.0", "the split is too dear"],
        ["ceiling", "n/a", "no evaluation", ""],
    ]
