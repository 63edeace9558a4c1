"""Controlled multi-task regression problems whose answer to "should we split, where, into which groups?" is
fixed by construction, before any run. Used by the tests of :mod:`gradconflict.diagnosis`, by the diagnosis
benchmark (``benchmarks/diagnosis/``, the whole :data:`FAMILY`), and by users and the demo to see what each
diagnosis looks like.

Every problem has the same kind of model (:class:`MultiTaskMLP`): a backbone of ``depth`` blocks, each a
``Linear`` (``backbone.k.linear``) and a ``Tanh``, and one frozen linear readout per task as its head, so that
whatever the targets ask of the network, they ask of the shared backbone. The input is ``x = [x_main, x_side]``:
``x_main`` enters at the bottom; ``x_side`` enters at block ``side_at`` only, through its own ``Linear``
(``backbone.k.side``), and the blocks from there up have no ``Tanh`` (so the lower blocks' Jacobian does not
depend on the side input, and nothing below ``side_at`` can see it). The backbone is an ``nn.Sequential`` of
blocks passing ``(features, x)`` along, so :func:`~gradconflict.split.branch` and
:func:`~gradconflict.split.compare` work on it as on any model.

Targets are built from ``f_k(x) = sin(2 u_k . x_main)`` (``u_k`` orthonormal, so different ``f_k`` are orthogonal
functions of the input) and ``v_k(x) = 1.2 sin(w_k . x_side)``, plus label noise: each task's own (``noise``) and
one draw shared by every task (``shared_noise``, a part of the labels nobody can learn, which keeps the lower
layers' gradients agreeing for the whole run).

What decides the answer, by construction and independently of any threshold of the library:

- **readouts**: ``"shared"``, the same readout vector for every task: the shared backbone can only output one
  function, so tasks whose targets differ compete for it (sharing is capacity-limited, and the difference is what
  a split recovers); ``"distinct"``: orthogonal readouts, so a wide enough backbone serves every task at once
  (capacity is not the limit: keep shared).
- **where the targets differ**: in a function of ``x_main`` (everywhere: the conflict starts at the bottom,
  ``backbone.0``), or only in a function of ``x_side`` (the conflict starts at block ``side_at``: the blocks below
  cannot see it), or nowhere.
- **how strongly, against the noise**: a difference far below the label noise is not worth a split (the data is
  the limit).

>>> p = make_problem("two_groups", seed=0)
>>> sorted(p.model(p.x[:3])), p.expected_groups, p.expected_branch
(['a', 'b', 'c', 'd'], [['a', 'b'], ['c', 'd']], 'backbone.0')
>>> len(FAMILY) >= 24
True
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradconflict.monitor import ConflictMonitor

__all__ = [
    "FAMILY",
    "KINDS",
    "MultiTaskMLP",
    "Problem",
    "Spec",
    "Target",
    "build_problem",
    "make_problem",
    "suppression_readout",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Verdict = Literal["keep_shared", "lora_split", "physical_split"]


class Block(nn.Module):
    """One backbone block: ``act(linear(h) + side(x_side))``, passing ``(features, x)`` along.

    The first block reads ``x_main`` from a plain input tensor; ``side`` (``None`` on most blocks) reads the side
    input, which only the block ``side_at`` does.
    """

    def __init__(self, d_in: int, width: int, d_main: int, side: int, activation: bool) -> None:
        super().__init__()
        self.d_main = d_main
        self.linear = nn.Linear(d_in, width)
        self.side = nn.Linear(side, width, bias=False) if side else None
        self.act = nn.Tanh() if activation else nn.Identity()

    def forward(self, state: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(features, x)`` -> ``(next features, x)``."""
        h, x = (state[..., : self.d_main], state) if isinstance(state, Tensor) else state
        out = self.linear(h)
        if self.side is not None:
            out = out + self.side(x[..., self.d_main :])
        return self.act(out), x


