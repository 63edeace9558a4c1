"""``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, padding mode): each task's weight gradient is
the convolution backward of its output gradient, batched over the T tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
        w = module.weight
        return torch.ops.aten.convolution_backward(
            grad_out,
            x.to(grad_out.dtype),
            w.to(grad_out.dtype),
            None,
            module.stride,
            padding,
            module.dilation,
            False,
            [0] * len(padding),
            module.groups,
            [False, True, False],
        )[1]

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
        grads: dict[str, Tensor] = {}
        for call in calls:
            (x, padding), D = call.saved, call.grads
            parts: dict[str, Tensor] = {}
            if "weight" in covered:
                Dw = weighted(weights, D)
                parts["weight"] = self._weight_grad(module, x, padding, Dw)
                if "weight" in shared:
                    Dg = D.to(gram_dtype)
                    per_w = torch.func.vmap(self._weight_grad, in_dims=(None, None, None, 0))(module, x, padding, Dg)
                    per_task["weight"] = per_task.get("weight", 0) + per_w
            if "bias" in covered:
                axes = (0, *range(2, D.ndim - 1))
                b = D.sum(tuple(a + 1 for a in axes))
                parts["bias"] = weighted(weights, b)
                if "bias" in shared:
                    per_task["bias"] = per_task.get("bias", 0) + b.to(gram_dtype)
            for name, g in parts.items():
                grads[name] = grads[name] + g if name in grads else g
        grads = {n: g.to(getattr(module, n).dtype) for n, g in grads.items()}
        if not shared:
            return LayerGrads(None, grads, "bookkeeping")
        flat = torch.cat([per_task[n].flatten(1) for n in sorted(shared)], dim=1)
        return LayerGrads(gram_of(flat), grads, "materialised")
