"""``nn.Embedding``: per-task gradient rows summed by token id, then a Gram over the unique ids only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import einsum
from torch import Tensor, nn

from gradconflict.measure.rules.base import (
    Call,
    LayerAttribution,
    LayerGram,
    LayerRule,
    Scratch,
    gram_of,
    register_rule,
)


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule[nn.Embedding]):
    """Row ``k`` of task ``i``'s gradient is the sum of ``D_i`` over the positions whose id is ``k`` (zero for
    ``padding_idx``; under ``scale_grad_by_freq`` each call divides by the id's count in that call, as
    autograd does)."""

    param_names = ("weight",)

    def accepts(self, module: nn.Embedding) -> bool:
        # max_norm renormalisation (an in-place edit of the weight) stays with autograd. A sparse Embedding is
        # covered: its rows come from the output gradients, and autograd is never asked for its (sparse) gradient.
        return module.max_norm is None

    def _positions(
        self, module: nn.Embedding, calls: Sequence[Call], dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Every id of every call, the unique ones with each position's index into them, and each call's output
        gradients ``[T, positions, dim]`` as autograd adds them into the table (divided by the id's count under
        ``scale_grad_by_freq``; ``padding_idx`` is left to the caller)."""
        embedding = module
        ids = torch.cat([c.saved.reshape(-1) for c in calls])
        unique, inverse = torch.unique(ids, return_inverse=True)
        grads, start = [], 0
        for call in calls:
            assert call.grads is not None  # the batched backward reached this call
            D = call.grads.reshape(call.grads.shape[0], -1, embedding.embedding_dim).to(dtype)
            if embedding.scale_grad_by_freq:
                where = inverse[start : start + D.shape[1]]
                counts = torch.bincount(where, minlength=unique.shape[0]).to(dtype)
                D = D / counts[where][None, :, None]
            start += D.shape[1]
            grads.append(D)
        return unique, inverse, grads

    def _rows(self, module: nn.Embedding, calls: Sequence[Call], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The unique ids of every call and each task's summed gradient rows for them ``[T, U, dim]``."""
        unique, inverse, grads = self._positions(module, calls, dtype)
        rows = grads[0].new_zeros(grads[0].shape[0], unique.shape[0], module.embedding_dim)
        start = 0
        for D in grads:
            rows.index_add_(1, inverse[start : start + D.shape[1]], D)
            start += D.shape[1]
        if module.padding_idx is not None:
            rows = rows.masked_fill((unique == module.padding_idx)[None, :, None], 0)
        return unique, rows

    def per_task(
        self, module: nn.Embedding, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        unique, rows = self._rows(module, calls, dtype)
        table = rows.new_zeros(rows.shape[0], module.num_embeddings, module.embedding_dim)
        table[:, unique] = rows
        return {"weight": table}

    def gram(self, module: nn.Embedding, calls: Sequence[Call], names: set[str], gram_dtype: torch.dtype) -> LayerGram:
        # Only the rows of ids the batch used are non-zero: their Gram is the table's.
        _, rows = self._rows(module, calls, gram_dtype)
        return LayerGram(gram_of(rows.flatten(1)), "materialised")

    def attribute(
        self, module: nn.Embedding, calls: Sequence[Call], names: set[str], dtype: torch.dtype,
        total: dict[str, Tensor] | None = None, scratch: Scratch | None = None,
    ) -> LayerAttribution:
        """Example ``n``'s gradient is the table of its own positions' rows: ``<g_i^(n), g_j>`` sums
        ``D_i[p] . G_j[id_p]`` over its positions ``p`` (``G_j`` the batch's table, or ``total``'s), and its own
        Gram sums, over the ids it uses, the products of its rows for that id."""
        unique, inverse, grads = self._positions(module, calls, dtype)
        T, U, N = grads[0].shape[0], unique.shape[0], calls[0].saved.shape[0]
        D = torch.cat(grads, dim=1)  # [T, P, dim], the positions of every call in order
        padding_idx = module.padding_idx
        if padding_idx is not None:
            D = D.masked_fill((unique[inverse] == padding_idx)[None, :, None], 0)
        example = torch.cat([torch.arange(N, device=D.device).repeat_interleave(c.saved[0].numel()) for c in calls])
        if total is None:
            rows = D.new_zeros(T, U, D.shape[2]).index_add_(1, inverse, D)
        else:  # the given table's rows for the ids this batch uses (the others meet no example here)
            rows = total["weight"].to(dtype)[:, unique]
        per_position = einsum(D, rows[:, inverse], "t p d, s p d -> p t s")
        contribution = per_position.new_zeros(N, T, T).index_add_(0, example, per_position)
        # each example's own table: its rows summed per (example, id)
        keys, key_of = torch.unique(example * U + inverse, return_inverse=True)
        own = D.new_zeros(T, keys.shape[0], D.shape[2]).index_add_(1, key_of, D)
        per_key = einsum(own, own, "t k d, s k d -> k t s")
        within = per_key.new_zeros(N, T, T).index_add_(0, torch.div(keys, U, rounding_mode="floor"), per_key)
        gram = gram_of((rows if total is None else total["weight"].to(dtype)).flatten(1))
        return LayerAttribution(gram, contribution, within, "per-example")
