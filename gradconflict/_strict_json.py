"""Plain Python values ready for strict JSON: every number that is not finite (NaN for a pair never measured
together, inf for dependent gradients) becomes ``None``, and tensors become nested lists of floats.

>>> import math, torch
>>> strict({"a": [1.0, math.nan], "b": torch.tensor([math.inf, 2.0])})
{'a': [1.0, None], 'b': [None, 2.0]}
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = ["strict"]


def strict(value: Any) -> Any:
    """``value`` with tensors turned into Python floats and every non-finite float into ``None``, through dicts,
    lists and tuples (tuples become lists)."""
    if isinstance(value, Tensor):
        value = value.detach().double().cpu().tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value
