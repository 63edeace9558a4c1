"""``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, padding mode): the T per-task weight gradients
come from one convolution backward in which the tasks are extra output channels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from gradconflict.measure.rules.base import EXAMPLE_CHUNK_BYTES, Call, LayerRule, register_rule


def _padded_input(module: _ConvNd, x: Tensor) -> tuple[Tensor, list[int]]:
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
    assert not isinstance(module.padding, str)  # 'valid' and 'same' were handled above
    return x, list(module.padding)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(LayerRule[_ConvNd]):
    """Convolutions: the per-task weight gradients from one batched ``convolution_backward``."""

    param_names = ("weight", "bias")

    def _per_task_weight_grads(self, module: _ConvNd, x: Tensor, D: Tensor) -> Tensor:
        """All T weight gradients from one convolution backward: the tasks become extra output channels.

        ``D`` is ``[T, N, C_out, ...]``; within each group the T tasks' channels are laid side by side, so the
        stacked convolution has ``T * C_out`` output channels and the same ``groups``.
        """
        g = module.groups
        x, padding = _padded_input(module, x.to(D.dtype))
        stacked = rearrange(D, "t n (g c) ... -> n (g t c) ...", g=g)
        shape = (stacked.shape[1], module.in_channels // g, *module.kernel_size)
        grads = torch.ops.aten.convolution_backward(
            stacked, x, stacked.new_empty(shape), None, module.stride, padding,
            module.dilation, False, [0] * len(padding), g, [False, True, False],
        )[1]  # [(g t c), C_in / g, *kernel]
        return rearrange(grads, "(g t c) ... -> t (g c) ...", g=g, t=D.shape[0])

    def _per_example_weight_grads(self, module: _ConvNd, x: Tensor, D: Tensor) -> Tensor:
        """``[T, N, *weight.shape]``: each example's weight gradient for every task, from one convolution backward
        in which the examples are extra groups (example ``n``'s input channels only meet its own output
        channels), in chunks of examples to bound the memory of the result."""
        g, (T, N) = module.groups, D.shape[:2]
        x, padding = _padded_input(module, x.to(D.dtype))
        chunk = max(1, EXAMPLE_CHUNK_BYTES // (T * module.weight.numel() * D.element_size()))
        parts = []
        for start in range(0, N, chunk):
            xc, Dc = x[start : start + chunk], D[:, start : start + chunk]
            n = xc.shape[0]
            stacked = rearrange(Dc, "t n (g c) ... -> 1 (n g t c) ...", g=g)
            shape = (stacked.shape[1], module.in_channels // g, *module.kernel_size)
            grads = torch.ops.aten.convolution_backward(
                stacked, rearrange(xc, "n c ... -> 1 (n c) ..."), stacked.new_empty(shape), None, module.stride,
                padding, module.dilation, False, [0] * len(padding), n * g, [False, True, False],
            )[1]  # [(n g t c), C_in / g, *kernel]
            parts.append(rearrange(grads, "(n g t c) ... -> t n (g c) ...", n=n, g=g, t=T))
        return torch.cat(parts, dim=1)

    def per_example(
        self, module: _ConvNd, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        per_example: dict[str, Tensor] = {}
        for call in calls:
            assert call.grads is not None  # the batched backward reached this call
            D = call.grads.to(dtype)
            parts = {}
            if "weight" in names:
                parts["weight"] = self._per_example_weight_grads(module, call.saved, D)
            if "bias" in names:
                parts["bias"] = D.sum(tuple(range(3, D.ndim)))
            for name, g in parts.items():
                per_example[name] = per_example[name] + g if name in per_example else g
        return per_example

    def per_task(
        self, module: _ConvNd, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        per_task: dict[str, Tensor] = {}
        for call in calls:
            D = call.output_grads.to(dtype)
            parts = {}
            if "weight" in names:
                parts["weight"] = self._per_task_weight_grads(module, call.saved, D)
            if "bias" in names:
                parts["bias"] = D.sum((1, *range(3, D.ndim)))
            for name, g in parts.items():
                per_task[name] = per_task[name] + g if name in per_task else g
        return per_task
