"""Per-step reports: the Gram matrix of one training step and every quantity derived from it.

A :class:`ConflictReport` holds the step's Gram ``G`` (and one :class:`LayerReport` per shared layer, whose
Grams sum to ``G``) as tensors on the model's device. Each metric is computed from ``G`` on first access and
cached, so building a report costs nothing and reading one costs a T x T computation. ``to_dict()`` turns it
into plain Python floats, ready for JSON.

>>> import torch
>>> r = ConflictReport(tasks=("a", "b"), gram=torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
>>> r.conflict_pairs
[('a', 'b')]
>>> round(float(r.cancellation), 4)
0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradconflict._strict_json import strict
from gradconflict.measure import metrics

if TYPE_CHECKING:
    from gradconflict.measure.attribution import SampleAttribution

__all__ = ["ConflictReport", "LayerReport"]


class _GramMetrics:
    """The conflict quantities (see :mod:`gradconflict.measure.metrics`), computed lazily from ``gram`` and
    ``weights``."""

    tasks: tuple[str, ...]
    threshold: float
    _gram: Tensor | None
    _weights: Tensor | None

    @property
    def gram(self) -> Tensor:
        """The T x T Gram ``G_ij = <g_i, g_j>`` of the task gradients."""
        if self._gram is None:
            raise ValueError(
                f"{self!r} has no Gram (the step was skipped); check `report.skipped` before reading metrics"
            )
        return self._gram

    def _init_gram(self, tasks: Sequence[str], gram: Tensor | None, weights: Tensor | None, threshold: float) -> None:
        self.tasks = tuple(tasks)
        self._gram = gram
        self._weights = None if weights is None else weights.detach()
        self.threshold = float(threshold)

    @cached_property
    def weights(self) -> Tensor:
        """The weights of the update applied, ``lambda_i * w_i``: the ``weights=`` given (1 each when none were)
        times a conflict-aware method's ``lambda`` (1 without ``weighting=``), on the Gram's device."""
        gram = self._gram
        dtype, device = (torch.float64, None) if gram is None else (gram.dtype, gram.device)
        if self._weights is None:
            return torch.ones(len(self.tasks), dtype=dtype, device=device)
        return self._weights.to(dtype=dtype, device=device or self._weights.device)

    @cached_property
    def task_norms(self) -> Tensor:
        """Each task's gradient norm ``sqrt(G_ii)``."""
        return metrics.task_norms(self.gram)

    @cached_property
    def zero_norm_tasks(self) -> list[str]:
        """Tasks whose gradient over these parameters is zero (their cosines are reported as 0)."""
        mask = metrics.zero_norm_tasks(self.gram).cpu().tolist()
        return [t for t, z in zip(self.tasks, mask) if z]

    @cached_property
    def cosine(self) -> Tensor:
        """Pairwise cosine similarity of the task gradients (T x T)."""
        return metrics.cosine(self.gram)

    @cached_property
    def conflict_mask(self) -> Tensor:
        """Upper-triangular boolean mask of conflicting pairs (``cosine < threshold``)."""
        return metrics.conflict_pairs(self.gram, self.threshold)

    @property
    def conflict_pairs(self) -> list[tuple[str, str]]:
        """Names of the conflicting task pairs, ``(a, b)`` with ``a`` before ``b`` in ``tasks``."""
        idx = self.conflict_mask.nonzero().cpu().tolist()
        return [(self.tasks[i], self.tasks[j]) for i, j in idx]

    @cached_property
    def conflict_fraction(self) -> Tensor:
        """Share of task pairs whose cosine is below ``threshold`` (NaN with a single task: no pair)."""
        return metrics.conflict_fraction(self.gram, self.threshold)

    @cached_property
    def magnitude_similarity(self) -> Tensor:
        """Pairwise gradient magnitude similarity ``2 n_i n_j / (n_i^2 + n_j^2)``."""
        return metrics.magnitude_similarity(self.gram)

    @cached_property
    def update_norm(self) -> Tensor:
        """Norm of the weighted update ``sqrt(w^T G w)``."""
        return metrics.update_norm(self.gram, self.weights)

    @cached_property
    def cancellation(self) -> Tensor:
        """Share of the gradient magnitude lost to cancellation, in [0, 1]."""
        return metrics.cancellation(self.gram, self.weights)

    @cached_property
    def alignment(self) -> Tensor:
        """Cosine of each task's gradient with the weighted update (negative: the step hurts that task)."""
        return metrics.alignment(self.gram, self.weights)

    @cached_property
    def condition_number(self) -> Tensor:
        """``sqrt(lambda_max / lambda_min)`` of ``G``; ``inf`` for linearly dependent gradients."""
        return metrics.condition_number(self.gram)


