"""FSDP2 (``torch.distributed.fsdp.fully_shard``): which tensor the autograd graph holds for each parameter.

A sharded module registers one sharded parameter (a DTensor) per parameter, but its forward runs on an unsharded
copy, and that copy is the leaf the autograd graph holds (and, for modules that stay unsharded after the forward,
what the module registers between forward and backward). The monitor names, discovers and measures parameters by
their sharded parameter; this module maps each unsharded copy to it. The per-task gradients the engine
materialises are then those of the full (unsharded) parameter, on each rank, for its own batch: with
``sync="exact"`` or ``"sketch"`` they are combined across ranks like DDP's.

>>> import torch.nn as nn
>>> unsharded_copies(nn.Linear(2, 2))   # a model that is not sharded has none
{}
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["unsharded_copies"]


def unsharded_copies(model: nn.Module) -> dict[int, tuple[nn.Parameter, Tensor]]:
    """``id(unsharded copy) -> (sharded parameter, unsharded copy)`` for every parameter of an FSDP2 module of
    ``model`` whose copy exists (it is created at the first forward)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return {}
    copies: dict[int, tuple[nn.Parameter, Tensor]] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else ():
            copy = getattr(fsdp_param, "_unsharded_param", None)
            if copy is not None:
                copies[id(copy)] = (fsdp_param.sharded_param, copy)
    return copies
