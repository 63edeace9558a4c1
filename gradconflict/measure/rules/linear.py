"""``nn.Linear`` (any input rank): ghost Gram through the inputs' kernel, or the materialised weight gradients,
whichever costs fewer operations; under ``sample_ids`` also each example's weight gradients, where those cost
least (:func:`attribution_route`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import einsum
from torch import Tensor, nn

from gradconflict.measure.rules.base import (
    EXAMPLE_CHUNK_BYTES,
    MEMORY_COST,
    Call,
    LayerAttribution,
    LayerGram,
    LayerRule,
    Scratch,
    attribution_of,
    gram_of,
    materialised_gram,
    per_example_attribution,
    register_rule,
)


def ghost_is_cheaper(rows: int, d_in: int, d_out: int, tasks: int) -> bool:
    """Whether the ghost Gram ``<D_i, (X X^T) D_j>`` costs fewer multiply-adds than materialising the T weight
    gradients ``D_i^T X`` and taking their Gram.

    >>> ghost_is_cheaper(rows=64, d_in=512, d_out=512, tasks=4), ghost_is_cheaper(2048, 256, 256, 4)
    (True, False)
    """
    ghost = rows * rows * d_in + tasks * rows * rows * d_out + tasks * tasks * rows * d_out
    materialised = tasks * rows * d_in * d_out + tasks * tasks * d_in * d_out
    return ghost < materialised


def attribution_route(
    examples: int, rows: int, d_in: int, d_out: int, tasks: int, item_bytes: int, against: bool = False
) -> str:
    """The cheapest route to attribute a Linear layer's weight (:meth:`LinearRule.attribute`) for ``examples``
    examples of ``rows`` rows each, counted in multiply-adds, a number written to memory and read back counting
    :data:`MEMORY_COST`.

    With ``W = d_in * d_out`` weights and ``R = N L`` rows: the per-example route forms ``T N W`` numbers at ``L``
    multiply-adds each, twice when they exceed :data:`EXAMPLE_CHUNK_BYTES` (they are formed again for the
    contributions), and needs no per-task product; the materialised route forms the T weight gradients and
    ``W_j x_r`` for every row (``2 T R W``); the kernel route forms ``X X^T`` and ``K D_j`` (``R^2 (d_in + T
    d_out)``). Both of the latter take each example's own Gram through its ``L x L`` kernel. ``against``: the
    contributions are taken against given gradients (no kernel over this process's rows; no per-task product to
    form, and the per-example gradients are formed once). One row per example (an MLP) never takes the
    per-example route; long sequences through a layer too wide for the kernel (a transformer's feed-forward
    layers) do.

    >>> attribution_route(64, 1, 512, 512, 4, 4), attribution_route(16, 128, 256, 1024, 4, 4)
    ('ghost', 'per-example')
    >>> attribution_route(1024, 2, 256, 256, 4, 4)
    'materialised'
    """
    N, L, T = examples, rows, tasks
    R, W = N * L, d_in * d_out
    within = 0 if L == 1 else N * L * L * (d_in + T * d_out)
    formed = 1 if against or T * N * W * item_bytes <= EXAMPLE_CHUNK_BYTES else 2
    costs = {
        "per-example": formed * T * N * W * (L + MEMORY_COST),
        "materialised": (1 if against else 2) * T * R * W + T * W * MEMORY_COST + within,
    }
    if not against:
        costs["ghost"] = R * R * (d_in + T * d_out) + within
    return min(costs, key=costs.__getitem__)


def _rows(parts: list[Tensor], dim: int) -> Tensor:
    """The rows of every call of a reused module, stacked (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


@register_rule(nn.Linear)
class LinearRule(LayerRule[nn.Module]):
    """``y = x W^T + b``: the weight gradient of task ``i`` is ``D_i^T X`` over all input rows (of every call)."""

    param_names = ("weight", "bias")

    def _rows(self, calls: Sequence[Call], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The inputs ``X`` ``[N, d_in]`` and output gradients ``D`` ``[T, N, d_out]`` of every call, stacked."""
        T = calls[0].output_grads.shape[0]
        X = _rows([c.saved.reshape(-1, c.saved.shape[-1]) for c in calls], dim=0).to(dtype)
        D = _rows([c.output_grads.reshape(T, -1, c.output_grads.shape[-1]) for c in calls], dim=1).to(dtype)
        return X, D

    @staticmethod
    def _per_task(X: Tensor, D: Tensor, names: set[str]) -> dict[str, Tensor]:
        per_task = {}
        if "weight" in names:
            per_task["weight"] = D.transpose(1, 2) @ X  # T batched products: [T, d_out, d_in]
        if "bias" in names:
            per_task["bias"] = D.sum(1)
        return per_task

    def per_task(
        self, module: nn.Module, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        return self._per_task(*self._rows(calls, dtype), names)

    def gram(self, module: nn.Module, calls: Sequence[Call], names: set[str], gram_dtype: torch.dtype) -> LayerGram:
        X, D = self._rows(calls, gram_dtype)
        (N, d_in), (T, d_out) = X.shape, (D.shape[0], D.shape[-1])
        if "weight" in names and ghost_is_cheaper(N, d_in, d_out, T):
            # <D_i, (X X^T + 1) D_j>: the column of ones that the bias sees adds 1 to every kernel entry.
            K = X @ X.T
            if "bias" in names:
                K += 1
            return LayerGram(gram_of(D.reshape(T, -1), (K @ D).reshape(T, -1)), "ghost")
        # the rows already stacked; a transposed weight (Conv1D below) has the same Gram
        return materialised_gram(self._per_task(X, D, names), gram_dtype)


    def _examples(self, calls: Sequence[Call], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The inputs ``[N, L, d_in]`` and output gradients ``[T, N, L, d_out]`` of every call, grouped by example
        (dim 0 of each call's input): example ``n``'s ``L`` rows are its rows in every call."""
        X = _rows([c.saved.reshape(c.saved.shape[0], -1, c.saved.shape[-1]) for c in calls], dim=1).to(dtype)
        D = _rows([g.reshape(*g.shape[:2], -1, g.shape[-1]) for g in (c.output_grads for c in calls)], dim=2).to(dtype)
        return X, D

    def attribute(
        self, module: nn.Module, calls: Sequence[Call], names: set[str], dtype: torch.dtype,
        total: dict[str, Tensor] | None = None, scratch: Scratch | None = None,
    ) -> LayerAttribution:
        """Each example's part in the layer's Gram, by the route :func:`attribution_route` finds cheapest:

        * ``"ghost"``: from the inputs' kernel ``K = X X^T (+1 for the bias)``,
          ``<g_i^(n), g_j> = sum over n's rows r of D_i[r] . (K D_j)[r]``;
        * ``"materialised"``: the same through the materialised weight gradients, ``(K D_j)[r] = W_j x_r + b_j``;
        * ``"per-example"``: each example's weight gradients ``D_i^(n)T X^(n)`` (:func:`per_example_attribution`,
          in ``scratch``), whose sum over the examples is ``W_i``: no separate per-task product. They are formed
          transposed, ``X^(n)T D_i^(n)`` (``[d_in, d_out]``, the faster product), which leaves every inner product
          as it is.

        On the first two, ``<g_i^(n), g_j^(n)>`` comes from ``K``'s block of example ``n`` alone
        (:meth:`_products`). Against a given ``total`` (the global gradients across processes, whose rows no kernel
        here holds), not the kernel, and the contributions are taken against ``total``'s ``W_j`` and ``b_j``."""
        X, D = self._examples(calls, dtype)
        bias = "bias" in names
        against = None if total is None else {n: g.to(dtype) for n, g in self._as_linear(total).items()}

        def bias_part() -> LayerAttribution:  # the bias's per-example gradients are D summed over the rows
            return attribution_of(D.sum(2), "per-example", None if against is None else against["bias"])

        if "weight" not in names:
            return bias_part()
        (N, L, d_in), (T, d_out) = X.shape, (D.shape[0], D.shape[-1])
        route = attribution_route(N, L, d_in, d_out, T, X.element_size(), against is not None)
        if route == "per-example":

            def weight_grads(a: int, b: int, out: Tensor) -> Tensor:
                """Into ``out`` (``[1, b - a, T, d_in * d_out]``): the transposed weight gradients of examples
                ``a:b``, one product per example and task (``X``'s transpose read in place, not copied)."""
                J = out.view(b - a, T, d_in, d_out)
                for n in range(a, b):
                    torch.bmm(X[n].T.expand(T, d_in, L), D[:, n], out=J[n - a])
                return out

            given = None if against is None else against["weight"].transpose(1, 2).reshape(1, T, -1)
            out = per_example_attribution(weight_grads, N, T, d_in * d_out, X, given, scratch=scratch)
            return out + bias_part() if bias else out
        if route == "ghost":
            rows = X.reshape(N * L, d_in)
            K = rows @ rows.T  # the kernel over every row of the batch, as the Gram's ghost route forms it
            if bias:
                K += 1
            KD = (K @ D.reshape(T, N * L, d_out)).reshape(D.shape)
            gram = gram_of(D.reshape(T, -1), KD.reshape(T, -1))
        else:
            per_task = self._per_task(X.reshape(-1, d_in), D.reshape(T, -1, d_out), names) if against is None else {
                n: against[n] for n in names
            }
            KD = einsum(X, per_task["weight"], "n l i, t o i -> t n l o")
            if bias:
                KD += per_task["bias"][:, None, None, :]
            gram = materialised_gram(per_task, dtype).gram
        return LayerAttribution(gram, *self._products(X, D, KD, bias), route)

    @staticmethod
    def _as_linear(per_task: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`per_task`'s gradients with the weight as ``nn.Linear`` stores it, ``[T, d_out, d_in]``."""
        return per_task

    @staticmethod
    def _products(X: Tensor, D: Tensor, KD: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
        """``(contribution, within)``, ``[N, T, T]`` each: ``D_i[r] . (K D_j)[r]`` summed over each example's rows,
        and the same with ``K``'s block of example ``n`` alone (for one row per example, the number
        ``|x_n|^2 (+1)`` times ``D_i . D_j``)."""
        L = X.shape[1]
        if L == 1:
            own = D
        else:
            K = X @ X.transpose(1, 2)  # [N, L, L]
            if bias:
                K += 1
            own = K @ D  # [T, N, L, d_out], K broadcast over the tasks

        def per_example(A: Tensor, B: Tensor) -> Tensor:  # sum over example n's rows of A_t . B_s: [N, T, T]
            return torch.bmm(A.flatten(2).transpose(0, 1), B.flatten(2).permute(1, 2, 0))

        contribution, within = per_example(D, KD), per_example(D, own)
        if L == 1:
            within = within * (X.square().sum((1, 2)) + (1 if bias else 0))[:, None, None]
        return contribution, within


@register_rule("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(LinearRule):
    """Hugging Face's ``Conv1D`` (GPT-2's projections): ``y = x W + b`` with ``W`` stored ``[d_in, d_out]``, a
    Linear layer whose weight is transposed; the same Gram, the per-task weight gradients transposed."""

    def per_task(
        self, module: nn.Module, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        return self._as_linear(super().per_task(module, calls, names, dtype))

    @staticmethod
    def _as_linear(per_task: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weight transposed (its own inverse: ``Conv1D``'s layout to ``nn.Linear``'s and back)."""
        return {n: g.transpose(1, 2) if n == "weight" else g for n, g in per_task.items()}
