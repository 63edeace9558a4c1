"""A run's measured steps aligned by task name, as numpy arrays: the one task order of the whole diagnosis.

Steps may carry different tasks (partial labels; round-robin training, one task per step) and list them in any
order (the order of the losses dict of that step). The diagnosis depends on neither: :func:`align` puts every
measured report on one canonical task order, the **sorted** union of the task names over the measured steps, so
the same run gives the same answer whatever the key order. A task a step did not carry has NaN in that step's
rows and columns, and :attr:`Aligned.present` says which tasks each step carried.

Every quantity is computed for all steps at once, NaN-aware, with the definitions of :mod:`gradconflict.metrics`
restricted to the tasks each step carried:

- a pair statistic (persistence, mean cosine, transference, the per-layer S-conflict score) is taken over the
  steps that carried both tasks of the pair (:attr:`Aligned.together`, :meth:`Aligned.pair_counts`);
- a step quantity about pairs (conflict fraction, worst cosine, magnitude cancellation, each task's alignment
  with the update) is only defined on the steps that carried two tasks or more (:attr:`Aligned.multi`); it is
  NaN on the others (with one task there is no pair, and "no conflict" would be a claim nobody measured).

>>> import torch
>>> from gradconflict import ConflictReport
>>> r1 = ConflictReport(("b", "a"), torch.tensor([[4.0, -1.0], [-1.0, 1.0]]), step=0)
>>> r2 = ConflictReport(("a", "c"), torch.tensor([[1.0, 0.5], [0.5, 1.0]]), step=1)
>>> r3 = ConflictReport(("c",), torch.tensor([[2.0]]), step=2)
>>> A = align([r3, r1, r2])
>>> A.tasks, A.steps.tolist()
(('a', 'b', 'c'), [0, 1, 2])
>>> A.present.astype(int).tolist()
[[1, 1, 0], [1, 0, 1], [0, 0, 1]]
>>> A.gram[0].tolist()
[[1.0, -1.0, nan], [-1.0, 4.0, nan], [nan, nan, nan]]
>>> A.cosine[:, 0, 1].tolist()          # cos(a, b): -1 / (1 * 2) on step 0; b absent on steps 1 and 2
[-0.5, nan, nan]
>>> A.conflict_fraction().tolist()      # step 2 carries one task: no pair, NaN
[1.0, 0.0, nan]
>>> A.pair_counts()[0].tolist()         # a met b on one step, c on one step (the diagonal: steps carrying a)
[2, 1, 1]
>>> A.together_phrase(0, 1)
'tasks a and b were measured together on 1 of 3 measured steps'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from gradconflict.history import History
from gradconflict.report import ConflictReport

__all__ = ["Aligned", "Reports", "Run", "align", "masked_mean", "measured_reports", "no_pair_reason"]

Reports = History | Iterable[ConflictReport]

#: Relative tolerance below which a task's squared gradient norm counts as zero (as in :mod:`gradconflict.metrics`).
_ZERO_RTOL = 1e-12
_TINY = float(np.finfo(np.float64).tiny)
#: Numbers per block of layers in :meth:`Aligned.layer_pair_stats` (a few float64 temporaries of this size).
_BLOCK = 1 << 22


def measured_reports(history: Reports) -> list[ConflictReport]:
    """The measured (not skipped) reports of a history or of any iterable of reports, in step order."""
    reports = history.reports if isinstance(history, History) else list(history)
    return sorted((r for r in reports if not r.skipped), key=lambda r: r.step)


def masked_mean(values: np.ndarray, mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean of ``values`` over ``axis`` counting only the entries where ``mask`` is True; NaN where none is.

    >>> masked_mean(np.array([[1.0, np.nan], [3.0, 5.0]]), np.array([[True, False], [True, True]])).tolist()
    [2.0, 5.0]
    >>> masked_mean(np.array([1.0, 2.0]), np.array([False, False])).tolist()
    nan
    """
    count = mask.sum(axis)
    total = np.where(mask, values, 0.0).sum(axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _pairs_present(present: np.ndarray) -> np.ndarray:
    """``[..., T, T]``: both tasks carried (the diagonal included)."""
    return present[..., :, None] & present[..., None, :]


def _norms_and_live(G: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Task norms (0 where absent) and the mask of present tasks with a non-zero gradient."""
    d = np.where(present, np.diagonal(G, axis1=-2, axis2=-1), 0.0)
    largest = np.where(present, d, -np.inf).max(-1, keepdims=True) if d.shape[-1] else d
    live = present & (d > np.maximum(_ZERO_RTOL * largest, _TINY))
    return np.sqrt(np.clip(d, 0.0, None)), live


def _cosine(G: np.ndarray, present: np.ndarray) -> np.ndarray:
    """:func:`gradconflict.metrics.cosine` over the last two axes, NaN where a task is absent."""
    n, live = _norms_and_live(G, present)
    denom = n[..., :, None] * n[..., None, :]
    with np.errstate(invalid="ignore"):
        C = np.where(_pairs_present(live), G / np.where(denom > 0, denom, 1.0), 0.0).clip(-1.0, 1.0)
    return np.where(_pairs_present(present), C, np.nan)


def _upper(T: int) -> np.ndarray:
    return np.triu(np.ones((T, T), dtype=bool), 1)


@dataclass(frozen=True, eq=False)
class Aligned:
    """The measured steps of a run on one task order, as arrays (see the module docstring).

    ``S`` measured steps in step order, ``T`` tasks (sorted by name), ``L`` layers (in order of first appearance).

    Attributes:
        tasks: the sorted union of the task names over the measured steps: the order of every T-sized axis.
        steps: ``[S]`` training step of each measured report, ascending.
        present: ``[S, T]`` which tasks each step carried.
        gram: ``[S, T, T]`` the Grams, NaN in the rows and columns of absent tasks.
        weights: ``[S, T]`` the task weights of each step's update, NaN where absent.
        losses: ``[S, T]`` the task losses, NaN where absent or not recorded.
        has_losses: ``[S]`` whether the report recorded its losses (without, the transference takes ``L = 1``).
        layers: layer names, in order of first appearance.
        layer_gram: ``[S, L, T, T]`` each layer's Gram, NaN where the layer or the task is absent; in the Grams'
            own precision (float32 unless some layer Gram is float64: the numbers as measured, at half the
            memory; computations cast to float64).
        layer_present: ``[S, L]`` which layers each step carried.
        layer_params: ``[L]`` shared parameter entries of each layer (as the last step carrying it reported).
        threshold: the conflict cosine ``S`` the first measured step was measured with (0 without steps).
    """

    tasks: tuple[str, ...]
    steps: np.ndarray
    present: np.ndarray
    gram: np.ndarray
    weights: np.ndarray
    losses: np.ndarray
    has_losses: np.ndarray
    layers: tuple[str, ...]
    layer_gram: np.ndarray
    layer_present: np.ndarray
    layer_params: np.ndarray
    threshold: float

    # ------------------------------------------------------------------------------------------ coverage
    @property
    def num_steps(self) -> int:
        """``S``, the number of measured steps."""
        return len(self.steps)

    def index(self, task: str) -> int:
        """Position of ``task`` in :attr:`tasks` (``ValueError`` for a task the run never carried)."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ValueError(f"no measured step carries task {task!r}; the tasks are {list(self.tasks)}") from None

    @cached_property
    def multi(self) -> np.ndarray:
        """``[S]`` the steps that carried at least two tasks (where pair quantities are defined)."""
        return self.present.sum(1) >= 2

    @cached_property
    def together(self) -> np.ndarray:
        """``[S, T, T]`` the steps that carried both tasks of each pair (``i != j``; the diagonal is False)."""
        return _pairs_present(self.present) & ~np.eye(len(self.tasks), dtype=bool)

    def pair_counts(self) -> np.ndarray:
        """``[T, T]`` number of measured steps that carried both tasks (on the diagonal: that carried the task)."""
        return _pairs_present(self.present).sum(0)

    def together_phrase(self, i: int, j: int) -> str:
        """How often tasks ``i`` and ``j`` were measured together, as a sentence."""
        n = int(self.pair_counts()[i, j])
        return (
            f"tasks {self.tasks[i]} and {self.tasks[j]} were measured together on {n} of {self.num_steps} "
            "measured steps"
        )

    # ------------------------------------------------------------------------------------------ run level
    @cached_property
    def _norms_live(self) -> tuple[np.ndarray, np.ndarray]:
        return _norms_and_live(self.gram, self.present)

    @cached_property
    def cosine(self) -> np.ndarray:
        """``[S, T, T]`` pairwise cosines (:func:`gradconflict.metrics.cosine`), NaN where a task is absent."""
        return _cosine(self.gram, self.present)

    def conflicts(self, threshold: float = 0.0) -> np.ndarray:
        """``[S, T, T]`` upper-triangular mask of conflicting pairs: both carried, both with a non-zero gradient,
        and ``C_ij < threshold`` (:func:`gradconflict.metrics.conflict_pairs`)."""
        live = self._norms_live[1]
        with np.errstate(invalid="ignore"):
            below = self.cosine < threshold
        return below & _pairs_present(live) & _upper(len(self.tasks))

    def conflict_fraction(self, threshold: float = 0.0) -> np.ndarray:
        """``[S]`` share of the step's pairs that conflict; NaN on steps with fewer than two tasks."""
        t = self.present.sum(1)
        pairs = t * (t - 1) // 2
        n = self.conflicts(threshold).sum((1, 2))
        return np.where(pairs > 0, n / np.maximum(pairs, 1), np.nan)

    @cached_property
    def worst_cosine(self) -> np.ndarray:
        """``[S]`` the most negative cosine over the step's pairs; NaN on steps with fewer than two tasks."""
        mask = self.together & _upper(len(self.tasks))
        worst = np.where(mask, self.cosine, np.inf).min((1, 2)) if len(self.tasks) else np.full(self.num_steps, np.inf)
        return np.where(self.multi, worst, np.nan)

    @cached_property
    def _update(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # (G w over the present tasks, sqrt(w^T G w), sum_i w_i n_i), absent tasks counting as 0.
        G = np.where(_pairs_present(self.present), self.gram, 0.0)
        w = np.where(self.present, self.weights, 0.0)
        Gw = np.einsum("sij,sj->si", G, w)
        u = np.sqrt(np.clip(np.einsum("si,si->s", w, Gw), 0.0, None))
        return Gw, u, (w * self._norms_live[0]).sum(1)

    @cached_property
    def task_norms(self) -> np.ndarray:
        """``[S, T]`` each task's gradient norm ``sqrt(G_ii)`` (:func:`gradconflict.metrics.task_norms`), NaN where
        the task is absent."""
        return np.where(self.present, self._norms_live[0], np.nan)

    @cached_property
    def update_norm(self) -> np.ndarray:
        """``[S]`` norm of the step's update ``sqrt(w^T G w)`` over the tasks it carried
        (:func:`gradconflict.metrics.update_norm`); defined on every measured step."""
        return self._update[1]

    @cached_property
    def cancellation(self) -> np.ndarray:
        """``[S]`` magnitude cancellation ``1 - sqrt(w^T G w) / sum_i w_i n_i`` over the step's tasks
        (:func:`gradconflict.metrics.cancellation`); NaN on steps with fewer than two tasks."""
        _, u, total = self._update
        value = np.where(total > 0, np.clip(1.0 - u / np.where(total > 0, total, 1.0), 0.0, 1.0), 0.0)
        return np.where(self.multi, value, np.nan)

    @cached_property
    def alignment(self) -> np.ndarray:
        """``[S, T]`` cosine of each task's gradient with the step's update (:func:`gradconflict.metrics.alignment`);
        NaN where the task is absent or the step carried fewer than two tasks."""
        Gw, u, _ = self._update
        n, live = self._norms_live
        denom = n * u[:, None]
        ok = (denom > 0) & live
        value = np.where(ok, Gw / np.where(denom > 0, denom, 1.0), 0.0).clip(-1.0, 1.0)
        return np.where(self.present & self.multi[:, None], value, np.nan)

    def transference(self, lr: float = 1.0) -> np.ndarray:
        """``[S, T, T]`` first-order transference ``lr G_ij / L_j`` (:func:`gradconflict.metrics.transference`;
        ``L = 1`` for a report saved without losses), NaN where a task is absent."""
        L = np.where(self.has_losses[:, None], self.losses, 1.0)
        L = np.where(L != 0, L, 1.0)
        return lr * self.gram / L[:, None, :]

    # ------------------------------------------------------------------------------------------ layers
    def layer_cosine(self, layers: slice = slice(None)) -> np.ndarray:
        """``[S, L', T, T]`` the pairwise cosines of the layers ``layers`` (all by default; float64), NaN where the
        layer or a task is absent. Computed on each call: take a slice of layers on long runs."""
        G = self.layer_gram[:, layers].astype(np.float64)
        present = self.layer_present[:, layers, None] & self.present[:, None, :]
        return _cosine(G, present)

    def layer_pair_stats(self, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(together, conflicts, cosine_sum)``, each ``[L, T, T]``: per layer, the steps that carried both tasks
        on it (the diagonal: that carried the task), how many of them the pair conflicted on (upper triangle, as
        :meth:`conflicts`), and the sum of its cosines over them.

        Computed a block of layers at a time, so the temporaries stay near ``_BLOCK`` numbers whatever the length
        of the run and the number of layers.
        """
        S, L, T = self.num_steps, len(self.layers), len(self.tasks)
        together = np.zeros((L, T, T), dtype=np.int64)
        conflicts = np.zeros((L, T, T), dtype=np.int64)
        cosine_sum = np.zeros((L, T, T))
        upper = _upper(T)
        block = max(1, _BLOCK // max(1, S * T * T))
        for start in range(0, L, block):
            layers = slice(start, start + block)
            G = self.layer_gram[:, layers].astype(np.float64)
            present = self.layer_present[:, layers, None] & self.present[:, None, :]
            both = _pairs_present(present)
            C = _cosine(G, present)
            live = _norms_and_live(G, present)[1]
            with np.errstate(invalid="ignore"):
                below = C < threshold
            together[layers] = both.sum(0)
            conflicts[layers] = (below & _pairs_present(live) & upper).sum(0)
            cosine_sum[layers] = np.where(both, C, 0.0).sum(0)
        return together, conflicts, cosine_sum


Run = Reports | Aligned


def no_pair_reason(aligned: Aligned) -> str | None:
    """Why no pair quantity can be measured on this run, with what to do; ``None`` when some measured step
    carried two tasks or more."""
    if aligned.num_steps == 0:
        return "the history has no measured step: run some steps under a ConflictMonitor first"
    if bool(aligned.multi.any()):
        return None
    if len(aligned.tasks) < 2:
        return f"the run has a single task ({', '.join(aligned.tasks)}): no pair of tasks to compare"
    return (
        f"no measured step carried two tasks together (each of the {aligned.num_steps} measured steps carried one "
        "task, as in round-robin training): the conflict between tasks could not be measured; measure steps that "
        "carry every task, e.g. call monitor.measure(losses) on a batch with all tasks every k steps"
    )


def _stack(tensors: Sequence[Tensor], wide: bool = True) -> np.ndarray:
    # One stack and one host copy per group of steps: float64, or with wide=False the tensors' own precision
    # (float32 below float64).
    stacked = torch.stack([t.detach() for t in tensors]).cpu()
    return stacked.to(torch.float64 if wide or stacked.dtype == torch.float64 else torch.float32).numpy()


def align(history: Run) -> Aligned:
    """The measured steps of ``history`` (a :class:`~gradconflict.History`, any iterable of reports, or an
    :class:`Aligned`, returned as is) on the sorted union of their task names.

    Reports with the same tasks (in the same order) and layers are stacked together, so the cost is a few numpy
    operations per distinct layout, not per step.
    """
    if isinstance(history, Aligned):
        return history
    reports = measured_reports(history)
    tasks = tuple(sorted({t for r in reports for t in r.tasks}))
    layers = tuple(dict.fromkeys(n for r in reports for n in r.layers))
    S, T, L = len(reports), len(tasks), len(layers)
    task_index = {t: k for k, t in enumerate(tasks)}
    layer_index = {n: k for k, n in enumerate(layers)}
    present = np.zeros((S, T), dtype=bool)
    gram = np.full((S, T, T), np.nan)
    weights = np.full((S, T), np.nan)
    losses = np.full((S, T), np.nan)
    has_losses = np.zeros(S, dtype=bool)
    # The layer Grams are the bulk: kept in their own precision (float32 for float32 models).
    layer_gram = np.full((S, L, T, T), np.nan, dtype=np.float32)
    layer_present = np.zeros((S, L), dtype=bool)
    layer_params = np.zeros(L, dtype=np.int64)

    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for k, r in enumerate(reports):
        groups.setdefault((tuple(r.tasks), tuple(r.layers)), []).append(k)
    for (names, layer_names), positions in groups.items():
        group = [reports[k] for k in positions]
        s = np.asarray(positions)
        t = np.array([task_index[n] for n in names], dtype=np.int64)
        present[s[:, None], t[None, :]] = True
        gram[s[:, None, None], t[None, :, None], t[None, None, :]] = _stack([r.gram for r in group])
        weights[s[:, None], t[None, :]] = _stack([r.weights for r in group])
        with_losses = [k for k, r in enumerate(group) if r.losses is not None]
        if with_losses:
            rows = s[with_losses]
            has_losses[rows] = True
            losses[rows[:, None], t[None, :]] = _stack([group[k].losses.reshape(-1) for k in with_losses])
        if layer_names:
            lay = np.array([layer_index[n] for n in layer_names], dtype=np.int64)
            stacked = _stack([r.layers[n].gram for r in group for n in layer_names], wide=False)
            if stacked.dtype != layer_gram.dtype:
                layer_gram = layer_gram.astype(np.float64)
            stacked = stacked.reshape(len(group), len(layer_names), len(names), len(names))
            index = (s[:, None, None, None], lay[None, :, None, None], t[None, None, :, None], t[None, None, None, :])
            layer_gram[index] = stacked
            layer_present[s[:, None], lay[None, :]] = True
    found: set[str] = set()
    for r in reversed(reports):  # each layer's size as the last step carrying it reported it
        for n in r.layers.keys() - found:
            layer_params[layer_index[n]] = r.layers[n].num_params
            found.add(n)
        if len(found) == L:
            break
    return Aligned(
        tasks=tasks,
        steps=np.array([r.step for r in reports], dtype=np.int64),
        present=present,
        gram=gram,
        weights=weights,
        losses=losses,
        has_losses=has_losses,
        layers=layers,
        layer_gram=layer_gram,
        layer_present=layer_present,
        layer_params=layer_params,
        threshold=reports[0].threshold if reports else 0.0,
    )