class Readout(nn.Module):
    """A frozen linear readout of the backbone's features: ``r . h`` (a head that cannot learn)."""

    def __init__(self, vector: Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(vector.numel(), 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(vector.reshape(1, -1))
        self.linear.weight.requires_grad_(False)

    def forward(self, state: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """The readout of the features, ``[batch]``."""
        h = state[0] if isinstance(state, tuple) else state
        return self.linear(h).squeeze(-1)


class MultiTaskMLP(nn.Module):
    """A shared MLP backbone of :class:`Block` s and one frozen :class:`Readout` per task (see the module docstring).

    Args:
        readouts: task -> readout vector (``[width]``).
        d_main: size of the main input (read by the first block).
        d_side: size of the side input (read by block ``side_at``; ignored when ``side_at`` is ``None``).
        width: hidden width.
        depth: number of blocks.
        side_at: the block that reads the side input; the blocks from there up have no ``Tanh``.
        generator: seeds the initialisation.
    """

    def __init__(
        self,
        readouts: dict[str, Tensor],
        *,
        d_main: int = 4,
        d_side: int = 2,
        width: int = 32,
        depth: int = 4,
        side_at: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.d_main, self.d_side, self.side_at = d_main, d_side, side_at
        self.backbone = nn.Sequential(*[
            Block(
                d_main if k == 0 else width, width, d_main, d_side if k == side_at else 0,
                activation=side_at is None or k < side_at,
            )
            for k in range(depth)
        ])
        with torch.no_grad():
            for p in self.backbone.parameters():
                # Seeded, so that the same seed gives the same model whatever the global RNG state.
                p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=generator) / p.shape[-1] ** 0.5)
        self.heads = nn.ModuleDict({t: Readout(r) for t, r in readouts.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Outputs ``{task: prediction of shape [batch]}`` for inputs ``x = [x_main, x_side]``."""
        state = self.backbone(x)
        return {t: head(state) for t, head in self.heads.items()}


@dataclass(frozen=True)
class Target:
    """One task's target: ``sum_k main[k] f_k(x_main) + sum_k side[k] v_k(x_side)`` plus the problem's noise."""

    main: tuple[float, ...] = (1.0,)
    side: tuple[float, ...] = ()


@dataclass(frozen=True)
class Spec:
    """A problem of the family, with its answer fixed by construction before any run.

    Attributes:
        name: a short name.
        targets: one :class:`Target` per task (tasks ``a``, ``b``, ...).
        readouts: ``"shared"`` (one readout for every task: sharing is capacity-limited) or ``"distinct"``
            (orthogonal readouts: the backbone can serve every task).
        side_at: the block that reads the side input (``None``: no side input).
        noise: standard deviation of each task's own label noise.
        shared_noise: standard deviation of the label noise common to every task.
        expected_verdict: the verdict the construction calls for.
        expected_branch: the block path from which the backbone should become task-specific (``None``: no split).
        expected_groups: the task groups the construction calls for.
        why: the construction's argument for that answer.
        width: hidden width of the backbone.
        depth: number of blocks.
    """

    name: str
    targets: tuple[Target, ...]
    readouts: Literal["shared", "distinct"]
    side_at: int | None
    noise: float
    shared_noise: float
    expected_verdict: Verdict
    expected_branch: str | None
    expected_groups: tuple[tuple[str, ...], ...]
    why: str
    width: int = 32
    depth: int = 4

    @property
    def tasks(self) -> list[str]:
        """Task names, ``a``, ``b``, ..."""
        return list(string.ascii_lowercase[: len(self.targets)])


@dataclass
class Problem:
    """A multi-task problem with its model, data and the answer fixed by construction.

    Attributes:
        kind: the problem's name (a :data:`KINDS` entry or a :data:`FAMILY` spec's name).
        model: the :class:`MultiTaskMLP` (``.backbone``, ``.heads``; ``model(x)`` -> ``{task: output}``).
        x: training inputs, ``[n, d_main + d_side]``.
        targets: ``{task: [n] tensor}``.
        loss_fns: ``{task: (output, target) -> scalar loss}`` (mean squared error).
        expected_verdict: the advice's verdict the problem is built to produce.
        expected_groups: the task groups the problem is built to have.
        expected_branch: the block from which the backbone should become task-specific (``None``: no split).
        seed: the seed of the data, the model and :meth:`batches`.
        eval_x: held-out inputs (fresh noise: what a split can and cannot recover).
        eval_targets: held-out targets.
        spec: the :class:`Spec` it was built from.
        factory: builds a fresh copy of the untrained model (same initialisation for a given seed).
    """

    kind: str
    model: MultiTaskMLP
    x: Tensor
    targets: dict[str, Tensor]
    loss_fns: dict[str, LossFn]
    expected_verdict: str
    expected_groups: list[list[str]]
    expected_branch: str | None
    seed: int = 0
    eval_x: Tensor | None = None
    eval_targets: dict[str, Tensor] = field(default_factory=dict)
    spec: Spec | None = None
    factory: Callable[[int], MultiTaskMLP] | None = None

    @property
    def tasks(self) -> list[str]:
        """Task names."""
        return list(self.targets)

    def losses(self, x: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each task's loss of :attr:`model` on one batch."""
        out = self.model(x)
        return {t: self.loss_fns[t](out[t], targets[t]) for t in self.tasks}

    def batches(self, batch_size: int = 64, seed: int | None = None) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """Endless minibatches ``(x, {task: target})``, drawn without replacement within each epoch; every call
        with the same ``seed`` (default: derived from the problem's) yields the same stream."""
        n = self.x.shape[0]
        generator = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = order[start : start + batch_size]
                yield self.x[idx], {t: y[idx] for t, y in self.targets.items()}

    def train(
        self, steps: int = 100, *, batch_size: int = 64, lr: float = 1e-2, **monitor_kwargs: Any
    ) -> ConflictMonitor:
        """Train :attr:`model` with Adam for ``steps`` steps under a :class:`~gradconflict.ConflictMonitor`
        (built with ``monitor_kwargs``) and return the closed monitor, whose ``history`` holds the run."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr)
        with ConflictMonitor(self.model, **monitor_kwargs) as monitor:
            for _, (x, targets) in zip(range(steps), self.batches(batch_size)):
                optimizer.zero_grad()
                monitor.backward(self.losses(x, targets))
                optimizer.step()
        return monitor


def _target(*main: float, side: tuple[float, ...] = ()) -> Target:
    return Target(tuple(main), side)


def _spec(
    name: str,
    targets: list[Target],
    verdict: Verdict,
    why: str,
    *,
    readouts: Literal["shared", "distinct"] = "shared",
    side_at: int | None = None,
    noise: float = 0.1,
    shared_noise: float = 0.0,
    groups: list[list[str]] | None = None,
) -> Spec:
    tasks = list(string.ascii_lowercase[: len(targets)])
    if verdict == "keep_shared":
        expected_groups = [tasks]
    else:
        expected_groups = groups if groups is not None else [[t] for t in tasks]
    branch = None if verdict == "keep_shared" else f"backbone.{side_at or 0}"
    return Spec(
        name, tuple(targets), readouts, side_at, noise, shared_noise, verdict, branch,
        tuple(tuple(g) for g in expected_groups), why,
    )


_V1 = (0.0, 1.0)  # shorthand for the second side function, v_1
_SHARED_SIDE = 1.0  # the shared label noise that keeps the lower layers agreeing in the upper-conflict problems

#: The diagnosis benchmark's problems, each with its answer fixed by construction (see the module docstring).
FAMILY: tuple[Spec, ...] = (
    # --- no conflict: keep shared
    _spec("aligned-2", [_target(1), _target(1)], "keep_shared", "both tasks want the same function"),
    _spec("aligned-3", [_target(1)] * 3, "keep_shared", "all three tasks want the same function"),
    _spec("aligned-noisy", [_target(1), _target(1)], "keep_shared", "same function, heavy label noise: the data is "
          "the limit, and sharing pools it", noise=1.0),
    _spec("noise-only-3", [_target(1)] * 3, "keep_shared", "same function, each task its own noise: differences "
          "are noise only", noise=0.7),
    _spec("aligned-side", [_target(1, side=(1.0,))] * 2, "keep_shared", "same function of both inputs",
          side_at=2, shared_noise=_SHARED_SIDE),
    _spec("distinct-orthogonal-2", [_target(1), _target(0, 1)], "keep_shared", "different functions, but each task "
          "reads its own direction of a wide backbone: capacity is not the limit", readouts="distinct"),
    _spec("distinct-opposed-2", [_target(1), _target(-1)], "keep_shared", "opposite targets read through "
          "orthogonal readouts: the backbone serves both at once", readouts="distinct"),
    _spec("distinct-orthogonal-3", [_target(1), _target(0, 1), _target(0, 0, 1)], "keep_shared", "three different "
          "functions through orthogonal readouts", readouts="distinct"),
    _spec("distinct-upper-2", [_target(1, side=(1.0,)), _target(1, side=(-1.0,))], "keep_shared", "opposite side "
          "functions through orthogonal readouts", readouts="distinct", side_at=2, shared_noise=_SHARED_SIDE),
    _spec("faint-bottom-2", [_target(1), _target(1, 0.05)], "keep_shared", "the targets differ by 5% of a function, "
          "far below the label noise: not worth a split", noise=0.3),
    _spec("faint-upper-2", [_target(1, side=(0.05,)), _target(1, side=(-0.05,))], "keep_shared", "the side "
          "functions differ by a tenth of the label noise", side_at=3, noise=0.3, shared_noise=_SHARED_SIDE),
    # --- conflict everywhere (in a function of the main input): split at the bottom
    _spec("opposed-2", [_target(1), _target(-1)], "physical_split", "opposite targets through one readout"),
    _spec("orthogonal-2", [_target(1), _target(0, 1)], "physical_split", "orthogonal targets through one readout"),
    _spec("angle-60-2", [_target(1), _target(0.5, 0.866)], "physical_split", "targets 60 degrees apart through one "
          "readout: a weaker conflict"),
    _spec("orthogonal-3", [_target(1), _target(0, 1), _target(0, 0, 1)], "physical_split", "three orthogonal "
          "targets through one readout"),
    _spec("opposed-noisy-2", [_target(1), _target(-1)], "physical_split", "opposite targets, noise well below the "
          "difference", noise=0.7),
    _spec("one-vs-rest-3", [_target(1), _target(1), _target(-1)], "physical_split", "c wants the opposite of a "
          "and b", groups=[["a", "b"], ["c"]]),
    _spec("one-vs-rest-4", [_target(1), _target(1), _target(1), _target(0, 1)], "physical_split", "d wants "
          "another function than a, b, c", groups=[["a", "b", "c"], ["d"]]),
    _spec("two-groups-4", [_target(1), _target(1), _target(-1), _target(-1)], "physical_split", "a, b want f and "
          "c, d want -f", groups=[["a", "b"], ["c", "d"]]),
    # --- conflict in the upper layers only (in a function of the side input): split where it enters
    _spec("upper-2", [_target(1, side=(1.0,)), _target(1, side=(-1.0,))], "physical_split", "the tasks agree on "
          "the main input and want opposite functions of the side input, seen from block 2 up", side_at=2,
          shared_noise=_SHARED_SIDE),
    _spec("upper-2-weak", [_target(1, side=(0.4,)), _target(1, side=(-0.4,))], "physical_split", "as upper-2, "
          "with a difference 0.4 times as large", side_at=2, shared_noise=_SHARED_SIDE),
    _spec("upper-3", [_target(1, side=(1.0,)), _target(1, side=(-1.0,))], "physical_split", "opposite side "
          "functions, seen by the top block only", side_at=3, shared_noise=_SHARED_SIDE),
    _spec("upper-3-weak", [_target(1, side=(0.4,)), _target(1, side=(-0.4,))], "physical_split", "as upper-3, "
          "with a difference 0.4 times as large", side_at=3, shared_noise=_SHARED_SIDE),
    _spec("upper-3-orthogonal", [_target(1, side=(1.0,)), _target(1, side=_V1)], "physical_split", "orthogonal "
          "side functions, seen by the top block only", side_at=3, shared_noise=_SHARED_SIDE),
    _spec("upper-2-noisy", [_target(1, side=(1.0,)), _target(1, side=(-1.0,))], "physical_split", "as upper-2 "
          "with more label noise, still well below the difference", side_at=2, noise=0.5,
          shared_noise=_SHARED_SIDE),
    _spec("upper-2-one-vs-rest", [_target(1, side=(1.0,)), _target(1, side=(1.0,)), _target(1, side=(-1.0,))],
          "physical_split", "c wants the opposite side function of a and b, seen from block 2 up", side_at=2,
          shared_noise=_SHARED_SIDE, groups=[["a", "b"], ["c"]]),
    _spec("upper-3-two-groups", [_target(1, side=(1.0,))] * 2 + [_target(1, side=(-1.0,))] * 2,
          "physical_split", "a, b and c, d want opposite side functions, seen by the top block only", side_at=3,
          shared_noise=_SHARED_SIDE, groups=[["a", "b"], ["c", "d"]]),
)

_BY_NAME = {spec.name: spec for spec in FAMILY}

#: Named problems for examples and tests (each an alias of a :data:`FAMILY` spec).
KINDS: dict[str, str] = {
    "aligned": "aligned-2",
    "opposed": "opposed-2",
    "orthogonal": "orthogonal-2",
    "top_conflict": "upper-3",
    "two_groups": "two-groups-4",
}


def build_problem(spec: Spec, seed: int = 0, *, n: int = 1024, d_main: int = 4, d_side: int = 2) -> Problem:
    """Draw the data of ``spec`` (``n`` training and ``n`` held-out samples) and build its model, all seeded by
    ``seed``: the same seed gives the same problem and the same initialisation (:attr:`Problem.factory` builds a
    fresh untrained copy for a model seed)."""
    gen = torch.Generator().manual_seed(seed)
    tasks = spec.tasks
    x = torch.randn(2 * n, d_main + d_side, generator=gen)
    main, side = x[:, :d_main], x[:, d_main:]
    U = torch.linalg.qr(torch.randn(d_main, d_main, generator=gen))[0].T
    W = torch.linalg.qr(torch.randn(d_side, d_side, generator=gen))[0].T
    f = [torch.sin(2.0 * main @ U[k]) for k in range(d_main)]
    v = [1.2 * torch.sin(side @ W[k]) for k in range(d_side)]
    common = spec.shared_noise * torch.randn(2 * n, generator=gen)
    ys = {}
    for task, target in zip(tasks, spec.targets):
        y = sum(c * f[k] for k, c in enumerate(target.main)) + sum(c * v[k] for k, c in enumerate(target.side))
        ys[task] = y + common + spec.noise * torch.randn(2 * n, generator=gen)
    if spec.readouts == "shared":
        r = torch.randn(spec.width, generator=gen)
        readouts = {t: 3 * r / r.norm() for t in tasks}
    else:
        Q = torch.linalg.qr(torch.randn(spec.width, len(tasks), generator=gen))[0]
        readouts = {t: 3 * Q[:, k] for k, t in enumerate(tasks)}
    side_at = spec.side_at

    def factory(model_seed: int = seed) -> MultiTaskMLP:
        return MultiTaskMLP(
            readouts, d_main=d_main, d_side=d_side, width=spec.width, depth=spec.depth, side_at=side_at,
            generator=torch.Generator().manual_seed(10_000 + model_seed),
        )

    return Problem(
        kind=spec.name, model=factory(seed), x=x[:n], targets={t: y[:n] for t, y in ys.items()},
        loss_fns=dict.fromkeys(tasks, F.mse_loss), expected_verdict=spec.expected_verdict,
        expected_groups=[list(g) for g in spec.expected_groups], expected_branch=spec.expected_branch, seed=seed,
        eval_x=x[n:], eval_targets={t: y[n:] for t, y in ys.items()}, spec=spec, factory=factory,
    )


def make_problem(kind: str, *, seed: int = 0, **kwargs: Any) -> Problem:
    """The problem called ``kind``: a :data:`KINDS` alias or a :data:`FAMILY` spec's name (see
    :func:`build_problem` for ``seed`` and the sizes in ``kwargs``).

    >>> p = make_problem("opposed", seed=1)
    >>> p.tasks, p.expected_verdict, p.expected_branch
    (['a', 'b'], 'physical_split', 'backbone.0')
    >>> make_problem("upper-2").expected_branch          # the side input enters at block 2
    'backbone.2'
    """
    name = KINDS.get(kind, kind)
    if name not in _BY_NAME:
        raise ValueError(f"kind must be one of {sorted(KINDS)} or a FAMILY name {sorted(_BY_NAME)}, got {kind!r}")
    return build_problem(_BY_NAME[name], seed, **kwargs)


def suppression_readout(width: int) -> nn.Linear:
    """A frozen head that reads the mean of ``width`` shared features: with a target below what non-negative
    features (after a ReLU) can reach, say ``-1``, its task is built to conflict with any task that needs those
    features, since its gradient pushes every shared feature down. Add it to a model as an extra task to see
    what a conflicting task looks like in the reports and the advice (the demo does).

    >>> head = suppression_readout(4)
    >>> head(torch.ones(1, 4)).item(), head.weight.requires_grad
    (1.0, False)
    """
    head = nn.Linear(width, 1)
    with torch.no_grad():
        head.weight.fill_(1.0 / width)
        head.bias.zero_()
    head.requires_grad_(False)
    return head