def _metrics_dicts(items: Sequence[_GramMetrics]) -> list[dict[str, Any]]:
    """Every quantity of several Grams as plain Python (what ``to_dict`` writes), computed a batch at a time: one
    batch per task list, dtype, device and threshold, so a step with many layers costs a few batched operations
    and one host copy per quantity rather than a dozen small operations per layer. The numbers are those of each
    item's own properties (the same functions, in the same precision; a batched product may round the last bit
    differently)."""
    out: list[dict[str, Any]] = [{} for _ in items]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, item in enumerate(items):
        groups.setdefault((item.tasks, item.gram.dtype, item.gram.device, item.threshold), []).append(k)
    for (tasks, _, _, threshold), index in groups.items():
        G = torch.stack([items[k].gram for k in index])
        w = torch.stack([items[k].weights for k in index])
        pairs: list[list[list[str]]] = [[] for _ in index]
        for b, i, j in metrics.conflict_pairs(G, threshold).nonzero().tolist():
            pairs[b].append([tasks[i], tasks[j]])
        columns = {  # in the order to_dict writes them
            "gram": strict(G),
            "task_norms": strict(metrics.task_norms(G)),
            "cosine": strict(metrics.cosine(G)),
            "conflict_pairs": pairs,
            "conflict_fraction": strict(metrics.conflict_fraction(G, threshold)),
            "magnitude_similarity": strict(metrics.magnitude_similarity(G)),
            "update_norm": strict(metrics.update_norm(G, w)),
            "cancellation": strict(metrics.cancellation(G, w)),
            "alignment": strict(metrics.alignment(G, w)),
            "condition_number": strict(metrics.condition_number(G)),
            "zero_norm_tasks": [[t for t, z in zip(tasks, row) if z] for row in metrics.zero_norm_tasks(G).tolist()],
        }
        for b, k in enumerate(index):
            out[k] = {key: column[b] for key, column in columns.items()}
    return out


