"""The flat scalars every dashboard sink logs, against values known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from gradconflict import ConflictReport
from gradconflict.records.sinks import pair_key, scalars
from tests.records.sinks.helpers import BOTTOM, GRAM, TOP, expected_cosine, known_report


@pytest.mark.parametrize("tasks", ["abc", "cab", "bca"])
def test_run_level_scalars_follow_the_definitions_whatever_the_task_order(tasks):
    s = scalars(known_report(tasks=tasks, weights=(1.0, 0.5, 2.0)))
    w = {t: v for t, v in zip(tasks, (1.0, 0.5, 2.0))}
    n = {"a": 2.0, "b": 3.0, "c": 1.0}
    assert s["cos/a/b"] == pytest.approx(-1 / 3) and s["cos/a/c"] == pytest.approx(0.0)
    assert s["cos/b/c"] == pytest.approx(1.0)
    assert s["norm/a"] == pytest.approx(2.0) and s["norm/b"] == pytest.approx(3.0)
    # the update g = sum_i w_i g_i has |g|^2 = w^T G w, written out over the named entries of GRAM
    names = "abc"
    u2 = sum(w[x] * w[y] * float(GRAM[names.index(x), names.index(y)]) for x in names for y in names)
    assert s["update_norm"] == pytest.approx(math.sqrt(u2))
    assert s["cancellation"] == pytest.approx(1 - math.sqrt(u2) / sum(w[t] * n[t] for t in names))
    # alignment_i = (G w)_i / (n_i |g|)
    Gw_a = sum(w[y] * float(GRAM[0, names.index(y)]) for y in names)
    assert s["alignment/a"] == pytest.approx(Gw_a / (2.0 * math.sqrt(u2)))
    assert s["conflict_fraction"] == pytest.approx(1 / 3)  # a/b only: a/c sits at 0, not below
    assert s["worst_cosine"] == pytest.approx(-1 / 3)
    assert s["weight/b"] == w["b"] and s["loss/b"] == 2.0


def test_layer_scalars_are_each_layers_own():
    s = scalars(known_report(), layers=True)
    assert s["layer/body.0/cos/a/b"] == pytest.approx(expected_cosine(BOTTOM, 0, 1))
    assert s["layer/body.1/cos/a/b"] == pytest.approx(expected_cosine(TOP, 0, 1))
    assert s["layer/body.1/worst_cosine"] == pytest.approx(
        min(expected_cosine(TOP, i, j) for i, j in [(0, 1), (0, 2), (1, 2)])
    )
    assert s["layer/body.0/conflict_fraction"] == 0.0
    assert "layer/body.0/cos/a/b" not in scalars(known_report())  # layers only on request


def test_a_step_with_one_task_has_no_pair_quantity():
    s = scalars(ConflictReport(("a",), torch.tensor([[4.0]]), step=3), layers=True)
    assert s == {"weight/a": 1.0, "update_norm": 2.0, "condition_number": 1.0, "norm/a": 2.0}


def test_a_skipped_step_has_its_weights_and_losses_only_and_nothing_non_finite_is_written():
    skipped = ConflictReport.skipped_step(("a", "b"), 4, "non-finite loss", losses=torch.tensor([math.nan, 1.0]))
    assert scalars(skipped) == {"weight/a": 1.0, "weight/b": 1.0, "loss/b": 1.0}
    dependent = ConflictReport("ab", torch.ones(2, 2))  # parallel gradients: infinite condition number
    assert "condition_number" not in scalars(dependent) and scalars(dependent)["cos/a/b"] == pytest.approx(1.0)


def test_pair_key_sorts_the_names():
    assert pair_key("seg", "depth") == pair_key("depth", "seg") == "depth/seg"
