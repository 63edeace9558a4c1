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
        N, d_in = X.shape
        if "bias" in covered:
            # A column of ones makes the bias one more input: [W | b] = D^T [X | 1], and the ghost kernel K + 1.
            X = torch.cat([X, X.new_ones(N, 1)], dim=1)
        gram, route, per_task = None, "bookkeeping", None
        if shared == covered and "weight" in shared:
            Xg, Dg = X.to(gram_dtype), D.to(gram_dtype)
            if ghost_is_cheaper(N, d_in, D.shape[-1], T):
                KD = (Xg @ Xg.T) @ Dg  # [N, N] @ [T, N, d_out]
                gram, route = gram_of(Dg.flatten(1), KD.flatten(1)), "ghost"
            else:
                per_task = einsum(Dg, Xg, "t n o, n i -> t o i")
                gram, route = gram_of(rearrange(per_task, "t o i -> t (o i)")), "materialised"
        elif shared:  # only one of weight and bias is shared (explicit parameter lists): materialise that one
            Xg, Dg = X.to(gram_dtype), D.to(gram_dtype)
            parts = {"weight": lambda: einsum(Dg, Xg[:, :d_in], "t n o, n i -> t (o i)"), "bias": lambda: Dg.sum(1)}
            gram, route = gram_of(torch.cat([parts[n]() for n in sorted(shared)], dim=1)), "materialised"
        # The T gradients, when they exist already, give the update with a weighted sum instead of a matmul.
        full = weighted(weights, per_task) if per_task is not None else weighted(weights, D).T @ X.to(D.dtype)
        grads = {"weight": full[:, :d_in], "bias": full[:, d_in]} if "bias" in covered else {"weight": full}
        grads = {n: g.to(getattr(module, n).dtype) for n, g in grads.items() if n in covered}
        return LayerGrads(gram, grads, route)
