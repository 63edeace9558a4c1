"""Affine normalisation layers (LayerNorm, GroupNorm, BatchNorm, RMSNorm): ``y = x_hat * weight + bias``, so
task ``i``'s gradients are ``sum D_i * x_hat`` and ``sum D_i`` over every axis but the parameter's. They are
small, so they are materialised."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradconflict.rules.base import Call, LayerGrads, LayerRule, gram_of, register_rule, weighted


class AffineNormRule(LayerRule):
    """Shared logic; subclasses say how to normalise and where the parameter's axes are."""

    param_names = ("weight", "bias")

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x_hat``: the input normalised exactly as the module's forward did, without the affine part."""
        raise NotImplementedError

    def param_axes(self, module: nn.Module, ndim: int) -> tuple[int, ...]:
        """Axes of the output that the parameter spans (the others are summed over)."""
        return (1,)

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
        for call in calls:
            D = call.grads.to(gram_dtype)
            keep = self.param_axes(module, call.saved.ndim)
            summed = tuple(a + 1 for a in range(call.saved.ndim) if a not in keep)
            parts = {}
            if "weight" in covered:
                x_hat = self.normalise(module, call.saved.to(gram_dtype))
                parts["weight"] = (D * x_hat).sum(summed)
            if "bias" in covered:
                parts["bias"] = D.sum(summed)
            for name, g in parts.items():
                per_task[name] = per_task[name] + g if name in per_task else g
        grads = {n: weighted(weights.to(g.dtype), g).to(getattr(module, n).dtype) for n, g in per_task.items()}
        if not shared:
            return LayerGrads(None, grads, "bookkeeping")
        flat = torch.cat([per_task[n].flatten(1) for n in sorted(shared)], dim=1)
        return LayerGrads(gram_of(flat), grads, "materialised")


@register_rule(nn.LayerNorm)
class LayerNormRule(AffineNormRule):
    """``nn.LayerNorm``: the parameters span the trailing ``normalized_shape`` axes."""

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    def param_axes(self, module: nn.Module, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim - len(module.normalized_shape), ndim))


@register_rule(nn.RMSNorm)
class RMSNormRule(LayerNormRule):
    """``nn.RMSNorm``: like LayerNorm, without centring and without a bias."""

    param_names = ("weight",)

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(AffineNormRule):
    """``nn.GroupNorm``: per-channel parameters (axis 1)."""

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register_rule(nn.modules.batchnorm._BatchNorm)
class BatchNormRule(AffineNormRule):
    """``nn.BatchNorm1d/2d/3d``: batch statistics in training mode, running statistics in eval mode."""

    def accepts(self, module: nn.Module) -> bool:
        # SyncBatchNorm normalises with statistics gathered across processes: leave it to autograd.
        return not isinstance(module, nn.SyncBatchNorm)

    def normalise(self, module: nn.Module, x: Tensor) -> Tensor:
        batch_stats = module.training or module.running_mean is None
        if batch_stats:
            return F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        return F.batch_norm(
            x, module.running_mean.to(x.dtype), module.running_var.to(x.dtype), None, None, False, 0.0, module.eps
        )
