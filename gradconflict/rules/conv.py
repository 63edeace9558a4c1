"""``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, padding mode): the T per-task weight gradients
come from one convolution backward in which the tasks are extra output channels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from gradconflict.rules.base import Call, LayerGrads, LayerRule, gram_of, register_rule, weighted


def _padded_input(module: nn.Module, x: Tensor) -> tuple[Tensor, list[int]]:
    """The input as the convolution proper sees it, and the symmetric zero padding it applies on top.

    Non-zero padding modes and ``padding="same"`` with an odd total pad both pad the input explicitly.
    """
    k = module.kernel_size
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), [0] * len(k)
    if module.padding == "valid":
        return x, [0] * len(k)
    if module.padding == "same":
        totals = [d * (kk - 1) for d, kk in zip(module.dilation, k)]
        pad: list[int] = []
        for total in reversed(totals):
            pad += [total // 2, total - total // 2]
        return F.pad(x, pad), [0] * len(k)
    return x, list(module.padding)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule):
    """Convolutions: per-task weight gradients from one batched ``convolution_backward``."""

    param_names = ("weight", "bias")

    def save(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> tuple[Tensor, list[int]]:
        return _padded_input(module, args[0].detach())

    def _weight_grad(self, module: nn.Module, x: Tensor, padding: list[int], grad_out: Tensor) -> Tensor:
        """Weight gradient of the convolution for output gradient ``grad_out`` (``[N, C_out, ...]``)."""
        groups = module.groups
        shape = (grad_out.shape[1], module.in_channels // groups, *module.kernel_size)
        return torch.ops.aten.convolution_backward(
            grad_out, x.to(grad_out.dtype), grad_out.new_empty(shape), None, module.stride, padding,
            module.dilation, False, [0] * len(padding), groups, [False, True, False],
        )[1]

    def _per_task_weight_grads(self, module: nn.Module, x: Tensor, padding: list[int], D: Tensor) -> Tensor:
        """All T weight gradients from one convolution backward: the tasks become extra output channels.

        ``D`` is ``[T, N, C_out, ...]``; within each group the T tasks' channels are laid side by side, so the
        stacked convolution has ``T * C_out`` output channels and the same ``groups``.
        """
        g = module.groups
        stacked = rearrange(D, "t n (g c) ... -> n (g t c) ...", g=g)
        grads = self._weight_grad(module, x, padding, stacked)  # [(g t c), C_in / g, *kernel]
        return rearrange(grads, "(g t c) ... -> t (g c) ...", g=g, t=D.shape[0])

    def compute(
        self,
        module: nn.Module,
        calls: Sequence[Call],
        covered: set[str],
        shared: set[str],
        weights: Tensor,
        gram_dtype: torch.dtype,
    ) -> LayerGrads:
        per_task: dict[str, Tensor] = {}
        direct: dict[str, Tensor] = {}  # a head's convolution needs only the update, not the T gradients
        for call in calls:
            (x, padding), D = call.saved, call.grads
            parts, updates = {}, {}
            if "weight" in shared:
                parts["weight"] = self._per_task_weight_grads(module, x, padding, D)
            elif "weight" in covered:
                updates["weight"] = self._weight_grad(module, x, padding, weighted(weights, D))
            if "bias" in covered:
                parts["bias"] = D.sum((1, *range(3, D.ndim)))
            for store, new in ((per_task, parts), (direct, updates)):
                for name, g in new.items():
                    store[name] = store[name] + g if name in store else g
        grads = {n: weighted(weights, g) for n, g in per_task.items()} | direct
        grads = {n: g.to(getattr(module, n).dtype) for n, g in grads.items()}
        if not shared:
            return LayerGrads(None, grads, "bookkeeping")
        flat = torch.cat([per_task[n].to(gram_dtype).flatten(1) for n in sorted(shared)], dim=1)
        return LayerGrads(gram_of(flat), grads, "materialised")
