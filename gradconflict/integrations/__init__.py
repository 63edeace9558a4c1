"""The monitor inside the training stacks people already use, each driven through its own extension points.

- :mod:`gradconflict.integrations.lightning`: PyTorch Lightning 2.x, a ``LightningModule`` mixin and a
  ``Callback`` (``pip install "gradconflict[lightning]"``).
- :mod:`gradconflict.integrations.huggingface`: a Hugging Face ``transformers.Trainer`` subclass
  (``pip install "gradconflict[transformers]"``).

Neither framework hands a callback the individual task losses, so both take them from a field of what the
training step returns (``"task_losses"`` by default), measure the step with a
:class:`~gradconflict.ConflictMonitor`, and let the framework's own backward write ``.grad``: its loss
scaling, accumulation and distributed reduction are untouched. Importing this package imports neither
framework; each module imports its own.

>>> from gradconflict.integrations import FrameworkMonitor, report_scalars
"""

from __future__ import annotations

from gradconflict.integrations.base import FrameworkMonitor
from gradconflict.integrations.scalars import report_scalars

__all__ = ["FrameworkMonitor", "report_scalars"]
