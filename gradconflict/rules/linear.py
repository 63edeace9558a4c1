"""``nn.Linear`` (any input rank): ghost Gram through the inputs' kernel, or the materialised weight gradients,
whichever costs fewer operations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from gradconflict.rules.base import Call, LayerGrads, LayerRule, gram_of, register_rule, weighted


def ghost_is_cheaper(rows: int, d_in: int, d_out: int, tasks: int) -> bool:
    """Whether the ghost Gram ``<D_i, (X X^T) D_j>`` costs fewer multiply-adds than materialising the T weight
    gradients ``D_i^T X`` (DESIGN.md section 3)."""
    ghost = rows * rows * d_in + tasks * rows * rows * d_out + tasks * tasks * rows * d_out
    materialised = tasks * rows * d_in * d_out + tasks * tasks * d_in * d_out
    return ghost < materialised


def rows_gram(X: Tensor, D: Tensor, *, with_weight: bool, with_bias: bool) -> tuple[Tensor, str]:
    """Gram of the gradients of ``y = x W^T + b`` from input rows ``X [N, d_in]`` and per-task output rows
    ``D [T, N, d_out]``, over the weight and/or the bias; returns it with the route taken."""
    T = D.shape[0]
    gram = D.new_zeros(T, T)
    route = "materialised"
    if with_bias:
        gram += gram_of(D.sum(1))
    if with_weight:
        N, d_in = X.shape
        if ghost_is_cheaper(N, d_in, D.shape[-1], T):
            KD = (X @ X.T) @ D  # [N, N] @ [T, N, d_out]
            gram += einsum(D, KD, "t n o, s n o -> t s")
            route = "ghost"
        else:
            gram += gram_of(rearrange(einsum(D, X, "t n o, n i -> t o i"), "t o i -> t (o i)"))
    return gram, route


def _rows(parts: list[Tensor], dim: int) -> Tensor:
    """The rows of every call of a reused module, stacked (no copy for the usual single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """``y = x W^T + b``: the weight gradient of task ``i`` is ``D_i^T X`` over all input rows."""

    param_names = ("weight", "bias")

    def compute(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        covered: set[str],
        shared: set[str],
        weights: Tensor,
        gram_dtype: torch.dtype,
    ) -> LayerGrads:
        T = weights.shape[0]
        X = _rows([c.saved.reshape(-1, c.saved.shape[-1]) for c in calls], dim=0)
        D = _rows([c.grads.reshape(T, -1, c.grads.shape[-1]) for c in calls], dim=1)
        Dw = weighted(weights, D)
        grads: dict[str, Tensor] = {}
        if "weight" in covered:
            grads["weight"] = (Dw.T @ X.to(Dw.dtype)).to(module.weight.dtype)
        if "bias" in covered:
            grads["bias"] = Dw.sum(0).to(module.bias.dtype)
        if not shared:
            return LayerGrads(None, grads, "bookkeeping")
        gram, route = rows_gram(
            X.to(gram_dtype), D.to(gram_dtype), with_weight="weight" in shared, with_bias="bias" in shared
        )
        return LayerGrads(gram, grads, route)
