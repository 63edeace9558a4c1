"""Controlled multi-task regression problems whose answer to "should we split, where, into which groups?" is
known by construction. Used by the tests of :mod:`gradconflict.diagnosis`, and by users and the demo to see what
each diagnosis looks like.

Every problem has the same small model: a backbone of four ``Linear`` + ``Tanh`` blocks (``nn.Sequential``,
layers ``backbone.0``, ``backbone.2``, ``backbone.4``, ``backbone.6``) and one head per task. The heads are
*fixed readouts*, identical across tasks and frozen: a head cannot absorb a difference between two targets (a
trainable linear head could simply learn ``-1`` for a negated target), so whatever the targets ask of the
network, they ask of the shared backbone. The inputs are ``x = [x_main, x_side]``; ``x_main`` enters at the
bottom, ``x_side`` is concatenated to the features just before ``backbone.4`` (only the top two layers see it).

Targets use ``f_k(x) = sin(u_k . x_main)`` with orthonormal directions ``u_k`` (so different ``f_k`` are
orthogonal functions of the input) and ``v(x) = s . x_side`` (``|s| = 1``):

======================  =======================================================  ==========================
kind                    targets                                                  truth
======================  =======================================================  ==========================
``"aligned"``           every task: ``f_0``                                      keep shared, one group
``"opposed"``           task ``k``: ``(-1)^k f_0``                               split at ``backbone.0``,
                                                                                 groups by sign
``"orthogonal"``        task ``k``: ``f_k``                                      split, one group per task
``"top_conflict"``      ``f_0 + e +/- v``; ``e`` a noise shared by both tasks    split at ``backbone.4``
``"two_groups"``        tasks 0, 1: ``f_0``; tasks 2, 3: ``-f_0``                groups ``[[a, b], [c, d]]``
======================  =======================================================  ==========================

In ``"top_conflict"`` the two tasks agree on ``f_0`` and on the shared label noise ``e`` (which keeps the
agreeing gradient alive on the lower layers for the whole run) and disagree only on ``v``, a function of the
side input that only the layers from ``backbone.4`` up can see. Those top blocks are linear (no ``Tanh``), so
the lower layers' Jacobian does not depend on the side input and ``v`` reaches them only as batch noise: the
conflict lives in the top layers.

>>> p = make_problem("two_groups", seed=0)
>>> sorted(p.model(p.x[:3])), p.expected_groups
(['a', 'b', 'c', 'd'], [['a', 'b'], ['c', 'd']])
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradconflict.monitor import ConflictMonitor

__all__ = ["KINDS", "MultiTaskMLP", "Problem", "make_problem", "suppression_readout"]

#: The kinds of problem :func:`make_problem` builds.
KINDS = ("aligned", "opposed", "orthogonal", "top_conflict", "two_groups")

LossFn = Callable[[Tensor, Tensor], Tensor]


class MultiTaskMLP(nn.Module):
    """A shared MLP backbone with a side input joining before block ``side_at``, and one fixed readout per task.

    Args:
        tasks: task names.
        d_main: size of the main input (read by the first layer).
        d_side: size of the side input (concatenated before backbone block ``side_at``; 0 for none).
        width: hidden width.
        depth: number of ``Linear`` + ``Tanh`` blocks.
        side_at: index of the block that first sees the side input.
        linear_top: blocks from ``side_at`` up have no ``Tanh`` (an ``nn.Identity`` in its place), so that the
            side input reaches the output linearly and the lower layers' Jacobian does not depend on it.
        generator: seeds the initialisation.
    """

    def __init__(
        self,
        tasks: list[str],
        *,
        d_main: int = 4,
        d_side: int = 2,
        width: int = 16,
        depth: int = 4,
        side_at: int = 2,
        linear_top: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.d_main, self.d_side, self.side_at = d_main, d_side, side_at
        layers: list[nn.Module] = []
        for k in range(depth):
            d_in = d_main if k == 0 else width
            act = nn.Identity() if linear_top and k >= side_at else nn.Tanh()
            layers += [nn.Linear(d_in + (d_side if k == side_at else 0), width), act]
        self.backbone = nn.Sequential(*layers)
        readout = torch.randn(width, generator=generator) / width**0.5
        self.heads = nn.ModuleDict({t: nn.Linear(width, 1, bias=False) for t in tasks})
        with torch.no_grad():
            for p in self.parameters():
                # Seeded, so that the same seed gives the same model whatever the global RNG state.
                p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=generator) / p.shape[-1] ** 0.5)
            for head in self.heads.values():
                head.weight.copy_(readout)
                head.weight.requires_grad_(False)  # fixed readout: a head cannot absorb a target's sign

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Outputs ``{task: prediction of shape [batch]}`` for inputs ``x = [x_main, x_side]``."""
        main, side = x[..., : self.d_main], x[..., self.d_main :]
        h = main
        for index, module in enumerate(self.backbone):
            if index == 2 * self.side_at and self.d_side:
                h = torch.cat([h, side], dim=-1)
            h = module(h)
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}