class LayerReport(_GramMetrics):
    """The Gram and metrics of one shared layer (a module, or one parameter that no layer rule covers).

    Attributes:
        name: the module's qualified name in the model (or the parameter's, for a lone parameter).
        gram: this layer's T x T Gram; the layer Grams of a step sum to the step's Gram.
        num_params: number of shared parameter entries in this layer.
        route: how the engine computed it: ``"ghost"`` or ``"materialised"`` (a layer rule, from the taps: the
            Gram through the inputs' kernel, or the per-task gradients the rule builds), ``"autograd"`` (the
            per-task gradients asked of autograd: a parameter no rule covers, or the per-task loop),
            ``"per-example"`` (under ``sample_ids``: the sum of each example's gradients, which the attribution
            forms anyway), ``"reference"`` or ``"representation"``; ``+``-joined when several ran.
    """

    def __init__(
        self,
        name: str,
        tasks: Sequence[str],
        gram: Tensor,
        weights: Tensor | None = None,
        *,
        num_params: int = 0,
        route: str = "",
        threshold: float = metrics.CONFLICT_COSINE,
    ) -> None:
        self.name = name
        self.num_params = int(num_params)
        self.route = route
        self._init_gram(tasks, gram, weights, threshold)

    def __repr__(self) -> str:
        return f"LayerReport({self.name!r}, params={self.num_params}, route={self.route!r})"

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view of this layer: Gram, metrics, size and route."""
        return self._with_metrics(_metrics_dicts([self])[0])

    def _with_metrics(self, values: dict[str, Any]) -> dict[str, Any]:
        return {"name": self.name, "num_params": self.num_params, "route": self.route, **values}


class ConflictReport(_GramMetrics):
    """How the task gradients of one training step relate on the shared parameters.

    Attributes:
        tasks: task names, in the order of every T-sized axis.
        gram: the T x T Gram ``G_ij = <g_i, g_j>`` over all shared parameters.
        weights: the task weights ``w`` used for the update.
        losses: the task losses at this step (detached).
        layers: layer name -> :class:`LayerReport`, bottom to top (the monitor lists them in the order of
            ``model.named_modules()``; the diagnosis of a run without its model follows this order); their Grams sum
            to ``gram``.
        step: index of the ``backward``/``measure`` call that produced it (0-based).
        engine: the engine that computed ``gram``.
        strategy: how the engine ran this step: ``"batched"`` (one vectorised backward), ``"loop"`` (one backward
            per task: the fallback for graphs the batched backward cannot run), ``"reference"``,
            ``"representation"`` or ``"accumulated"`` (micro-batches summed per task).
        approximate: True when ``gram`` is an approximation, not the exact Gram (representation mode, or a
            sketch across processes: ``sync="sketch"``).
        sync: across processes, what ``gram`` describes: ``"exact"`` or ``"sketch"`` (the global batch; a sketch
            is an unbiased estimate) or ``"local"`` (this rank's batch only); ``""`` in a single process.
        threshold: cosine below which a pair counts as conflicting (``S``).
        skipped: True when the step was skipped (a non-finite loss or gradient, a GradScaler overflow, shared
            parameters not known yet); a skipped report has no Gram.
        skip_reason: why the step was skipped.
        samples: each example's part in ``gram`` when the step was measured with ``sample_ids``
            (:class:`~gradconflict.measure.attribution.SampleAttribution`), else ``None``.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        gram: Tensor | None,
        weights: Tensor | None = None,
        *,
        losses: Tensor | None = None,
        layers: Mapping[str, LayerReport] | None = None,
        step: int = 0,
        engine: str = "reference",
        strategy: str = "",
        approximate: bool = False,
        threshold: float = metrics.CONFLICT_COSINE,
        skip_reason: str = "",
        sync: str = "",
    ) -> None:
        self.step = int(step)
        self.engine = engine
        self.strategy = strategy
        self.sync = sync
        self.approximate = approximate
        self.skip_reason = skip_reason
        self.layers: dict[str, LayerReport] = dict(layers or {})
        self._init_gram(tasks, gram, weights, threshold)
        self.losses = None if losses is None else losses.detach()
        self.samples: SampleAttribution | None = None

    @classmethod
    def skipped_step(
        cls,
        tasks: Sequence[str],
        step: int,
        reason: str,
        losses: Tensor | None = None,
        engine: str = "",
        weights: Tensor | None = None,
    ) -> ConflictReport:
        """A report for a step that was not measured (e.g. a non-finite loss), recording why."""
        return cls(tasks, None, weights, losses=losses, step=step, engine=engine, skip_reason=reason)

    @property
    def skipped(self) -> bool:
        """True when this step was skipped and has no Gram."""
        return bool(self.skip_reason)

    def __repr__(self) -> str:
        if self.skipped:
            return f"ConflictReport(step={self.step}, skipped: {self.skip_reason})"
        return (
            f"ConflictReport(step={self.step}, tasks={list(self.tasks)}, "
            f"conflict_fraction={float(self.conflict_fraction):.3f}, "
            f"cancellation={float(self.cancellation):.3f}, layers={len(self.layers)})"
        )

    def _repr_html_(self) -> str:
        """The step as HTML tables for Jupyter, those of the HTML report
        (:mod:`gradconflict.reporting.notebook`)."""
        from gradconflict.reporting.notebook import report_html

        return report_html(self)

    def summary(self) -> str:
        """One line a person can read in a training log."""
        if self.skipped:
            return f"step {self.step}: skipped ({self.skip_reason})"
        if len(self.tasks) < 2:
            return (
                f"step {self.step}: one task ({', '.join(self.tasks)}): no pair to compare, "
                f"update norm {float(self.update_norm):.3g}"
            )
        worst = self.cosine + torch.eye(len(self.tasks), device=self.gram.device) * 2
        i, j = divmod(int(worst.argmin()), len(self.tasks))
        tag = " (approximate)" if self.approximate else ""
        pair = f", worst pair {self.tasks[i]}/{self.tasks[j]} cos={float(self.cosine[i, j]):+.3f}"
        return (
            f"step {self.step}{tag}: conflict {float(self.conflict_fraction):.0%} of pairs, "
            f"cancellation {float(self.cancellation):.3f}, update norm {float(self.update_norm):.3g}"
            + pair
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) view: every metric, the Grams and each layer's Gram and metrics."""
        head: dict[str, Any] = {
            "step": self.step,
            "skipped": self.skipped,
            "skip_reason": self.skip_reason,
            "engine": self.engine,
            "strategy": self.strategy,
            "sync": self.sync,
            "approximate": self.approximate,
            "tasks": list(self.tasks),
            "threshold": self.threshold,
            "weights": strict(torch.as_tensor(self.weights)),
            "losses": None if self.losses is None else strict(self.losses),
        }
        if self.skipped:
            return head
        mine, *layers = _metrics_dicts([self, *self.layers.values()])  # every layer in one batch
        out = {
            **head, **mine,
            "layers": {k: v._with_metrics(d) for (k, v), d in zip(self.layers.items(), layers)},
        }
        if self.samples is not None:
            out["samples"] = self.samples.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConflictReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. a line of a saved history)."""
        tasks = data["tasks"]

        def tensor(v: Any) -> Tensor:
            return torch.tensor(v, dtype=torch.float64)

        weights = tensor(data["weights"]) if data.get("weights") is not None else None
        losses = tensor([math.nan if v is None else v for v in data["losses"]]) if data.get("losses") else None
        if data.get("skipped"):
            return cls.skipped_step(tasks, data["step"], data.get("skip_reason") or "skipped", losses, weights=weights)
        threshold = data.get("threshold", 0.0)
        layers = {
            name: LayerReport(
                name,
                tasks,
                tensor(d["gram"]),
                weights,
                num_params=d.get("num_params", 0),
                route=d.get("route", ""),
                threshold=threshold,
            )
            for name, d in data.get("layers", {}).items()
        }
        return cls(
            tasks,
            tensor(data["gram"]),
            weights,
            losses=losses,
            layers=layers,
            step=data["step"],
            engine=data.get("engine", ""),
            strategy=data.get("strategy", ""),
            sync=data.get("sync", ""),
            approximate=data.get("approximate", False),
            threshold=threshold,
        )
