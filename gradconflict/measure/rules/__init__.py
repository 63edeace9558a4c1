"""Per-layer rules: how one module type turns its recorded inputs and per-task output gradients into its
per-task Gram, without materialising the per-task weight gradients when it can avoid it.

A rule is registered for a module type with :func:`register_rule`; :func:`rule_for` finds the rule of a module
(following the class hierarchy, so a subclass of ``nn.Linear`` uses the Linear rule). A parameter that no rule
covers, or that is also used outside its module's forward (weight tying, direct use), is handled by the
engine's generic route, which materialises its T gradients and drops them after taking their Gram. Adding a
layer type is one small file that subclasses :class:`LayerRule` and registers it.

>>> import torch.nn as nn
>>> type(rule_for(nn.Linear(2, 3))).__name__
'LinearRule'
>>> rule_for(nn.ReLU()) is None
True
"""

from __future__ import annotations

from gradconflict.measure.rules import conv, embedding, linear, norm  # noqa: E402,F401  (register the built-in rules)
from gradconflict.measure.rules.base import (
    Call,
    LayerGram,
    LayerRule,
    gram_of,
    materialised_gram,
    register_rule,
    rule_for,
)

__all__ = ["Call", "LayerGram", "LayerRule", "gram_of", "materialised_gram", "register_rule", "rule_for"]
