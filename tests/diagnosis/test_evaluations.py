import numpy as np
import pytest

from gradconflict.diagnosis import EvalTable


def test_trade_offs_respect_directions_and_tolerance():
    rows = [
        {"acc_a": 0.80, "loss_b": 1.00, "step": 0},
        {"acc_a": 0.82, "loss_b": 1.02, "step": 1},  # a +2.5%, b worse by 2%: trade-off
        {"acc_a": 0.83, "loss_b": 0.98, "step": 2},  # both better
        {"acc_a": 0.8305, "loss_b": 0.99, "step": 3},  # a +0.06% (noise), b worse: not a trade-off
    ]
    t = EvalTable.from_rows(rows, {"acc_a": "max", "loss_b": "min"})
    assert t.metrics == ("acc_a", "loss_b")
    assert t.changes()[0] == pytest.approx([0.025, -0.02])
    assert t.trade_off_share(tolerance=0.01) == pytest.approx(1 / 3)
    assert t.trade_off_share(tolerance=0.03) == 0.0
    assert t.pareto_front() == [2, 3]  # 2 dominates 0 and 1; 3 has the best acc_a
    assert len(t.changes("all")) == 6
    with pytest.raises(ValueError, match="pairs"):
        t.changes("some")


def test_dataframe_and_errors():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [1.0, 2.0, 1.5], "b": [1.0, 0.5, 2.0]})
    t = EvalTable.from_rows(df, {"a": "max", "b": "max"})
    assert t.directions == ("max", "max")
    assert t.trade_off_share(0.01) == 1.0
    assert sorted(t.pareto_front()) == [1, 2]
    with pytest.raises(ValueError, match="two rows"):
        EvalTable.from_rows([{"a": 1.0}], {"a": "max"})
    with pytest.raises(ValueError, match="missing"):
        EvalTable.from_rows([{"a": 1.0}, {"b": 2.0}], {"a": "max"})
    # No default direction: an error metric read as higher-is-better would invert every change.
    with pytest.raises(ValueError, match=r"give the direction of each evaluation metric.*\['a', 'b'\]"):
        EvalTable.from_rows(df, {})
    with pytest.raises(ValueError, match="'max' \\(higher is better\\)"):
        EvalTable.from_rows(df, {"a": "higher"})


def test_zero_baseline_uses_absolute_change():
    t = EvalTable.from_rows([{"a": 0.0, "b": 1.0}, {"a": 0.5, "b": 0.5}], {"a": "max", "b": "max"})
    assert t.changes() == pytest.approx(np.array([[0.5, -0.5]]))
