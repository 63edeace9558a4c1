"""Affine normalisation layers (LayerNorm, GroupNorm, BatchNorm, RMSNorm): ``y = x_hat * weight + bias``, so
task ``i``'s gradients are ``sum D_i * x_hat`` and ``sum D_i`` over every axis but the parameter's. They are
small, so they are materialised."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradconflict.measure.rules.base import Call, LayerRule, M, register_rule


class AffineNormRule(LayerRule[M]):
    """Shared logic; subclasses say how to normalise and where the parameter's axes are."""

    param_names: tuple[str, ...] = ("weight", "bias")

    def normalise(self, module: M, saved: Any, x: Tensor) -> Tensor:
        """``x_hat``: the input normalised exactly as the module's forward did, without the affine part."""
        raise NotImplementedError

    def param_axes(self, module: M, ndim: int) -> tuple[int, ...]:
        """Axes of the output that the parameter spans (the others are summed over)."""
        return (1,)

    def input_of(self, saved: Any) -> Tensor:
        """The recorded input within what :meth:`save` kept."""
        return saved

    def per_task(
        self, module: M, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        return self._summed(module, calls, names, dtype, by_example=False)

    def per_example(
        self, module: M, calls: Sequence[Call], names: set[str], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        return self._summed(module, calls, names, dtype, by_example=True)

    def _summed(
        self, module: M, calls: Sequence[Call], names: set[str], dtype: torch.dtype, by_example: bool
    ) -> dict[str, Tensor]:
        """``D_i * x_hat`` and ``D_i`` summed over every axis but the parameter's (and, ``by_example``, dim 0)."""
        out: dict[str, Tensor] = {}
        for call in calls:
            D = call.output_grads.to(dtype)
            x = self.input_of(call.saved).to(dtype)
            keep = (0, *self.param_axes(module, x.ndim)) if by_example else self.param_axes(module, x.ndim)
            summed = tuple(a + 1 for a in range(x.ndim) if a not in keep)
            parts = {}
            if "weight" in names:
                x_hat = self.normalise(module, call.saved, x)
                if by_example:  # a task at a time: a product of one task's size, in memory reused from task to task
                    parts["weight"] = torch.stack([_sum(d * x_hat, tuple(a - 1 for a in summed)) for d in D])
                else:
                    parts["weight"] = _sum(D * x_hat, summed)
            if "bias" in names:
                parts["bias"] = _sum(D, summed)
            for name, g in parts.items():
                out[name] = out[name] + g if name in out else g
        return out


@register_rule(nn.LayerNorm)
class LayerNormRule(AffineNormRule[nn.LayerNorm]):
    """``nn.LayerNorm``: the parameters span the trailing ``normalized_shape`` axes."""

    def normalise(self, module: nn.LayerNorm, saved: Any, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def param_axes(self, module: nn.LayerNorm, ndim: int) -> tuple[int, ...]:
        return _trailing(module.normalized_shape, ndim)


@register_rule(nn.RMSNorm)
class RMSNormRule(AffineNormRule[nn.RMSNorm]):
    """``nn.RMSNorm``: like LayerNorm, without centring and without a bias."""

    param_names: tuple[str, ...] = ("weight",)

    def normalise(self, module: nn.RMSNorm, saved: Any, x: Tensor) -> Tensor:
        return F.rms_norm(x, module.normalized_shape, None, module.eps)

    def param_axes(self, module: nn.RMSNorm, ndim: int) -> tuple[int, ...]:
        return _trailing(module.normalized_shape, ndim)


def _sum(t: Tensor, axes: tuple[int, ...]) -> Tensor:
    """``t`` summed over ``axes``; ``t`` itself when there are none (``Tensor.sum(())`` would sum over every axis:
    an example's gradient of a norm over a ``[N, C]`` input is its own row).

    >>> _sum(torch.ones(2, 3), ()).shape, _sum(torch.ones(2, 3), (1,)).tolist()
    (torch.Size([2, 3]), [3.0, 3.0])
    """
    return t.sum(axes) if axes else t


def _trailing(normalized_shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    """The trailing axes a LayerNorm's or an RMSNorm's parameters span."""
    return tuple(range(ndim - len(normalized_shape), ndim))


@register_rule(nn.GroupNorm)
class GroupNormRule(AffineNormRule[nn.GroupNorm]):
    """``nn.GroupNorm``: per-channel parameters (axis 1)."""

    def normalise(self, module: nn.GroupNorm, saved: Any, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(AffineNormRule[nn.modules.batchnorm._BatchNorm]):
    """``nn.BatchNorm1d/2d/3d``: batch statistics or running statistics, whichever the forward used.

    The choice depends on the module's mode and its running statistics *at forward time*, so :meth:`save`
    records them: a model switched to ``eval()`` before the backward, or a later forward that updates the
    running statistics, does not change the result.
    """

    def accepts(self, module: nn.modules.batchnorm._BatchNorm) -> bool:
        # SyncBatchNorm normalises with statistics gathered across processes: leave it to autograd.
        return not isinstance(module, nn.SyncBatchNorm)

    def save(
        self, module: nn.modules.batchnorm._BatchNorm, input: Tensor, output: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        if module.training or module.running_mean is None or module.running_var is None:
            return input.detach(), None
        return input.detach(), (module.running_mean.detach().clone(), module.running_var.detach().clone())

    def input_of(self, saved: Any) -> Tensor:
        return saved[0]

    def normalise(self, module: nn.modules.batchnorm._BatchNorm, saved: Any, x: Tensor) -> Tensor:
        stats = saved[1]
        if stats is None:
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        mean, var = stats
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), None, None, False, 0.0, module.eps)
