"""``nn.Conv1d/2d/3d`` (any stride, padding, dilation, groups, padding mode): the T per-task weight gradients
come from one convolution backward in which the tasks are extra output channels. Under ``sample_ids`` each
example's weight gradients are one batched matrix product of its output gradients with its input patches, and
their sum is the per-task gradient; or, for small images through wide layers, the attribution goes through a
forward convolution and each example's patch kernel (:func:`kernel_is_cheaper`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from gradconflict.measure.rules.base import (
    EXAMPLE_CHUNK_BYTES,
    MEMORY_COST,
    Call,
    LayerAttribution,
    LayerRule,
    Scratch,
    attribution_of,
    gram_of,
    per_example_attribution,
    register_rule,
)


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


def _patches(module: _ConvNd, x: Tensor) -> Tensor:
    """``[g, N, C_in / g * prod(kernel), P]``: the input patch each of the ``P`` output positions sees, per group,
    its entries in the order of the weight's (input channel, then kernel offsets): example ``n``'s weight
    gradient for its output gradients ``D_n`` ``[C_out / g, P]`` is ``D_n @ patches[:, n].T``."""
    x, padding = _padded_input(module, x)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    dims = len(module.kernel_size)
    for d, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)[..., ::dil]  # windows of the kernel's extent, every dil-th
    N, C = x.shape[:2]  # x: [N, C_in, *positions, *kernel offsets]
    x = x.reshape(N, module.groups, C // module.groups, *x.shape[2:])
    x = x.permute(1, 0, 2, *range(3 + dims, 3 + 2 * dims), *range(3, 3 + dims))
    return x.reshape(module.groups, N, -1, math.prod(x.shape[3 + dims :]))


def kernel_is_cheaper(examples: int, positions: int, patch: int, c_out: int, tasks: int, item_bytes: int) -> bool:
    """Whether attributing a convolution's weight through each example's patch kernel costs less than through
    its per-example weight gradients (:class:`ConvRule`), counted in multiply-adds, a number written to memory
    and read back counting :data:`MEMORY_COST`.

    With ``W = patch * c_out`` weights, ``P`` output positions and ``N`` examples, the per-example route forms
    ``T N W`` numbers at ``P`` multiply-adds each, twice when they exceed :data:`EXAMPLE_CHUNK_BYTES` (they are
    formed again for the contributions), and needs no per-task backward; the kernel route runs the per-task
    backward and one forward convolution (``2 T N P W``), writes only ``T W`` numbers, and forms each example's
    ``P x P`` kernel (``N P^2 (patch + T c_out)``). Small images through wide layers (the last stages of a
    ResNet) take the kernel; large images through narrow layers the per-example gradients.

    >>> kernel_is_cheaper(examples=32, positions=64, patch=576, c_out=128, tasks=4, item_bytes=4)
    False
    >>> kernel_is_cheaper(examples=4, positions=4, patch=4608, c_out=512, tasks=4, item_bytes=4)
    True
    """
    W = patch * c_out
    formed = 1 if examples * tasks * W * item_bytes <= EXAMPLE_CHUNK_BYTES else 2
    per_example = formed * tasks * examples * W * (positions + MEMORY_COST)
    kernel = 2 * tasks * examples * positions * W + tasks * W * MEMORY_COST
    kernel += examples * positions**2 * (patch + tasks * c_out)
    return kernel < per_example


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

    def attribute(
        self, module: _ConvNd, calls: Sequence[Call], names: set[str], dtype: torch.dtype,
        total: dict[str, Tensor] | None = None, scratch: Scratch | None = None,
    ) -> LayerAttribution:
        """Each example's part in the layer's Gram: the weight's through its per-example gradients
        (:meth:`_weight_attribution`) or, where :func:`kernel_is_cheaper` says so, through each example's patch
        kernel (:meth:`_kernel_weight_attribution`); the bias's per-example gradients are ``D`` summed over the
        output positions. With ``total`` (the per-task gradients to take the contributions against: across
        processes, the global ones), the Gram is theirs."""
        against = {name: t.to(dtype) for name, t in (total or {}).items()}
        parts = []
        if "weight" in names:
            T, N, _, *positions = calls[0].output_grads.shape
            patch = module.in_channels // module.groups * math.prod(module.kernel_size)
            kernel = len(calls) == 1 and kernel_is_cheaper(
                N, math.prod(positions), patch, module.out_channels, T, torch.finfo(dtype).bits // 8
            )
            if kernel:
                parts.append(self._kernel_weight_attribution(module, calls, dtype, against.get("weight")))
            else:
                parts.append(self._weight_attribution(module, calls, dtype, against.get("weight"), scratch))
        if "bias" in names:
            bias = [call.output_grads.to(dtype).flatten(3).sum(3) for call in calls]  # [T, N, C_out] each
            parts.append(attribution_of(sum(bias[1:], bias[0]), total=against.get("bias")))
        first, *rest = parts  # the blocks of the weight and the bias add up
        return sum(rest, first)

    def _weight_attribution(
        self, module: _ConvNd, calls: Sequence[Call], dtype: torch.dtype, against: Tensor | None,
        scratch: Scratch | None = None,
    ) -> LayerAttribution:
        """The weight's attribution from each example's weight gradients ``J_n = D_n U_n^T`` (``U_n`` its input
        patches, ``D_n`` its output gradients, per group; the T tasks' ``D_n`` stacked into one product: on 2 CPU
        threads a quarter faster than a product per example over the tasks, reading ``D`` in place), by
        :func:`per_example_attribution` (in ``scratch``): their sum over the examples is the per-task weight
        gradient, so no separate convolution backward runs. Against ``against`` (``[T, *weight.shape]``) when
        given."""
        g, (T, N) = module.groups, calls[0].output_grads.shape[:2]
        patch = module.in_channels // g * math.prod(module.kernel_size)

        def rows(a: int, b: int, out: Tensor) -> Tensor:
            """Into ``out`` (``[g, b - a, T, w]``): the weight gradients of examples ``a:b``, per group and task,
            in one batched product over the examples and groups, each stacking its T tasks' output gradients."""
            J = out.view(g * (b - a), -1, patch)  # [(g n), (t c), patch]
            for k, call in enumerate(calls):
                grads = call.output_grads[:, a:b].to(dtype)
                D = grads.new_empty(grads.numel()) if scratch is None else scratch.take(grads.numel(), grads, 1)
                D = D.view(g * (b - a), T * grads.shape[2] // g, -1)  # [(g n), (t c), P], filled in place
                D.view(g, b - a, T, -1, D.shape[-1]).copy_(rearrange(grads, "t n (g c) ... -> g n t c (...)", g=g))
                U = _patches(module, call.saved[a:b].to(dtype)).flatten(0, 1).transpose(1, 2)
                if k == 0:
                    torch.bmm(D, U, out=J)
                else:
                    J.baddbmm_(D, U)
            return out

        return per_example_attribution(
            rows, N, T, module.weight.numel() // g, calls[0].output_grads.new_empty((), dtype=dtype),
            None if against is None else rearrange(against, "t (g c) ... -> g t (c ...)", g=g), g, scratch,
        )

    def _kernel_weight_attribution(
        self, module: _ConvNd, calls: Sequence[Call], dtype: torch.dtype, against: Tensor | None
    ) -> LayerAttribution:
        """The weight's attribution without per-example weight gradients: ``G`` from the per-task convolution
        backward; ``<J_i^(n), G_j>`` as ``sum D_i * conv(x_n, G_j)`` over example ``n``'s output positions (one
        forward convolution with the T tasks' gradients as its kernels); ``<J_i^(n), J_j^(n)>`` as
        ``sum_pq K_n[p, q] <D_i[n, :, p], D_j[n, :, q]>`` through each example's patch kernel ``K_n = U_n^T U_n``."""
        g, (call,) = module.groups, calls  # one call: the kernel of a reused layer would need its calls' cross terms
        G = (  # [T, C_out, C_in / g, *kernel]
            self.per_task(module, calls, {"weight"}, dtype)["weight"] if against is None else against
        )
        T = G.shape[0]
        x, padding = _padded_input(module, call.saved.to(dtype))
        D = rearrange(call.output_grads.to(dtype), "t n (g c) ... -> g n t (c ...)", g=g)
        stacked = rearrange(G, "t (g c) ... -> (g t c) ...", g=g)
        H = torch.convolution(x, stacked, None, module.stride, padding, module.dilation, False, [0] * len(padding), g)
        contribution = (D @ rearrange(H, "n (g t c) ... -> g n (c ...) t", g=g, t=T)).sum(0)
        U = _patches(module, call.saved.to(dtype))  # [g, N, C_in / g * K, P]
        K = U.transpose(-1, -2) @ U  # [g, N, P, P]
        Dp = D.unflatten(-1, (-1, K.shape[-1]))  # [g, N, T, c, P]
        KD = (Dp.flatten(2, 3) @ K).reshape(Dp.shape)
        within = (Dp.flatten(3) @ KD.flatten(3).transpose(-1, -2)).sum(0)
        return LayerAttribution(gram_of(G.flatten(1)), contribution, within, "materialised")

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
