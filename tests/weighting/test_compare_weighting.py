"""The comparison experiment's ``shared+<method>`` variants, and the advice that proposes them."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from torch import nn

from gradconflict.diagnosis import advise, next_step_code
from gradconflict.measure.report import ConflictReport
from gradconflict.split import MultiTaskNet, compare


def _factory() -> MultiTaskNet:
    backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    return MultiTaskNet(backbone, {"a": nn.Linear(16, 1), "b": nn.Linear(16, 1)})


def _data():
    g = torch.Generator().manual_seed(0)
    return [(x, {"a": x[:, :1], "b": -x[:, :1]}) for x in torch.randn(4, 32, 4, generator=g)]


MSE = {"a": nn.functional.mse_loss, "b": nn.functional.mse_loss}


def plain(gram, losses):
    """Weights 1 each: the plain sum, so the variant must train exactly as "shared" does."""
    return [1.0] * len(losses)


def test_weighting_variants_train_on_the_same_batches_from_the_same_start():
    result = compare(_factory, MSE, _data(), steps=8, variants=("shared",), progress=False, evals=2,
                     weightings=[plain, "mgda"])
    assert list(result.variants) == ["shared", "shared+plain", "shared+mgda"]
    assert result["shared+plain"].losses == result["shared"].losses
    assert result["shared+mgda"].losses != result["shared"].losses  # the conflicting tasks: MGDA changes the steps
    assert result["shared+mgda"].losses["a"][0] == result["shared"].losses["a"][0]  # same start, same first batch
    assert len(result.rows) == 6 and {r["variant"] for r in result.rows} == set(result.variants)


def test_unknown_or_repeated_weightings_fail_before_training():
    with pytest.raises(ValueError, match="unknown weighting 'gradvacc'"):
        compare(_factory, MSE, _data(), steps=2, progress=False, weightings=["gradvacc"])
    with pytest.raises(ValueError, match="twice"):
        compare(_factory, MSE, _data(), steps=2, progress=False, weightings=["mgda", "MGDA"])


def _weightings(code: str) -> list[str]:
    """The ``weightings=[...]`` list that a next step's ``compare`` call passes."""
    (found,) = re.findall(r"weightings=(\[[^\]]*\])", code)
    return ast.literal_eval(found)


def test_next_step_offers_the_weightings_only_for_conflict():
    for verdict in ("lora_split", "physical_split"):
        code = next_step_code(verdict, "backbone.2", [["a"], ["b"]], conflict=True)
        ast.parse(code)
        assert _weightings(code) == ["upgrad", "pcgrad"]
        assert _weightings(next_step_code(verdict, "backbone.2", [["a"], ["b"]])) == []


def test_advice_on_conflicting_gradients_proposes_the_weightings():
    fight, agree = torch.tensor([[1.0, -0.8], [-0.8, 1.0]]), torch.tensor([[1.0, 0.9], [0.9, 1.0]])
    conflicting = [ConflictReport("ab", fight, losses=torch.ones(2), step=s) for s in range(8)]
    calm = [ConflictReport("ab", agree, losses=torch.ones(2), step=s) for s in range(8)]
    assert advise(conflicting).signal("diverging_objectives").status == "split"
    assert _weightings(advise(conflicting).next_step) == ["upgrad", "pcgrad"]
    assert _weightings(advise(calm).next_step) == []
