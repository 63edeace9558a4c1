"""``nn.Linear`` (any input rank): ghost Gram through the inputs' kernel, or the materialised weight gradients,
whichever costs fewer operations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from gradconflict.measure.rules.base import (
    EXAMPLE_CHUNK_BYTES,
    Call,
    LayerAttribution,
    LayerGram,
    LayerRule,
    attribution_of,
    gram_of,
    materialised_gram,
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
        X = _rows([rearrange(c.saved, "n ... i -> n (...) i") for c in calls], dim=1).to(dtype)
        D = _rows([rearrange(cast(Tensor, c.grads), "t n ... o -> t n (...) o") for c in calls], dim=2).to(dtype)
        return X, D

    def attribute(
        self, module: nn.Module, calls: Sequence[Call], names: set[str], dtype: torch.dtype,
        total: dict[str, Tensor] | None = None,
    ) -> LayerAttribution:
        """Each example's part in the layer's Gram from the inputs' kernel ``K = X X^T (+1 for the bias)``:
        ``<g_i^(n), g_j> = sum over n's rows r of D_i[r] . (K D_j)[r]``, and ``<g_i^(n), g_j^(n)>`` the same
        with ``K``'s block of example ``n`` alone; or, where the kernel costs more, through the materialised
        weight gradients (``(K D_j)[r] = W_j x_r + b_j``). Against a given ``total`` (the global gradients across
        processes, whose rows no kernel here holds), always the latter, with ``total``'s ``W_j`` and ``b_j``."""
        X, D = self._examples(calls, dtype)
        bias = "bias" in names
        if "weight" not in names:  # the bias alone: its per-example gradients are D summed over the rows
            return attribution_of(D.sum(2), "per-example", None if total is None else total["bias"].to(dtype))
        (N, L, d_in), (T, d_out) = X.shape, (D.shape[0], D.shape[-1])
        if total is None and ghost_is_cheaper(N * L, d_in, d_out, T):
            rows = X.reshape(N * L, d_in)
            K = rows @ rows.T  # the kernel over every row of the batch, as the Gram's ghost route forms it
            if bias:
                K += 1
            KD = (K @ D.reshape(T, N * L, d_out)).reshape(D.shape)
            gram, route = gram_of(D.reshape(T, -1), KD.reshape(T, -1)), "ghost"
        else:
            per_task = self._per_task(X.reshape(-1, d_in), D.reshape(T, -1, d_out), names) if total is None else {
                n: g.to(dtype) for n, g in self._as_linear(total).items()
            }
            KD = einsum(X, per_task["weight"], "n l i, t o i -> t n l o")
            if bias:
                KD += per_task["bias"][:, None, None, :]
            gram, route = materialised_gram(per_task, dtype).gram, "materialised"
        contribution = einsum(D, KD, "t n l o, s n l o -> n t s")
        return LayerAttribution(gram, contribution, self._within(X, D, bias), route)

    @staticmethod
    def _as_linear(per_task: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`per_task`'s gradients with the weight as ``nn.Linear`` stores it, ``[T, d_out, d_in]``."""
        return per_task

    @staticmethod
    def _within(X: Tensor, D: Tensor, bias: bool) -> Tensor:
        """``[N, T, T]``: each example's own Gram, through its block of the kernel or its materialised weight
        gradients (in chunks of examples), whichever costs fewer operations."""
        (N, L, d_in), (T, d_out) = X.shape, (D.shape[0], D.shape[-1])
        if L == 1:  # one row per example: its kernel is the number |x_n|^2 (+1)
            norms = X.square().sum((1, 2)) + (1 if bias else 0)
            return norms[:, None, None] * einsum(D, D, "t n l o, s n l o -> n t s")
        if ghost_is_cheaper(L, d_in, d_out, T):
            K = einsum(X, X, "n l i, n m i -> n l m")
            if bias:
                K += 1
            return einsum(D, einsum(K, D, "n l m, s n m o -> s n l o"), "t n l o, s n l o -> n t s")
        chunk = max(1, EXAMPLE_CHUNK_BYTES // (T * d_out * (d_in + 1) * X.element_size()))
        parts = []
        for start in range(0, N, chunk):
            Xc, Dc = X[start : start + chunk], D[:, start : start + chunk]
            rows = einsum(Dc, Xc, "t n l o, n l i -> t n o i").flatten(2)
            if bias:
                rows = torch.cat([rows, Dc.sum(2)], dim=2)
            parts.append(einsum(rows, rows, "t n p, s n p -> n t s"))
        return torch.cat(parts)


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
