"""PCGrad: project each task gradient off the gradients it conflicts with (native: works without TorchJD).

>>> import torch
>>> PCGrad(seed=0)(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), {"a": 1.0, "b": 1.0})  # opposite: 2 g_a + 2 g_b = 0
tensor([2., 2.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradconflict.weighting.base import Weighting

__all__ = ["PCGrad"]


class PCGrad(Weighting):
    """Projecting conflicting gradients ("gradient surgery").

    Source: T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman and C. Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020, Algorithm 1: each task's gradient ``g_i^PC`` starts as ``g_i``; then, for the other
    tasks ``j`` in a random order (drawn anew for each ``i``), whenever ``<g_i^PC, g_j> < 0``, its component along
    ``g_j`` is removed: ``g_i^PC -= <g_i^PC, g_j> / |g_j|^2 g_j``. The update is ``sum_i g_i^PC``. Every projection
    is a function of the Gram, so the weights follow from it exactly (``g_i^PC = sum_k W_ik g_k``; the update's
    weights are ``W``'s column sums).

    Without conflict the weights are all 1 (the plain sum). With three or more tasks the result depends on the
    random order; it is drawn from this object's own generator, seeded by ``seed`` (the global random state is
    never used), and :meth:`state_dict` carries the generator so that a resumed run draws the same orders.

    Args:
        seed: seed of the random task orders.

    >>> import torch
    >>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])          # cosine -0.5: each loses its part along the other
    >>> PCGrad()(G, {"a": 0.0, "b": 0.0})
    tensor([1.5000, 1.5000], dtype=torch.float64)
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def weights(self, gram: Tensor, losses: Mapping[str, float]) -> np.ndarray:
        G = gram.numpy()
        T = len(G)
        total = np.zeros(T)
        for i in range(T):
            projected = np.zeros(T)  # g_i^PC as weights of the task gradients
            projected[i] = 1.0
            for j in torch.randperm(T, generator=self._generator).tolist():
                if j == i:
                    continue
                dot = G[j] @ projected  # <g_i^PC, g_j>; exactly 0 for a zero gradient g_j, never projected on
                if dot < 0:
                    projected[j] -= dot / G[j, j]
            total += projected
        return total

    def state_dict(self) -> dict[str, Any]:
        """The seed and the generator's state."""
        return {"seed": self.seed, "generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the random orders where :meth:`state_dict` left them."""
        self.seed = int(state["seed"])
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"PCGrad(seed={self.seed})"
