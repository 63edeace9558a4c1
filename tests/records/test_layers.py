"""A run's layer order: the steps' orders merged into one, keeping each step's wherever the steps agree."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gradconflict.records.layers import merge_orders, natural_key


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    rest = iter(whole)
    return all(name in rest for name in part)


@st.composite
def _steps_of_one_network(draw):
    """A network's layers bottom to top, and the steps of a run: each carries some of them, in that order."""
    depth = draw(st.integers(1, 12))
    layers = [f"layer{k}" for k in draw(st.permutations(range(depth)))]  # names unrelated to depth
    steps = draw(st.lists(st.lists(st.booleans(), min_size=depth, max_size=depth), min_size=1, max_size=6))
    return layers, [[name for name, kept in zip(layers, mask) if kept] for mask in steps]


@given(_steps_of_one_network())
def test_the_merged_order_keeps_every_step_order(drawn):
    layers, steps = drawn
    merged = merge_orders(steps)
    carried = {name for step in steps for name in step}
    assert sorted(merged) == sorted(carried)  # every layer met, once
    assert all(_is_subsequence(step, merged) for step in steps)
    # Two layers that the steps order, directly or through others (a below b in one step, b below c in another),
    # come in the network's order.
    below = {(a, b) for step in steps for a, b in zip(step, step[1:])}
    while True:
        longer = below | {(a, c) for a, b in below for b2, c in below if b == b2}
        if longer == below:
            break
        below = longer
    assert all(merged.index(a) < merged.index(b) for a, b in below)
    assert all(layers.index(a) < layers.index(b) for a, b in below)  # (the construction's, as a check of the test)


def test_a_layer_added_mid_run_goes_where_its_step_puts_it():
    # An adapter put in on top of body, then a block frozen: the network's order throughout.
    steps = [["stem", "body", "neck"], ["stem", "body", "body.lora", "neck"], ["body", "body.lora", "neck"]]
    assert merge_orders(steps) == ["stem", "body", "body.lora", "neck"]
    assert merge_orders([["neck"], ["stem", "neck"]]) == ["stem", "neck"]  # first in its step: before the next known
    assert merge_orders([]) == []


def test_steps_that_disagree_are_settled_by_the_earlier_one():
    assert merge_orders([["b", "a"], ["a", "b", "c"]]) == ["b", "a", "c"]


def test_natural_key_compares_digits_as_numbers():
    names = ["enc.layer.10", "enc.layer.2", "enc.layer.1.attn", "emb"]
    assert sorted(names, key=natural_key) == ["emb", "enc.layer.1.attn", "enc.layer.2", "enc.layer.10"]
