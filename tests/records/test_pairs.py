import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradconflict import ConflictReport, History
from gradconflict.records.pairs import ESCAPE, SEPARATOR, pair_key, split_pair_key
from gradconflict.records.sinks import scalars

# Names made of the characters that could confuse a key (the separator, the escape character, the characters of an
# escape sequence, a dash, spaces) and any others.
hostile = st.text(alphabet=st.sampled_from([SEPARATOR, ESCAPE, "2", "5", "F", "f", "-", " ", "a", "é"]), max_size=6)
names = st.one_of(hostile, st.text(max_size=6))


@given(names, names, names, names)
def test_distinct_pairs_never_share_a_key(a, b, c, d):
    same_pair = sorted((a, b)) == sorted((c, d))
    assert (pair_key(a, b) == pair_key(c, d)) == same_pair


@given(names, names)
def test_a_key_reads_back_as_its_two_names(a, b):
    assert split_pair_key(pair_key(a, b)) == tuple(sorted((a, b)))
    assert pair_key(a, b) == pair_key(b, a)


def test_ordinary_names_stay_readable_and_the_separator_is_escaped():
    assert pair_key("seg", "depth") == "depth/seg"
    assert pair_key("a/b", "c") == "a%2Fb/c" and pair_key("a", "b/c") == "a/b%2Fc"
    assert pair_key("50%", "x") == "50%25/x"
    with pytest.raises(ValueError, match="not a pair key"):
        split_pair_key("a/b/c")


def test_the_history_and_the_sinks_keep_pairs_of_colliding_names_apart():
    # With "/" joining raw names, the pairs (a/b, c) and (a, b/c) would share one column and one moving average.
    tasks = ("a", "a/b", "b/c", "c")
    cos = torch.tensor(
        [[1.0, 0.1, -0.2, 0.3], [0.1, 1.0, 0.4, -0.5], [-0.2, 0.4, 1.0, 0.6], [0.3, -0.5, 0.6, 1.0]],
        dtype=torch.float64,
    )
    history = History(ema_decay=0.0)
    history.append(ConflictReport(tasks, cos))
    ema, row, flat = history.ema, history.rows()[0], scalars(history[0])
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert len({pair_key(tasks[i], tasks[j]) for i, j in pairs}) == len(pairs)
    for i, j in pairs:
        key = pair_key(tasks[i], tasks[j])
        expected = float(cos[i, j])  # unit norms: the Gram is the cosine
        assert ema["cosine/" + key] == pytest.approx(expected)
        assert row["cosine/" + key] == pytest.approx(expected)
        assert flat["cos/" + key] == pytest.approx(expected)
    assert history.gradvac.keys() == {pair_key(tasks[i], tasks[j]) for i, j in pairs}
