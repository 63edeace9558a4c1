"""``nn.Embedding``: per-task gradient rows summed by token id, then a Gram over the unique ids only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gradconflict.rules.base import Call, LayerGrads, LayerRule, gram_of, register_rule, weighted


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Row ``k`` of task ``i``'s gradient is the sum of ``D_i`` over the positions whose id is ``k`` (zero for
    ``padding_idx``, divided by the id's count under ``scale_grad_by_freq``)."""

    param_names = ("weight",)

    def accepts(self, module: nn.Module) -> bool:
        # Sparse gradients and max_norm renormalisation (an in-place edit of the weight) stay with autograd.
        return not module.sparse and module.max_norm is None

    def compute(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        covered: set[str],
        shared: set[str],
        weights: Tensor,
        gram_dtype: torch.dtype,
    ) -> LayerGrads:
        T, dim = weights.shape[0], module.embedding_dim
        ids = torch.cat([c.saved.reshape(-1) for c in calls])
        D = torch.cat([c.grads.reshape(T, -1, dim) for c in calls], dim=1)
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = D.new_zeros(T, unique.shape[0], dim).index_add_(1, inverse, D)
        if module.scale_grad_by_freq:
            counts = torch.bincount(inverse, minlength=unique.shape[0]).to(rows.dtype)
            rows = rows / counts[:, None]
        if module.padding_idx is not None:
            rows = rows.masked_fill((unique == module.padding_idx)[None, :, None], 0)
        grads = {}
        if "weight" in covered:
            dW = torch.zeros_like(module.weight)
            dW[unique] = weighted(weights, rows).to(dW.dtype)
            grads["weight"] = dW
        if not shared:
            return LayerGrads(None, grads, "bookkeeping")
        rows = rows.to(gram_dtype)
        return LayerGrads(gram_of(rows.flatten(1)), grads, "materialised")
