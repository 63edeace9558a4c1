"""``nn.Embedding``: per-task gradient rows summed by token id, then a Gram over the unique ids only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gradconflict.measure.rules.base import Call, LayerGram, LayerRule, gram_of, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """Row ``k`` of task ``i``'s gradient is the sum of ``D_i`` over the positions whose id is ``k`` (zero for
    ``padding_idx``; under ``scale_grad_by_freq`` each call divides by the id's count in that call, as
    autograd does)."""

    param_names = ("weight",)

    def accepts(self, module: nn.Module) -> bool:
        # max_norm renormalisation (an in-place edit of the weight) stays with autograd. A sparse Embedding is
        # covered: its rows come from the output gradients, and autograd is never asked for its (sparse) gradient.
        return module.max_norm is None

    def _rows(self, module: nn.Module, calls: Sequence[Call], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The unique ids of every call and each task's summed gradient rows for them ``[T, U, dim]``."""
        T, dim = calls[0].grads.shape[0], module.embedding_dim
        ids = torch.cat([c.saved.reshape(-1) for c in calls])
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.zeros(T, unique.shape[0], dim, dtype=dtype, device=ids.device)
        start = 0
        for call in calls:
            D = call.grads.reshape(T, -1, dim).to(dtype)
            where = inverse[start : start + D.shape[1]]
            start += D.shape[1]
            if module.scale_grad_by_freq:
                counts = torch.bincount(where, minlength=unique.shape[0]).to(dtype)
                D = D / counts[where][None, :, None]
            rows.index_add_(1, where, D)
        if module.padding_idx is not None:
            rows = rows.masked_fill((unique == module.padding_idx)[None, :, None], 0)
        return unique, rows

    def per_task(
        self, module: nn.Module, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        unique, rows = self._rows(module, calls, dtype)
        table = rows.new_zeros(rows.shape[0], module.num_embeddings, module.embedding_dim)
        table[:, unique] = rows
        return {"weight": table}

    def gram(self, module: nn.Module, calls: Sequence[Call], names: set[str], gram_dtype: torch.dtype) -> LayerGram:
        # Only the rows of ids the batch used are non-zero: their Gram is the table's.
        _, rows = self._rows(module, calls, gram_dtype)
        return LayerGram(gram_of(rows.flatten(1)), "materialised")
