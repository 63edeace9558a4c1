# One file of ~575 lines on purpose: every array view of an aligned run is a cached property (or a chunked
# computation) of one class.
"""A run's measured steps aligned by task name, as numpy arrays: the one task order of the whole diagnosis.

Steps may carry different tasks (partial labels; round-robin training, one task per step) and list them in any
order (the order of the losses dict of that step). The diagnosis depends on neither: :func:`align` puts every
measured report on one canonical task order, the **sorted** union of the task names over the measured steps, so
the same run gives the same answer whatever the key order. A task a step did not carry has NaN in that step's
rows and columns, and :attr:`Aligned.present` says which tasks each step carried.

Every quantity is computed for all steps at once, NaN-aware, with the definitions of :mod:`gradconflict.measure.metrics`
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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from gradconflict.measure import metrics
from gradconflict.measure.report import ConflictReport
from gradconflict.records.history import History
from gradconflict.records.layers import merge_orders

__all__ = ["Aligned", "Reports", "Run", "align", "masked_mean", "measured_reports", "no_pair_reason"]

Reports = History | Iterable[ConflictReport]

#: Numbers per block of layers in :meth:`Aligned.layer_blocks` (a few float64 temporaries of this size).
_BLOCK = 1 << 20


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


def _carried(G: np.ndarray, present: np.ndarray) -> Tensor:
    """The Grams as float64 tensors restricted to the tasks each step carried: an absent task's row and column are
    0, so :mod:`gradconflict.measure.metrics` sees it as a zero-norm task (cosine 0, never conflicting, no weight)."""
    return torch.from_numpy(np.where(_pairs_present(present), G, 0.0).astype(np.float64, copy=False))


def _cosine(G: np.ndarray, present: np.ndarray) -> np.ndarray:
    """:func:`gradconflict.measure.metrics.cosine` over the last two axes, NaN where a task is absent."""
    return np.where(_pairs_present(present), metrics.cosine(_carried(G, present)).numpy(), np.nan)


@dataclass(frozen=True, eq=False)
class Aligned:
    """The measured steps of a run on one task order, as arrays (see the module docstring).

    ``S`` measured steps in step order, ``T`` tasks (sorted by name), ``L`` layers (bottom to top: the run's layer
    order).

    Attributes:
        tasks: the sorted union of the task names over the measured steps: the order of every T-sized axis.
        steps: ``[S]`` training step of each measured report, ascending.
        present: ``[S, T]`` which tasks each step carried.
        gram: ``[S, T, T]`` the Grams, NaN in the rows and columns of absent tasks.
        weights: ``[S, T]`` the task weights of each step's update, NaN where absent.
        losses: ``[S, T]`` the task losses, NaN where absent or not recorded.
        has_losses: ``[S]`` whether the report recorded its losses (without, the transference takes ``L = 1``).
        layers: layer names, bottom to top: the reports' layer order (the model's, under a monitor; a saved run
            keeps it), merged over the steps (:func:`~gradconflict.records.layers.merge_orders`, as
            :attr:`History.layer_order <gradconflict.History.layer_order>`).
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

    @cached_property
    def step_gap(self) -> int:
        """The median number of training steps between consecutive measured steps (``k`` under ``every=k``)."""
        return max(1, int(np.median(np.diff(self.steps)))) if self.num_steps > 1 else 1

    # ------------------------------------------------------------------------------------------ run level
    def by_rows(self, fn: Callable[[Tensor, Tensor, slice], np.ndarray]) -> np.ndarray:
        """``fn(G, w, rows)`` over consecutive chunks of steps, concatenated: ``G`` the float64 Grams of the tasks
        each step carried (absent tasks as zero-norm tasks), ``w`` their weights (0 where absent), ``rows`` the
        chunk's slice of steps. For a quantity that is a function of each step alone: the chunks change no number,
        and they keep the temporaries near ``_BLOCK`` numbers however long the run.

        >>> A = align([ConflictReport("ab", torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))])
        >>> A.by_rows(lambda G, w, rows: (G @ w[..., None]).squeeze(-1).numpy()).tolist()   # G w on each step
        [[0.0, 3.0]]
        """
        T = len(self.tasks)
        parts = [
            fn(
                _carried(self.gram[rows], self.present[rows]),
                torch.from_numpy(np.where(self.present[rows], self.weights[rows], 0.0)),
                rows,
            )
            for rows in _chunks(self.num_steps, T * T)
        ]
        return np.concatenate(parts)

    @cached_property
    def cosine(self) -> np.ndarray:
        """``[S, T, T]`` pairwise cosines (:func:`gradconflict.measure.metrics.cosine`), NaN where a task is absent."""
        return self.by_rows(self._cosine_rows)

    def cosine_pairs(self, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
        """``[S, P]`` the cosines of the task pairs ``pairs`` (positions in :attr:`tasks`): ``cosine[:, i, j]`` for
        each, without keeping the ``[S, T, T]`` of :attr:`cosine` when it is not there already (on a long run the
        pairs are what the tests read).

        >>> A = align([ConflictReport("ab", torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))])
        >>> A.cosine_pairs([(0, 1)]).tolist()
        [[-0.5]]
        """
        i, j = (np.array([pair[k] for pair in pairs], dtype=np.int64) for k in (0, 1))
        if "cosine" in self.__dict__:
            return self.cosine[:, i, j]
        return self.by_rows(lambda G, w, rows: self._cosine_rows(G, w, rows)[:, i, j])

    def mean_cosine(self) -> np.ndarray:
        """``[T, T]`` each pair's mean cosine over the steps that carried both tasks (NaN: never together, and on
        the diagonal), from :meth:`cosine_pairs`.

        >>> r = ConflictReport("ab", torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))
        >>> align([r, ConflictReport("ab", torch.eye(2), step=1)]).mean_cosine()[0, 1].item()
        -0.25
        """
        T = len(self.tasks)
        pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
        out = np.full((T, T), np.nan)
        for (i, j), cosine in zip(pairs, self.cosine_pairs(pairs).T):
            both = cosine[self.together[:, i, j]]
            if len(both):
                out[i, j] = out[j, i] = both.mean()
        return out

    def _cosine_rows(self, G: Tensor, w: Tensor, rows: slice) -> np.ndarray:
        return np.where(_pairs_present(self.present[rows]), metrics.cosine(G).numpy(), np.nan)

    def conflicts(self, threshold: float = metrics.CONFLICT_COSINE) -> np.ndarray:
        """``[S, T, T]`` upper-triangular mask of conflicting pairs
        (:func:`gradconflict.measure.metrics.conflict_pairs`: ``C_ij < threshold``, both tasks with a non-zero
        gradient), over the tasks each step carried."""
        return self.by_rows(lambda G, w, rows: metrics.conflict_pairs(G, threshold).numpy())

    def conflict_fraction(self, threshold: float = metrics.CONFLICT_COSINE) -> np.ndarray:
        """``[S]`` share of the step's pairs that conflict; NaN on steps with fewer than two tasks."""
        t = self.present.sum(1)
        pairs = t * (t - 1) // 2
        n = self.by_rows(lambda G, w, rows: metrics.conflict_pairs(G, threshold).sum((1, 2)).numpy())
        return np.where(pairs > 0, n / np.maximum(pairs, 1), np.nan)

    @cached_property
    def worst_cosine(self) -> np.ndarray:
        """``[S]`` the most negative cosine over the step's pairs (:func:`gradconflict.measure.metrics.worst_cosine`
        over the tasks it carried); NaN on steps with fewer than two tasks."""
        return self.by_rows(
            lambda G, w, rows: metrics.worst_cosine(G, torch.from_numpy(self.present[rows])).numpy()
        )

    @cached_property
    def task_norms(self) -> np.ndarray:
        """``[S, T]`` each task's gradient norm ``sqrt(G_ii)`` (:func:`gradconflict.measure.metrics.task_norms`),
        NaN where the task is absent."""
        return self.by_rows(lambda G, w, rows: np.where(self.present[rows], metrics.task_norms(G).numpy(), np.nan))

    @cached_property
    def update_norm(self) -> np.ndarray:
        """``[S]`` norm of the step's update ``sqrt(w^T G w)`` over the tasks it carried
        (:func:`gradconflict.measure.metrics.update_norm`); defined on every measured step."""
        return self.by_rows(lambda G, w, rows: metrics.update_norm(G, w).numpy())

    @cached_property
    def cancellation(self) -> np.ndarray:
        """``[S]`` magnitude cancellation ``1 - sqrt(w^T G w) / sum_i w_i n_i`` over the step's tasks
        (:func:`gradconflict.measure.metrics.cancellation`); NaN on steps with fewer than two tasks."""
        return self.by_rows(lambda G, w, rows: np.where(self.multi[rows], metrics.cancellation(G, w).numpy(), np.nan))

    @cached_property
    def alignment(self) -> np.ndarray:
        """``[S, T]`` cosine of each task's gradient with the step's update
        (:func:`gradconflict.measure.metrics.alignment`); NaN where the task is absent or the step carried fewer
        than two tasks."""
        return self.by_rows(
            lambda G, w, rows: np.where(
                self.present[rows] & self.multi[rows, None], metrics.alignment(G, w).numpy(), np.nan
            )
        )

    def transference(self, lr: float = 1.0, layers: Sequence[int] | None = None) -> np.ndarray:
        """``[S, T, T]`` first-order transference ``lr G_ij / L_j`` (:func:`gradconflict.measure.metrics.transference`;
        ``L = 1`` for a report saved without losses), NaN where a task is absent. With ``layers`` (positions in
        :attr:`layers`), ``G`` is the sum of those layers' Grams, and steps that carried none of them are NaN."""
        return np.concatenate([Z for _, Z in self._transference_chunks(lr, layers)])

    def transference_pairs(self, pairs: Sequence[tuple[int, int]], lr: float = 1.0) -> np.ndarray:
        """``[S, P]`` the transference of the directed pairs ``pairs`` (positions in :attr:`tasks`):
        ``transference(lr)[:, i, j]`` for each, a chunk of steps at a time, without the ``[S, T, T]``.

        >>> r = ConflictReport("ab", torch.tensor([[1.0, -1.0], [-1.0, 4.0]]), losses=torch.tensor([1.0, 2.0]))
        >>> align([r]).transference_pairs([(0, 1), (1, 0)]).tolist()
        [[-0.5, -1.0]]
        """
        i, j = (np.array([pair[k] for pair in pairs], dtype=np.int64) for k in (0, 1))
        return np.concatenate([Z[:, i, j] for _, Z in self._transference_chunks(lr, None)])

    def mean_transference(self, lr: float = 1.0, layers: Sequence[int] | None = None) -> np.ndarray:
        """``[T, T]`` the mean of :meth:`transference` over the steps where it is defined (both tasks carried, a
        finite value), NaN where there is none; a chunk of steps at a time, without the ``[S, T, T]``."""
        T = len(self.tasks)
        total, count = np.zeros((T, T)), np.zeros((T, T), dtype=np.int64)
        for rows, Z in self._transference_chunks(lr, layers):
            counted = _pairs_present(self.present[rows]) & np.isfinite(Z)
            total += np.where(counted, Z, 0.0).sum(0)
            count += counted.sum(0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def _transference_chunks(self, lr: float, layers: Sequence[int] | None) -> Iterator[tuple[slice, np.ndarray]]:
        T = len(self.tasks)
        for rows in _chunks(self.num_steps, T * T * (1 + len(layers or ()))):
            present = self.present[rows]
            if layers is None:
                G = _carried(self.gram[rows], present)
            else:
                on = self.layer_present[rows][:, layers]
                summed = np.where(on[:, :, None, None], self.layer_gram[rows][:, layers], 0.0).sum(1)
                present = present & np.asarray(on.any(1))[:, None]
                G = _carried(summed, present)
            L = np.where(self.has_losses[rows, None] & present, self.losses[rows], 1.0)
            Z = metrics.transference(G, torch.from_numpy(L), lr).numpy()
            yield rows, np.where(_pairs_present(present), Z, np.nan)

    # ------------------------------------------------------------------------------------------ layers
    def layer_cosine(self, layers: slice = slice(None)) -> np.ndarray:
        """``[S, L', T, T]`` the pairwise cosines of the layers ``layers`` (all by default; float64), NaN where the
        layer or a task is absent. Computed on each call: take a slice of layers on long runs."""
        present = self.layer_present[:, layers, None] & self.present[:, None, :]
        return _cosine(self.layer_gram[:, layers], present)

    def layer_worst_cosine(self) -> np.ndarray:
        """``[S, L]`` the worst pair cosine (:func:`gradconflict.measure.metrics.worst_cosine`) of each layer at
        each step, over the tasks the step carried on that layer; NaN where it carried fewer than two."""
        out = np.full((self.num_steps, len(self.layers)), np.nan)
        for rows, layers, G, present in self._layer_grams():
            out[rows, layers] = metrics.worst_cosine(G, torch.from_numpy(present)).numpy()
        return out

    def _layer_grams(self) -> Iterator[tuple[slice, slice, Tensor, np.ndarray]]:
        """``(rows, layers, Grams, present)`` for tiles of steps and layers: the ``[S', L', T, T]`` float64 Grams of
        the tasks each step carried on those layers, and that ``[S', L', T]`` mask. The temporaries stay near
        ``_BLOCK`` numbers whatever the length of the run and the number of layers."""
        S, L, T = self.num_steps, len(self.layers), len(self.tasks)
        block = max(1, _BLOCK // max(1, S * T * T))
        for start in range(0, L, block):
            layers = slice(start, min(start + block, L))
            for rows in _chunks(S, (layers.stop - layers.start) * T * T):
                present = self.layer_present[rows, layers, None] & self.present[rows, None, :]
                yield rows, layers, _carried(self.layer_gram[rows, layers], present), present

    def layer_blocks(
        self, threshold: float = metrics.CONFLICT_COSINE
    ) -> Iterator[tuple[slice, slice, np.ndarray, np.ndarray]]:
        """``(rows, layers, cosines, conflicts)`` for tiles of steps and layers: :meth:`layer_cosine` of that tile
        and its ``[S', L', T, T]`` conflict masks (as :meth:`conflicts`). The temporaries stay near ``_BLOCK``
        numbers whatever the length of the run and the number of layers."""
        for rows, layers, G, present in self._layer_grams():
            cosine = np.where(_pairs_present(present), metrics.cosine(G).numpy(), np.nan)
            yield rows, layers, cosine, metrics.conflict_pairs(G, threshold).numpy()


def _chunks(steps: int, per_step: int) -> Iterator[slice]:
    """Consecutive slices of ``steps`` of about ``_BLOCK`` numbers each (``per_step`` numbers a step); one empty
    slice when there is no step, so that results keep their shape."""
    size = max(1, _BLOCK // max(1, per_step))
    yield from (slice(k, min(k + size, steps)) for k in range(0, steps, size)) if steps else [slice(0, 0)]


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
    return _host(stacked, wide)


def _host(tensor: Tensor, wide: bool = True) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return tensor.to(torch.float64 if wide or tensor.dtype == torch.float64 else torch.float32).numpy()


@dataclass
class _Block:
    """Steps that share one layout, as host arrays: what :func:`align` scatters into the run's arrays."""

    rows: np.ndarray  # [N] positions in the sorted steps
    tasks: tuple[str, ...]
    layers: tuple[tuple[str, int], ...]
    weights: np.ndarray  # [N, T]
    losses: np.ndarray | None  # [N, T]
    gram: np.ndarray  # [N, T, T]
    layer_gram: np.ndarray  # [N, L, T, T], the Grams' own precision


def _blocks_of_history(history: History) -> tuple[np.ndarray, float, list[_Block]]:
    """The steps, the first step's threshold and the layout blocks of a History, read from its stacked records
    (views of its storage, not copies)."""
    stacked = history.stacked()
    steps = np.concatenate([b.steps.numpy() for b in stacked]) if stacked else np.zeros(0, dtype=np.int64)
    order = np.argsort(steps, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    blocks, offset, thresholds = [], 0, np.empty(len(steps))
    for b in stacked:
        N, losses = len(b.steps), b.losses
        blocks.append(_Block(
            rows=position[offset : offset + N], tasks=b.tasks, layers=b.layers,
            weights=_host(b.weights), losses=_host(losses) if losses is not None else None,
            gram=_host(b.gram), layer_gram=_host(b.layer_gram, wide=False),
        ))
        thresholds[offset : offset + N] = b.threshold
        offset += N
    return steps[order], float(thresholds[order[0]]) if len(order) else 0.0, blocks


def _blocks_of_reports(history: Iterable[ConflictReport]) -> tuple[np.ndarray, float, list[_Block]]:
    """The steps, the first step's threshold and the layout blocks of any iterable of reports (grouped by tasks
    and layers)."""
    reports = measured_reports(history)
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[int]] = {}
    for k, r in enumerate(reports):
        groups.setdefault((tuple(r.tasks), tuple(r.layers)), []).append(k)
    blocks = []
    for (names, layer_names), rows in groups.items():
        group = [reports[k] for k in rows]
        layer_gram = (
            _stack([r.layers[n].gram for r in group for n in layer_names], wide=False).reshape(
                len(group), len(layer_names), len(names), len(names)
            )
            if layer_names
            else np.zeros((len(group), 0, len(names), len(names)), dtype=np.float32)
        )
        losses = None
        if any(r.losses is not None for r in group):
            losses = np.stack([
                _host(r.losses.reshape(-1)) if r.losses is not None else np.full(len(names), np.nan) for r in group
            ])
        blocks.append(_Block(
            rows=np.asarray(rows, dtype=np.int64), tasks=names,
            layers=tuple((n, group[-1].layers[n].num_params) for n in layer_names),
            weights=_stack([r.weights for r in group]), losses=losses, gram=_stack([r.gram for r in group]),
            layer_gram=layer_gram,
        ))
    threshold = reports[0].threshold if reports else 0.0
    return np.array([r.step for r in reports], dtype=np.int64), threshold, blocks


def align(history: Run) -> Aligned:
    """The measured steps of ``history`` (a :class:`~gradconflict.History`, any iterable of reports, or an
    :class:`Aligned`, returned as is) on the sorted union of their task names.

    A History is read through :meth:`~gradconflict.History.stacked` (no report object per step); reports with the
    same tasks (in the same order) and layers are stacked together. Either way the cost is a few numpy operations
    per distinct layout, not per step.
    """
    if isinstance(history, Aligned):
        return history
    steps, threshold, blocks = (
        _blocks_of_history(history) if isinstance(history, History) else _blocks_of_reports(history)
    )
    tasks = tuple(sorted({t for b in blocks for t in b.tasks}))
    layers = tuple(merge_orders([n for n, _ in b.layers] for b in sorted(blocks, key=lambda b: int(b.rows.min()))))
    if len(blocks) == 1 and _is_whole(blocks[0], tasks, layers):
        return _aligned_views(blocks[0], steps, threshold)
    S, T, L = len(steps), len(tasks), len(layers)
    task_index = {t: k for k, t in enumerate(tasks)}
    layer_index = {n: k for k, n in enumerate(layers)}
    present = np.zeros((S, T), dtype=bool)
    gram = np.full((S, T, T), np.nan)
    weights = np.full((S, T), np.nan)
    losses = np.full((S, T), np.nan)
    has_losses = np.zeros(S, dtype=bool)
    wide = any(b.layer_gram.dtype == np.float64 for b in blocks)  # the layer Grams are the bulk: own precision
    layer_gram = np.full((S, L, T, T), np.nan, dtype=np.float64 if wide else np.float32)
    layer_present = np.zeros((S, L), dtype=bool)
    layer_params = np.zeros(L, dtype=np.int64)
    last_seen = np.full(L, -1)
    for b in blocks:
        s = np.asarray(b.rows)
        t = np.array([task_index[n] for n in b.tasks], dtype=np.int64)
        present[s[:, None], t[None, :]] = True
        gram[s[:, None, None], t[None, :, None], t[None, None, :]] = b.gram
        weights[s[:, None], t[None, :]] = b.weights
        if b.losses is not None:
            recorded = ~np.isnan(b.losses).all(1)
            has_losses[s[recorded]] = True
            losses[s[recorded][:, None], t[None, :]] = b.losses[recorded]
        if b.layers:
            lay = np.array([layer_index[n] for n, _ in b.layers], dtype=np.int64)
            index = (s[:, None, None, None], lay[None, :, None, None], t[None, None, :, None], t[None, None, None, :])
            layer_gram[index] = b.layer_gram
            layer_present[s[:, None], lay[None, :]] = True
            latest = int(s.max())
            for k, (_, n) in zip(lay, b.layers):  # each layer's size as the last step carrying it reported it
                if latest > last_seen[k]:
                    layer_params[k], last_seen[k] = n, latest
    return Aligned(
        tasks=tasks,
        steps=steps,
        present=present,
        gram=gram,
        weights=weights,
        losses=losses,
        has_losses=has_losses,
        layers=layers,
        layer_gram=layer_gram,
        layer_present=layer_present,
        layer_params=layer_params,
        threshold=threshold,
    )


def _is_whole(block: _Block, tasks: tuple[str, ...], layers: tuple[str, ...]) -> bool:
    """Whether one block is the whole run as :func:`align` lays it out: its tasks sorted, its rows in step order,
    every step carrying every layer."""
    return (
        block.tasks == tasks
        and tuple(n for n, _ in block.layers) == layers
        and bool((block.rows == np.arange(len(block.rows))).all())
    )


def _aligned_views(block: _Block, steps: np.ndarray, threshold: float) -> Aligned:
    """The :class:`Aligned` of a run that is one whole block: its arrays are read-only views of the block's (a long
    run read from a file is not copied again)."""
    S, T, L = len(steps), len(block.tasks), len(block.layers)

    def frozen(a: np.ndarray) -> np.ndarray:
        view = a.view()
        view.flags.writeable = False
        return view

    losses = block.losses if block.losses is not None else np.full((S, T), np.nan)
    return Aligned(
        tasks=block.tasks,
        steps=steps,
        present=np.ones((S, T), dtype=bool),
        gram=frozen(block.gram),
        weights=frozen(block.weights),
        losses=frozen(losses),
        has_losses=~np.isnan(losses).all(1),
        layers=tuple(n for n, _ in block.layers),
        layer_gram=frozen(block.layer_gram),
        layer_present=np.ones((S, L), dtype=bool),
        layer_params=np.array([n for _, n in block.layers], dtype=np.int64),
        threshold=threshold,
    )
