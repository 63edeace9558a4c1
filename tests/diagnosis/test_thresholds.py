import dataclasses

import pytest

from gradconflict.diagnosis import Thresholds


def test_defaults_are_documented_and_frozen():
    t = Thresholds()
    assert t.conflict_cosine == 0.0 and t.alpha == 0.05
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.conflict_cosine = -0.1  # type: ignore[misc]
    doc = Thresholds.__doc__ or ""
    for f in dataclasses.fields(Thresholds):
        assert f"{f.name}:" in doc, f"{f.name} is not documented"


def test_from_mapping_overrides_and_rejects_typos():
    assert Thresholds.from_mapping(None) == Thresholds()
    t = Thresholds(alpha=0.01)
    assert Thresholds.from_mapping(t) is t
    assert Thresholds.from_mapping({"conflict_cosine": -0.1}).conflict_cosine == -0.1
    with pytest.raises(ValueError, match="conflict_cosin"):
        Thresholds.from_mapping({"conflict_cosin": -0.1})