@dataclass
class Problem:
    """A multi-task problem with its model, data and the known answer.

    Attributes:
        kind: one of :data:`KINDS`.
        model: the :class:`MultiTaskMLP` (``.backbone``, ``.heads``; ``model(x)`` -> ``{task: output}``).
        x: all inputs, ``[n, d_main + d_side]``.
        targets: ``{task: [n] tensor}``.
        loss_fns: ``{task: (output, target) -> scalar loss}`` (mean squared error).
        expected_verdict: the advice's verdict the problem is built to produce.
        expected_groups: the task groups the problem is built to have.
        expected_branch: the layer from which the backbone should become task-specific (``None``: no split).
        seed: the seed of the data, the model and :meth:`batches`.
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


def _task_names(n: int) -> list[str]:
    return list(string.ascii_lowercase[:n])


def make_problem(
    kind: str,
    *,
    n_tasks: int | None = None,
    seed: int = 0,
    n: int = 512,
    d_main: int = 4,
    d_side: int = 2,
    width: int = 16,
    noise: float = 2.0,
) -> Problem:
    """Build a controlled problem of the given ``kind`` (see the module docstring for the table of kinds).

    Args:
        kind: one of :data:`KINDS`.
        n_tasks: number of tasks; defaults to 4 for ``"two_groups"`` (the only value it takes), 2 for
            ``"top_conflict"`` (likewise) and 2 otherwise. ``"orthogonal"`` takes at most ``d_main``.
        seed: seeds data, initialisation and batches: the same seed gives the same problem.
        n: number of samples.
        d_main: size of the main input.
        d_side: size of the side input.
        width: hidden width of the backbone.
        noise: standard deviation of the shared label noise of ``"top_conflict"``.

    >>> p = make_problem("opposed", seed=1)
    >>> p.tasks, p.expected_verdict, p.expected_branch
    (['a', 'b'], 'physical_split', 'backbone.0')
    >>> bool(torch.equal(p.targets["a"], -p.targets["b"]))
    True
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    fixed = {"two_groups": 4, "top_conflict": 2}
    if kind in fixed and n_tasks not in (None, fixed[kind]):
        raise ValueError(f"kind {kind!r} has exactly {fixed[kind]} tasks, got n_tasks={n_tasks}")
    T = n_tasks if n_tasks is not None else fixed.get(kind, 2)
    if T < 1 or (kind == "orthogonal" and T > d_main):
        raise ValueError(f"n_tasks={T} is out of range for kind {kind!r} (orthogonal needs n_tasks <= d_main)")
    gen = torch.Generator().manual_seed(seed)
    tasks = _task_names(T)
    x = torch.randn(n, d_main + d_side, generator=gen)
    main, side = x[:, :d_main], x[:, d_main:]
    # Orthonormal directions: sin(u_k . x) for different k are orthogonal functions of a Gaussian input.
    U = torch.linalg.qr(torch.randn(d_main, d_main, generator=gen))[0].T * 1.5
    f = [torch.sin(main @ U[k]) for k in range(d_main)]
    branch: str | None = "backbone.0"
    verdict = "physical_split"
    if kind == "aligned":
        ys, groups, branch, verdict = [f[0]] * T, [tasks], None, "keep_shared"
    elif kind == "opposed":
        ys = [f[0] * (-1) ** k for k in range(T)]
        groups = [g for g in (tasks[0::2], tasks[1::2]) if g]
    elif kind == "orthogonal":
        ys, groups = f[:T], [[t] for t in tasks]
    elif kind == "top_conflict":
        direction = torch.randn(d_side, generator=gen)
        v = side @ (direction / direction.norm())
        shared = f[0] + noise * torch.randn(n, generator=gen)
        ys, groups, branch = [shared + v, shared - v], [["a"], ["b"]], "backbone.4"
    else:
        ys, groups = [f[0], f[0], -f[0], -f[0]], [["a", "b"], ["c", "d"]]
    model = MultiTaskMLP(
        tasks, d_main=d_main, d_side=d_side, width=width, linear_top=kind == "top_conflict", generator=gen
    )
    return Problem(
        kind=kind, model=model, x=x, targets=dict(zip(tasks, ys)), loss_fns=dict.fromkeys(tasks, F.mse_loss),
        expected_verdict=verdict, expected_groups=groups, expected_branch=branch, seed=seed,
    )


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
