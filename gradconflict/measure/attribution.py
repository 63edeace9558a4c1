"""Per-sample attribution: which examples of a measured step carry the agreement or the conflict between tasks.

Let ``g_i^(n)`` be the part of task ``i``'s gradient on the shared parameters that flows through example ``n``'s
rows (dim 0 of every tapped layer's input), so that ``g_i = sum_n g_i^(n)`` with the loss's reduction folded in
(a mean loss gives each example ``1/N`` of its own gradient; masked positions give nothing; across R processes,
whose gradients DDP averages, each example's share of the global ``g_i`` is ``1/R`` of its share of its own
rank's, and ``g_j`` below is the global gradient). Then

* ``contribution[n, i, j] = <g_i^(n), g_j>`` is example ``n``'s share of ``G_ij``: the sum over ``n`` is the
  Gram, exactly; a negative ``contribution[n, i, j] + contribution[n, j, i]`` means that example pushes the two
  tasks apart;
* ``within[n, i, j] = <g_i^(n), g_j^(n)>`` is the Gram of example ``n`` alone, and ``cosine`` its cosines: the
  tasks disagree on that example by itself.

Both come from what the layer rules already hold during the measured pass (the inputs each layer recorded and
its output gradients of every task): see :meth:`gradconflict.measure.rules.LayerRule.attribute`. Parameters no
rule covers (raw parameters, attention's packed in-projection, tied or hooked weights) have no per-example
gradient there; they are left out, listed in :attr:`SampleAttribution.omitted`, and the attributed Gram
:attr:`SampleAttribution.gram` is the Gram over the other parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any, cast

import torch
from torch import Tensor, nn

from gradconflict.measure.rules import Call, LayerGram, LayerRule
from gradconflict.measure.rules.base import LayerAttribution, NotPerExample, Scratch, check_examples

__all__ = ["Attributor", "HeldLayer", "SampleAttribution", "sample_ids"]


def sample_ids(ids: Any) -> Tensor:
    """The user's ``sample_ids`` as a 1-D int64 tensor on the host (one id per example of the batch).

    >>> sample_ids([3, 1, 4]).tolist()
    [3, 1, 4]
    >>> sample_ids(torch.tensor([[1, 2]]))
    Traceback (most recent call last):
    ...
    ValueError: sample_ids must be a 1-D sequence of integers, one per example of the batch; got shape (1, 2)
    """
    try:
        tensor = torch.as_tensor(ids).detach()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"sample_ids must be a 1-D sequence of integers, one per example ({err})") from err
    if tensor.ndim != 1:
        raise ValueError(
            "sample_ids must be a 1-D sequence of integers, one per example of the batch; "
            f"got shape {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"sample_ids must be integers (dataset indices), got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError("sample_ids is empty: pass one id per example of the batch")
    return tensor.to("cpu", torch.int64)


@dataclass
class SampleAttribution:
    """Each example's part in one measured step's Gram (``report.samples``).

    Attributes:
        ids: ``[N]``, the ids passed as ``sample_ids``, in batch order (across processes under
            ``sync="exact"``: every rank's, in rank order).
        tasks: the task names, in the order of every T-sized axis (``report.tasks``).
        contribution: ``[N, T, T]``; entry ``(n, i, j)`` is ``<g_i^(n), g_j>``, example ``n``'s share of
            ``G_ij``. The sum over ``n`` is :attr:`gram`.
        within: ``[N, T, T]``; entry ``(n, i, j)`` is ``<g_i^(n), g_j^(n)>``, the Gram of example ``n`` alone.
        gram: ``[T, T]``, the Gram over the attributed parameters (the layer rules' own computation; the whole
            ``report.gram`` when :attr:`omitted` is empty).
        parameters: the attributed parameters' names.
        omitted: parameter name -> why it is left out of the attribution.

    >>> import torch
    >>> from torch import nn
    >>> from gradconflict import ConflictMonitor
    >>> torch.manual_seed(0) and None
    >>> backbone, heads = nn.Linear(4, 8), nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
    >>> model = nn.ModuleDict({"backbone": backbone, "heads": heads})
    >>> x, y = torch.randn(6, 4), torch.randn(6, 1)
    >>> with ConflictMonitor(model, shared=backbone) as monitor:
    ...     h = backbone(x)
    ...     losses = {"a": (heads["a"](h) - y).pow(2).mean(), "b": (heads["b"](h) + y).pow(2).mean()}
    ...     report = monitor.backward(losses, sample_ids=[10, 11, 12, 13, 14, 15])
    >>> samples = report.samples
    >>> samples.contribution.shape, samples.residual < 1e-5, samples.omitted
    (torch.Size([6, 2, 2]), True, {})
    >>> torch.allclose(samples.contribution.sum(0), report.gram, atol=1e-6)
    True
    """

    ids: Tensor
    tasks: tuple[str, ...]
    contribution: Tensor
    within: Tensor
    gram: Tensor
    parameters: list[str] = field(default_factory=list)
    omitted: dict[str, str] = field(default_factory=dict)

    @property
    def cosine(self) -> Tensor:
        """``[N, T, T]``: ``cos(g_i^(n), g_j^(n))``, the within-example cosines (0 where a task's gradient on
        the example is zero)."""
        norms = self.within.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
        outer = norms[:, :, None] * norms[:, None, :]
        return torch.where(outer > 0, self.within / outer.clamp(min=torch.finfo(outer.dtype).tiny), 0.0)

    @property
    def residual(self) -> float:
        """The sum check: ``max |sum_n contribution[n] - gram|`` relative to ``max |gram|`` (float rounding:
        about 1e-6 in float32)."""
        scale = self.gram.abs().max()
        if scale == 0:
            return float(self.contribution.abs().max()) if self.contribution.numel() else 0.0
        return float((self.contribution.sum(0) - self.gram).abs().max() / scale)

    def pushes_apart(self, i: int | str, j: int | str) -> Tensor:
        """``[N]``: ``contribution[n, i, j] + contribution[n, j, i]``, example ``n``'s part in ``2 G_ij``;
        negative where the example pushes the two tasks apart."""
        a, b = (self.tasks.index(t) if isinstance(t, str) else t for t in (i, j))
        return self.contribution[:, a, b] + self.contribution[:, b, a]

    def pairs(self) -> dict[tuple[str, str], tuple[Tensor, Tensor]]:
        """Per pair of tasks ``(a, b)`` (in :attr:`tasks` order), each example's ``(push, agreement)``, ``[N]``
        each: :meth:`pushes_apart`, and its own inner product ``<g_a^(n), g_b^(n)>`` divided by the batch's mean
        of ``(|g_a^(m)|^2 + |g_b^(m)|^2) / 2`` (zero when that is zero). What the run's per-id aggregates add up
        (:class:`gradconflict.records.samples.SampleTally`)."""
        pairs, push, agreement = self.pair_columns()
        return {pair: (push[:, k], agreement[:, k]) for k, pair in enumerate(pairs)}

    def pair_columns(self) -> tuple[list[tuple[str, str]], Tensor, Tensor]:
        """:meth:`pairs` as two ``[N, pairs]`` blocks, ``(pairs, push, agreement)``, column ``k`` for ``pairs[k]``
        (taken together, not pair by pair)."""
        i, j = torch.triu_indices(len(self.tasks), len(self.tasks), 1).tolist()
        push = self.contribution[:, i, j] + self.contribution[:, j, i]
        scale = ((self.within[:, i, i] + self.within[:, j, j]) / 2).mean(0)
        agreement = torch.where(scale > 0, self.within[:, i, j] / scale, 0.0)
        return [(self.tasks[a], self.tasks[b]) for a, b in zip(i, j)], push, agreement

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) view for a step's record: the ids, the sum check, the parameters left out,
        and each pair's per-example ``push`` and ``agreement`` (:meth:`pairs`), not the full ``[N, T, T]``."""
        return {
            "ids": self.ids.tolist(),
            "residual": self.residual,
            "omitted": sorted(self.omitted),
            "pairs": [
                {"pair": list(pair), "push": push.double().tolist(), "agreement": agreement.double().tolist()}
                for pair, (push, agreement) in self.pairs().items()
            ],
        }

    def to(self, device: torch.device | str) -> SampleAttribution:
        """The same attribution with its tensors on ``device``."""
        return replace(
            self, ids=self.ids.to(device), contribution=self.contribution.to(device), within=self.within.to(device),
            gram=self.gram.to(device),
        )

    def scaled(self, factor: float | Tensor) -> SampleAttribution:
        """The same attribution with every inner product multiplied by ``factor`` (a loss scale's square)."""
        return replace(
            self, contribution=self.contribution * factor, within=self.within * factor, gram=self.gram * factor
        )


@dataclass(eq=False)
class HeldLayer:
    """One rule-covered module's calls in a micro-batch of an accumulation group, held (each call's input and
    every task's output gradients) until the group's per-task gradients are known: see :meth:`Attributor.group`.

    Attributes:
        layer: the module's layer name.
        module: the module.
        rule: its layer rule.
        calls: its calls in the micro-batch, with their output gradients.
        names: the parameter names the rule covers there.
        dtype: the dtype of the attribution (the step's Gram dtype).
    """

    layer: str
    module: nn.Module
    rule: LayerRule
    calls: list[Call]
    names: set[str]
    dtype: torch.dtype

    def release(self) -> None:
        """Drop the held inputs and output gradients."""
        for call in self.calls:
            call.release()


def _joined(each: Sequence[HeldLayer | None]) -> list[Call] | None:
    """One module's calls in every micro-batch of a group, joined along the examples (call ``p`` of each
    micro-batch into one), or ``None`` when they cannot be: a micro-batch that did not reach the module, other
    covered parameters or another number of calls, a recorded input that is not a plain tensor (a rule that keeps
    module state with it), or shapes that differ beyond dim 0."""
    if any(h is None for h in each):
        return None
    held = [h for h in each if h is not None]
    first = held[0]
    if any(h.names != first.names or len(h.calls) != len(first.calls) for h in held):
        return None
    joined = []
    for p, call in enumerate(first.calls):
        calls = [h.calls[p] for h in held]
        inputs, grads = [c.saved for c in calls], [c.grads for c in calls]
        if not isinstance(call.saved, Tensor) or call.saved.ndim == 0:
            return None
        if not all(isinstance(x, Tensor) and x.shape[1:] == call.saved.shape[1:] for x in inputs):
            return None
        if not all(g is not None and g.shape[2:] == call.output_grads.shape[2:] for g in grads):
            return None
        joined.append(Call(
            call.module, call.rule, torch.cat(inputs), owner=call.owner, used=call.used,
            grads=torch.cat(cast(list[Tensor], grads), dim=1), output_bytes=sum(c.output_bytes for c in calls),
        ))
    return joined


class Attributor:
    """Collects, during one measured pass, each rule-covered layer's attribution (see :class:`Attributor.layer`).

    ``examples`` is the number of examples (dim 0 of every tapped input); ``names`` maps a parameter's id (the
    tensor the autograd graph holds) to its name. ``world``: the number of processes whose gradients are averaged
    (DDP's mean over the ranks), each example's share of the global gradient being its share of its own rank's
    divided by ``world``; the layers are then attributed with :meth:`against` the global per-task gradients.
    ``scratch``: where the layers form their per-example gradients (:class:`~gradconflict.measure.rules.base.Scratch`;
    the engine keeps one from step to step).
    """

    def __init__(self, examples: int, num_tasks: int, dtype: torch.dtype, device: torch.device,
                 names: dict[int, str], leaf: Callable[[Tensor], Tensor], world: int = 1,
                 scratch: Scratch | None = None) -> None:
        self.examples = examples
        self.names = names
        self.leaf = leaf
        self.world = world
        shape = (examples, num_tasks, num_tasks)
        self.contribution = torch.zeros(shape, dtype=dtype, device=device)
        self.within = torch.zeros(shape, dtype=dtype, device=device)
        self.gram = torch.zeros(num_tasks, num_tasks, dtype=dtype, device=device)
        self.parameters: set[str] = set()
        self.omitted: dict[str, str] = {}
        self.scratch = Scratch() if scratch is None else scratch  # the layers' per-example gradients, one block

    def _name(self, p: Tensor) -> str:
        return self.names.get(id(self.leaf(p)), f"<parameter of shape {tuple(p.shape)}>")

    def layer(
        self, layer: str, module: nn.Module, rule: LayerRule, calls: Sequence[Call], names: set[str],
        dtype: torch.dtype,
    ) -> LayerGram:
        """The layer's Gram, attributing it to the examples when its rule can (else noting why not)."""
        out = self._attribute(layer, module, rule, calls, names, dtype, None)
        return rule.gram(module, calls, names, dtype) if out is None else LayerGram(out.gram, out.route)

    def against(
        self, layer: str, module: nn.Module, rule: LayerRule, calls: Sequence[Call], names: set[str],
        dtype: torch.dtype, total: dict[str, Tensor],
    ) -> None:
        """Attribute the layer against the per-task gradients ``total`` (``{name: [T, *shape]}``, as the rule's
        ``per_task`` gives them: across processes, the global ones, whose Gram the measurement takes itself)."""
        self._attribute(layer, module, rule, calls, names, dtype, total)

    def group(self, parts: Sequence[tuple[int, list[HeldLayer]]], totals: Mapping[int, Tensor]) -> None:
        """Attribute an accumulation group: ``parts`` holds each micro-batch's number of examples and held layers
        (in order: its examples are the next rows here), ``totals`` the group's per-task gradients (the graph's
        parameter id -> ``[T, *shape]``, summed over the micro-batches).

        A module held alike in every micro-batch (the same calls, inputs of the same shape but for dim 0, and a
        rule that keeps nothing but the input: not a training-mode BatchNorm, whose statistics are the
        micro-batch's) is attributed once on its calls joined along the examples, as one batch of the group's
        examples: the rule's own sum over them is the group's gradient, and it takes its cheapest route (the
        Linear kernel among them). Any other is attributed micro-batch by micro-batch against ``totals``, its Gram
        added once. The held inputs and output gradients are dropped as each module is done."""
        starts = [0, *accumulate(n for n, _ in parts)]
        by_module: dict[nn.Module, list[HeldLayer | None]] = {}
        for k, (_, layers) in enumerate(parts):
            for layer in layers:
                by_module.setdefault(layer.module, [None] * len(parts))[k] = layer
        for module, each in by_module.items():
            first = next(h for h in each if h is not None)
            joined = _joined(each)
            if joined is not None:
                self._attribute(first.layer, module, first.rule, joined, first.names, first.dtype, None)
            for k, held in enumerate(each):
                if held is None:
                    continue
                if joined is None:
                    params = held.rule.params(module)
                    total = {n: totals[id(self.leaf(params[n]))] for n in held.names}
                    rows = slice(starts[k], starts[k] + parts[k][0])
                    self._attribute(held.layer, module, held.rule, held.calls, held.names, held.dtype, total, rows)
                held.release()

    def _attribute(
        self, layer: str, module: nn.Module, rule: LayerRule, calls: Sequence[Call], names: set[str],
        dtype: torch.dtype, total: dict[str, Tensor] | None, rows: slice | None = None,
    ) -> LayerAttribution | None:
        """The layer's attribution, added up here (into ``rows``, the examples of the calls: all by default);
        ``None`` (its parameters noted as omitted) when there is none."""
        rows = slice(0, self.examples) if rows is None else rows
        params = [self._name(getattr(module, n)) for n in sorted(names)]
        try:
            check_examples(calls, rows.stop - rows.start)
            out = rule.attribute(module, calls, names, dtype, total, self.scratch)
        except (NotPerExample, NotImplementedError) as err:
            self.omitted.update(dict.fromkeys(params, f"layer {layer!r}: {err}"))
            return None
        self.contribution[rows] += out.contribution
        self.within[rows] += out.within
        if not self.parameters.issuperset(params):  # a layer's Gram once, however many micro-batches reached it
            self.gram += out.gram
        self.parameters.update(params)
        return out

    def omit(self, leaves: Sequence[Tensor], reason: str) -> None:
        """Note parameters whose gradients were materialised whole (no per-example split is known for them)."""
        self.omitted.update({self._name(p): reason for p in leaves})

    def result(self, ids: Tensor, tasks: Sequence[str]) -> SampleAttribution:
        """What :class:`SampleAttribution` holds for this step (``ids`` in batch order, ``tasks`` the T names)."""
        return SampleAttribution(
            ids, tuple(tasks), self.contribution / self.world, self.within / self.world**2,
            (self.gram + self.gram.T) / 2, sorted(self.parameters), dict(sorted(self.omitted.items())),
        )
