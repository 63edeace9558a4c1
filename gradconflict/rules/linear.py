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
        grads: dict[str, Tensor] = {}
        gram, route = None, "bookkeeping"
        if "bias" in covered:
            per_task_bias = D.sum(1)
            grads["bias"] = weighted(weights, per_task_bias).to(module.bias.dtype)
        if shared:
            Xg, Dg = X.to(gram_dtype), D.to(gram_dtype)
            gram = gram_of(per_task_bias.to(gram_dtype)) if "bias" in shared else Dg.new_zeros(T, T)
            if "weight" in shared:
                N, d_in = X.shape
                if ghost_is_cheaper(N, d_in, D.shape[-1], T):
                    KD = (Xg @ Xg.T) @ Dg  # [N, N] @ [T, N, d_out]
                    gram += einsum(Dg, KD, "t n o, s n o -> t s")
                    route = "ghost"
                else:
                    per_task = einsum(Dg, Xg, "t n o, n i -> t o i")
                    gram += gram_of(rearrange(per_task, "t o i -> t (o i)"))
                    # The T gradients exist already: their weighted sum is cheaper than another matmul.
                    grads["weight"] = weighted(weights, per_task).to(module.weight.dtype)
                    route = "materialised"
            else:
                route = "materialised"
        if "weight" in covered and "weight" not in grads:
            grads["weight"] = (weighted(weights, D).T @ X.to(D.dtype)).to(module.weight.dtype)
        return LayerGrads(gram, grads, route)
