"""Sinks: where each measured step goes as soon as it is collected, besides the in-memory history.

Pass any number of them to the monitor, ``ConflictMonitor(model, sinks=[JSONLSink("run.jsonl"),
TensorBoardSink("runs/exp1")])``. The history hands every collected step to each sink as a report on the host
(on a GPU, only once its asynchronous copy has landed), so a sink never makes the training step wait for the
device. A sink that raises is dropped with one warning; training goes on.

- :class:`JSONLSink`: one JSON line per step, every Gram included (what ``gradconflict report`` reads); no
  dependency.
- :class:`CSVSink`: one row per step, the scalars below; no dependency.
- :class:`TensorBoardSink`: ``SummaryWriter.add_scalar`` under ``conflict/...`` tags, and a cosine heat-map
  image every so many steps (needs ``tensorboard``).
- :class:`WandbSink`: ``run.log(..., step=)`` under ``conflict/...`` keys, and the heat-map image (needs
  ``wandb``).

A sink is any object with ``write(report)`` and ``close()`` (:class:`gradconflict.history.Sink`).
:func:`~gradconflict.sinks.scalars.scalars` gives the flat ``{key: float}`` of one step that the last three log.

>>> from gradconflict.sinks import CSVSink, JSONLSink, TensorBoardSink, WandbSink, scalars
"""

from __future__ import annotations

from gradconflict.sinks.csv_sink import CSVSink
from gradconflict.sinks.jsonl import JSONLSink
from gradconflict.sinks.scalars import pair_key, scalars
from gradconflict.sinks.tensorboard_sink import TensorBoardSink
from gradconflict.sinks.wandb_sink import WandbSink

__all__ = ["CSVSink", "JSONLSink", "TensorBoardSink", "WandbSink", "pair_key", "scalars"]
