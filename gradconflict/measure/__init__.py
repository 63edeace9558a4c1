"""The measuring core: what one training step's task gradients are, layer by layer, and nothing more.

Floor 1 of the package (see the README's layout section). It reads the user's model and losses and returns a
:class:`~gradconflict.measure.report.ConflictReport`; it imports nothing from the floors above it.

- :mod:`~gradconflict.measure.capture`, :mod:`~gradconflict.measure.graph`,
  :mod:`~gradconflict.measure.checkpoint`, :mod:`~gradconflict.measure.shared`: which modules are tapped, which
  parameters are shared, how the autograd graph and activation checkpoints are walked;
- :mod:`~gradconflict.measure.rules`: one per-layer Gram rule per module type (a registry);
- :mod:`~gradconflict.measure.engine`: the engines that produce the per-layer Grams of one step;
- :mod:`~gradconflict.measure.distributed`, :mod:`~gradconflict.measure.fsdp`: the Gram across processes;
- :mod:`~gradconflict.measure.metrics`: every reported quantity as a pure function of the Gram;
- :mod:`~gradconflict.measure.report`: the per-step report;
- :mod:`~gradconflict.measure.tasks`: task losses keyed by name.

>>> import torch
>>> from gradconflict.measure import metrics
>>> round(float(metrics.cancellation(torch.eye(2))), 4)      # two orthogonal gradients lose 29% of their length
0.2929
"""
