"""``nn.Linear`` (any input rank): ghost Gram through the inputs' kernel, or the materialised weight gradients,
whichever costs fewer operations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
        (N, d_in), d_out = X.shape, D.shape[-1]
        per_task: dict[str, Tensor] = {}
        gram, route = None, "bookkeeping"
        if shared:
            Xg, Dg = X.to(gram_dtype), D.to(gram_dtype)
            if "weight" in shared and ghost_is_cheaper(N, d_in, d_out, T):
                # <D_i, (X X^T + 1) D_j>: the column of ones that the bias sees adds 1 to every kernel entry.
                K = Xg @ Xg.T
                if "bias" in shared:
                    K += 1
                KD = K @ Dg  # [N, N] @ [T, N, d_out]
                gram = gram_of(Dg.reshape(T, -1), KD.reshape(T, -1))
                route = "ghost"
            else:
                if "weight" in shared:
                    per_task["weight"] = Dg.transpose(1, 2) @ Xg  # T batched products: [T, d_out, d_in]
                if "bias" in shared:
                    per_task["bias"] = Dg.sum(1)
                gram = gram_of(torch.cat([g.flatten(1) for g in per_task.values()], dim=1))
                route = "materialised"
        # T gradients that exist already give the update by a weighted sum, cheaper than another matmul.
        grads = {name: weighted(weights, g) for name, g in per_task.items()}
        if covered - grads.keys():
            Dw = weighted(weights, D)
            if "weight" in covered and "weight" not in grads:
                grads["weight"] = Dw.T @ X.to(D.dtype)
            if "bias" in covered and "bias" not in grads:
                grads["bias"] = Dw.sum(0)
        return LayerGrads(gram, {n: g.to(getattr(module, n).dtype) for n, g in grads.items() if n in covered}, route)
