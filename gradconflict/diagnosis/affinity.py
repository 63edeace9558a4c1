"""Inter-task affinity: how a step on task ``i`` changes task ``j``'s loss.

First order, from the Grams already measured: TAG's transference ``Z_ij = lr G_ij / L_j``
(:func:`gradconflict.measure.metrics.transference`), averaged over the measured steps; with ``layers``, through those
layers' parameters only (the Gram summed over them: what a branch from there on would share). Exact, on request:
TAG's lookahead (Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021,
Eq. 1), :func:`lookahead_transference`: one step of the *shared* parameters on task ``i`` alone,
``theta_s' = theta_s - lr grad_{theta_s} L_i`` (or the run's optimizer's step), every task's loss re-evaluated on
the same batch with the task-specific parameters unchanged, ``Z_ij = 1 - L_j(theta_s', theta_j) / L_j(theta_s,
theta_j)``; everything the lookahead touched (parameters, gradients, optimizer state, buffers, modes, RNG) is
restored afterwards.

:func:`normalized` divides each column by the task's own self-affinity ``Z_jj``: ``N_ij = Z_ij / Z_jj`` is how
much a step on ``i`` lowers ``L_j`` compared with a step on ``j`` itself; ``lr`` and the loss scale cancel.

Rows and columns follow the sorted task names (:mod:`~gradconflict.diagnosis.aligned`), whatever order the
steps listed them in; each entry is averaged over the steps that carried both tasks (NaN when none did).

>>> import torch
>>> from gradconflict import ConflictReport
>>> G = torch.tensor([[1.0, -0.5], [-0.5, 2.0]])
>>> r = ConflictReport("ab", G, losses=torch.tensor([1.0, 4.0]))
>>> mean_transference([r], lr=0.1).round(decimals=4).tolist()
[[0.1, -0.0125], [-0.05, 0.05]]
>>> normalized(mean_transference([r])).round(decimals=4).tolist()
[[1.0, -0.25], [-0.5, 1.0]]
>>> only_a = ConflictReport("a", torch.tensor([[3.0]]), losses=torch.tensor([1.0]))   # a step carrying a alone
>>> mean_transference([r, only_a]).round(decimals=4).tolist()                        # Z_aa over both steps
[[2.0, -0.125], [-0.5, 0.5]]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from gradconflict.diagnosis.aligned import Run, align

__all__ = ["lookahead_transference", "mean_transference", "normalized"]

LossClosure = Callable[[], Mapping[str, Tensor]]


def mean_transference(history: Run, lr: float = 1.0, layers: Sequence[str] | None = None) -> np.ndarray:
    """Mean of the first-order transference ``lr G_ij / L_j`` (T x T, tasks in sorted order), each entry over
    the measured steps that carried both tasks (the diagonal: that carried the task); NaN for a pair never
    measured together.

    With ``layers``, ``G`` is the Gram over those layers' parameters only (the sum of their layer Grams), over the
    steps that carried some of them: the transference through a branch made of those layers.

    A report saved without losses counts with ``L_j = 1`` for every task; a step whose loss is not finite
    does not count.
    """
    aligned = align(history)
    if not aligned.num_steps:
        raise ValueError("the history has no measured step: no affinity to compute")
    index = None
    if layers is not None:
        unknown = sorted(set(layers) - set(aligned.layers))
        if unknown:
            raise ValueError(f"layers {unknown} were never measured; the layers are {list(aligned.layers)}")
        index = [aligned.layers.index(n) for n in layers]
    return aligned.mean_transference(lr, layers=index)


def normalized(Z: np.ndarray) -> np.ndarray:
    """``N_ij = Z_ij / Z_jj``; a column whose self-affinity is not positive is left unscaled (NaN stays NaN)."""
    d = np.diagonal(Z).copy()
    return Z / np.where(d > 0, d, 1.0)[None, :]


def _shared_parameters(model: nn.Module, shared: Iterable[nn.Parameter] | nn.Module | None) -> list[nn.Parameter]:
    if shared is None:
        backbone = getattr(model, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise ValueError(
                "TAG's lookahead steps the shared parameters only: pass shared= (the backbone module or its "
                "parameters), or use a model with a .backbone"
            )
        shared = backbone
    params = shared.parameters() if isinstance(shared, nn.Module) else shared
    out = [p for p in params if p.requires_grad]
    if not out:
        raise ValueError("the shared parameters of the lookahead all have requires_grad=False: nothing to step")
    return out


@contextmanager
def _restored(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> Iterator[tuple[Callable[[], None], Callable[[], None]]]:
    """Restore, on exit, everything a lookahead touches: parameters, gradients, buffers, module modes, the
    optimizer's state and the RNG. Yields ``(rewind, restore)``: ``rewind`` puts the RNG back (so that every loss
    evaluation draws the same dropout masks), ``restore`` puts everything back (between lookahead steps)."""
    params = list(model.parameters())
    if optimizer is not None:
        known = {id(p) for p in params}
        params += [p for g in optimizer.param_groups for p in g["params"] if id(p) not in known]
    values = [p.detach().clone() for p in params]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def rewind() -> None:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    def restore() -> None:
        with torch.no_grad():
            for p, v, g in zip(params, values, grads):
                p.copy_(v)
                p.grad = g
            for b, v in buffers:
                b.copy_(v)
        for m, training in modes:
            m.training = training
        if optimizer is not None and state is not None:
            optimizer.load_state_dict(copy.deepcopy(state))  # a copy: the optimizer may keep the tensors it loads
        rewind()

    try:
        yield rewind, restore
    finally:
        restore()


def lookahead_transference(
    model: nn.Module,
    losses: LossClosure,
    lr: float | None = None,
    *,
    shared: Iterable[nn.Parameter] | nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[list[str], np.ndarray]:
    """TAG's exact lookahead transference on one batch (Fifty et al., NeurIPS 2021, Eq. 1):
    ``Z_ij = 1 - L_j(theta_s after a step on L_i, theta_j) / L_j(theta_s, theta_j)``.

    Only the shared parameters ``theta_s`` are stepped, as in TAG; the task-specific ones (heads) stay where they
    are. The step is plain SGD of size ``lr``, or, with ``optimizer`` (the run's optimizer, holding the shared
    parameters), one ``optimizer.step()`` on task ``i``'s gradient of the shared parameters (its state, such as
    Adam's moments, included; TAG computes the lookahead with the run's optimizer). Nothing leaks out: parameters,
    ``.grad``, the optimizer's state, buffers (BatchNorm statistics), module modes and the RNG are restored, and
    every evaluation of ``losses`` starts from the same RNG state (the same dropout masks).

    Args:
        model: the model.
        losses: a closure that runs the model on one fixed batch and returns ``{task: scalar loss}``.
        lr: the SGD step size (required without ``optimizer``, ignored with it).
        shared: the shared parameters (a module or an iterable of parameters); default ``model.backbone``.
        optimizer: the run's optimizer, to take its step instead of SGD's.

    Returns ``(tasks, Z)``, in the order the closure returned the tasks.
    """
    if optimizer is None and lr is None:
        raise ValueError("lookahead_transference needs lr= for its SGD step, or optimizer= (the run's optimizer)")
    params = _shared_parameters(model, shared)
    if optimizer is not None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        outside = sum(id(p) not in held for p in params)
        if outside:
            raise ValueError(
                f"{outside} shared parameter(s) are not in the optimizer's param_groups: pass the run's optimizer"
            )
    with _restored(model, optimizer) as (rewind, restore):
        rewind()
        before = losses()
        tasks = list(before)
        L0 = torch.stack([before[t].detach().reshape(()) for t in tasks]).double()
        grads = [
            torch.autograd.grad(before[t], params, retain_graph=k < len(tasks) - 1, allow_unused=True)
            for k, t in enumerate(tasks)
        ]
        Z = np.zeros((len(tasks), len(tasks)))
        for i, g in enumerate(grads):
            with torch.no_grad():
                if optimizer is None:
                    assert lr is not None  # checked on entry
                    for p, gp in zip(params, g):
                        if gp is not None:
                            p.sub_(lr * gp)
                else:
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            p.grad = None
                    for p, gp in zip(params, g):
                        p.grad = torch.zeros_like(p) if gp is None else gp.detach().clone()
                    optimizer.step()
            rewind()
            with torch.no_grad():
                after = losses()
                L1 = torch.stack([after[t].detach().reshape(()) for t in tasks]).double()
            restore()  # the next task's step starts from the same parameters and optimizer state
            Z[i] = (1 - L1 / L0.where(L0 != 0, torch.ones_like(L0))).cpu().numpy()
    return tasks, Z
