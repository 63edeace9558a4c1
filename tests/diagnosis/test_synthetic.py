"""The problems of known answer: well formed, branchable, and (a subset of the benchmark's family) diagnosed as
constructed. The expected answers come from each problem's construction, never from a threshold of the library;
the whole family is judged against what splitting actually does in ``benchmarks/diagnosis/``."""

import json

import pytest
import torch

from gradconflict import ConflictMonitor
from gradconflict.diagnosis import advise
from gradconflict.split import branch
from gradconflict.synthetic import FAMILY, KINDS, build_problem, make_problem

STEPS = 300
LR = 3e-3


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
    assert set(p.losses(x, y)) == {"a", "b"} and p.eval_x.shape == p.x.shape
    # The side input reaches the model only at block side_at, through its own layer.
    names = [n for n, _ in p.model.backbone.named_modules(prefix="backbone") if n.endswith((".linear", ".side"))]
    assert names == ["backbone.0.linear", "backbone.1.linear", "backbone.2.linear", "backbone.3.linear",
                     "backbone.3.side"]


def test_the_models_branch_like_any_model():
    p = make_problem("upper-2")
    split = branch(p.model, at="backbone.2", groups=[["a"], ["b"]])
    x = p.x[:16]
    assert all(torch.equal(split(x)[t], p.model(x)[t]) for t in p.tasks)  # the same function at the split
    fresh = p.factory(7)
    assert not torch.equal(fresh.backbone[0].linear.weight, p.model.backbone[0].linear.weight)
    assert torch.equal(fresh.backbone[0].linear.weight, p.factory(7).backbone[0].linear.weight)


def test_the_family_covers_the_cases_with_answers_fixed_by_construction():
    names = [s.name for s in FAMILY]
    assert len(FAMILY) >= 24 and len(set(names)) == len(names)
    verdicts = {s.expected_verdict for s in FAMILY}
    assert verdicts == {"keep_shared", "physical_split"}
    kinds = {
        "no conflict": [s for s in FAMILY if len({t for t in s.targets}) == 1],
        "everywhere": [s for s in FAMILY if s.expected_branch == "backbone.0"],
        "upper layers only": [s for s in FAMILY if s.expected_branch in ("backbone.2", "backbone.3")],
        "one against the rest": [s for s in FAMILY if "one-vs-rest" in s.name],
        "capacity not the limit": [s for s in FAMILY if s.readouts == "distinct"],
        "data the limit": [s for s in FAMILY if s.noise >= 0.3 and s.expected_verdict == "keep_shared"],
        "weak": [s for s in FAMILY if "weak" in s.name or "faint" in s.name],
    }
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
    for s in FAMILY:
        flat = sorted(t for g in s.expected_groups for t in g)
        assert flat == s.tasks and (s.expected_branch is None) == (s.expected_verdict == "keep_shared")
        if s.expected_branch is not None and s.side_at is not None:
            assert s.expected_branch == f"backbone.{s.side_at}"  # where the differing input enters
    assert set(KINDS.values()) <= set(names)


def test_problem_arguments():
    assert make_problem("two_groups").expected_groups == [["a", "b"], ["c", "d"]]
    assert make_problem("one-vs-rest-3").expected_groups == [["a", "b"], ["c"]]
    assert make_problem("aligned-3").expected_groups == [["a", "b", "c"]]
    assert make_problem("opposed", n=64).x.shape == (64, 6)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_problem("nope")


# A subset of the benchmark's family (the whole family, against what splitting does: benchmarks/DIAGNOSIS.md).
SUBSET = ["aligned-2", "noise-only-3", "distinct-opposed-2", "opposed-2", "one-vs-rest-3", "upper-2",
          "upper-3-two-groups"]


@pytest.mark.parametrize("name", SUBSET)
def test_advice_finds_the_construction(name):
    p = make_problem(name)
    monitor = p.train(STEPS, lr=LR)
    advice = advise(monitor.history, model=p.model, probe=p.x[:128])
    block = None if advice.branch_point is None else ".".join(advice.branch_point.split(".")[:2])
    assert (advice.verdict, block) == (p.expected_verdict, p.expected_branch), str(advice)
    assert advice.groups == p.expected_groups, str(advice)
    assert advice.uncertainty.decided, str(advice)
    assert advice.signal("heavy_heads").status == "ok"  # one fixed linear readout per task
    if p.expected_branch is not None:  # Recon's layers lie in the blocks that conflict
        assert advice.recon.layers and all(layer >= p.expected_branch for layer in advice.recon.layers)
    json.dumps(advice.to_dict(), allow_nan=False)


def test_data_noise_oscillates_instead_of_conflicting():
    p = make_problem("distinct-orthogonal-3")
    advice = advise(p.train(STEPS, lr=LR).history, model=p.model)
    assert advice.verdict == "keep_shared"
    assert advice.signal("oscillating_conflict").status == "watch" and "conflict oscillates" in advice.reason


@pytest.mark.parametrize("name", ["two-groups-4", "upper-3"])
def test_advice_is_robust_to_sparse_sampling_and_skipped_steps(name):
    p = make_problem(name)
    optimizer = torch.optim.Adam([w for w in p.model.parameters() if w.requires_grad], lr=LR)
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
    block = None if advice.branch_point is None else ".".join(advice.branch_point.split(".")[:2])
    assert (advice.verdict, advice.groups, block) == (p.expected_verdict, p.expected_groups, p.expected_branch)


def test_saved_run_gives_the_same_advice(tmp_path):
    from gradconflict.diagnosis import advise_from_jsonl

    p = build_problem(FAMILY[[s.name for s in FAMILY].index("upper-2")], seed=1)
    history = p.train(STEPS, lr=LR).history
    live = advise(history, model=p.model)
    saved = advise_from_jsonl(history.to_jsonl(tmp_path / "run.jsonl"))  # no model: natural layer order
    assert (saved.verdict, saved.groups, saved.branch_point) == (live.verdict, live.groups, live.branch_point)
    assert saved.signal("heavy_heads").status == "n/a"
