"""End-to-end: train each controlled problem under a ConflictMonitor and check that the advice finds the truth
that the problem was built with, for several seeds."""

import json

import pytest
import torch

from gradconflict import ConflictMonitor
from gradconflict.diagnosis import advise
from gradconflict.synthetic import KINDS, make_problem

STEPS = 80


def test_problems_are_seeded_and_well_formed():
    p, q, r = make_problem("top_conflict", seed=3), make_problem("top_conflict", seed=3), make_problem("top_conflict")
    assert torch.equal(p.x, q.x) and all(torch.equal(p.targets[t], q.targets[t]) for t in p.tasks)
    assert all(torch.equal(a, b) for a, b in zip(p.model.parameters(), q.model.parameters()))
    assert not torch.equal(p.x, r.x)
    x, y = next(p.batches(32))
    assert x.shape == (32, 6) and set(y) == {"a", "b"} and y["a"].shape == (32,)
    assert torch.equal(x, next(q.batches(32))[0]) and torch.equal(x, next(p.batches(32))[0])
    assert not torch.equal(x, next(p.batches(32, seed=99))[0])
    out = p.model(x)
    assert set(out) == {"a", "b"} and out["a"].shape == (32,)
    assert not any(w.requires_grad for w in p.model.heads.parameters())  # fixed readouts
    assert set(p.losses(x, y)) == {"a", "b"}


def test_problem_arguments():
    assert make_problem("opposed", n_tasks=4).expected_groups == [["a", "c"], ["b", "d"]]
    assert make_problem("orthogonal", n_tasks=3).expected_groups == [["a"], ["b"], ["c"]]
    assert make_problem("aligned", n_tasks=3).expected_groups == [["a", "b", "c"]]
    with pytest.raises(ValueError, match="kind"):
        make_problem("nope")
    with pytest.raises(ValueError, match="exactly 4"):
        make_problem("two_groups", n_tasks=3)
    with pytest.raises(ValueError, match="out of range"):
        make_problem("orthogonal", n_tasks=5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_advice_finds_the_truth(kind, seed):
    p = make_problem(kind, seed=seed)
    monitor = p.train(STEPS)
    advice = advise(monitor.history, model=p.model, probe=p.x[:128])
    assert advice.verdict == p.expected_verdict, str(advice)
    assert advice.groups == p.expected_groups, str(advice)
    assert advice.branch_point == p.expected_branch, str(advice)
    assert advice.signal("heavy_heads").status == "ok"  # one fixed linear readout per task
    json.dumps(advice.to_dict(), allow_nan=False)


@pytest.mark.parametrize(("kind", "n_tasks"), [("opposed", 4), ("orthogonal", 3)])
def test_advice_with_more_tasks(kind, n_tasks):
    p = make_problem(kind, n_tasks=n_tasks, seed=0)
    advice = advise(p.train(STEPS).history, model=p.model)
    assert (advice.verdict, advice.groups, advice.branch_point) == (
        p.expected_verdict, p.expected_groups, p.expected_branch
    )


@pytest.mark.parametrize("kind", ["two_groups", "top_conflict"])
def test_advice_is_robust_to_sparse_sampling_and_skipped_steps(kind):
    p = make_problem(kind, seed=0)
    optimizer = torch.optim.Adam([w for w in p.model.parameters() if w.requires_grad], lr=1e-2)
    with ConflictMonitor(p.model, every=2, on_nonfinite="skip") as monitor:
        for step, (x, y) in zip(range(2 * STEPS), p.batches(64)):
            optimizer.zero_grad()
            losses = p.losses(x, y)
            if step in (10, 50):
                losses["a"] = losses["a"] * float("nan")
            monitor.backward(losses)
            optimizer.step()
    assert sum(r.skipped for r in monitor.history) == 2
    advice = advise(monitor.history, model=p.model)
    assert (advice.verdict, advice.groups, advice.branch_point) == (
        p.expected_verdict, p.expected_groups, p.expected_branch
    )


def test_saved_run_gives_the_same_advice(tmp_path):
    from gradconflict.diagnosis import advise_from_jsonl

    p = make_problem("top_conflict", seed=1)
    history = p.train(STEPS).history
    live = advise(history, model=p.model)
    saved = advise_from_jsonl(history.to_jsonl(tmp_path / "run.jsonl"))  # no model: natural layer order
    assert (saved.verdict, saved.groups, saved.branch_point) == (live.verdict, live.groups, live.branch_point)
    assert saved.signal("heavy_heads").status == "n/a"
