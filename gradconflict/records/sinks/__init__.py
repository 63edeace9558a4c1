"""Sinks: where each measured step goes as soon as it is collected, besides the in-memory history.

Pass any number of them to the monitor, ``ConflictMonitor(model, sinks=[JSONLSink("run.jsonl"),
CSVSink("run.csv")])``. The history hands every collected step to each sink as a report on the host
(on a GPU, only once its asynchronous copy has landed), so a sink never makes the training step wait for the
device. A sink that raises is dropped with one warning; training goes on.

- :class:`JSONLSink`: one JSON line per step, every Gram included (what ``gradconflict report`` reads), and
  beside it the packed file (:mod:`~gradconflict.records.sinks.packed`) that reads a long run back fast; no
  dependency.
- :class:`CSVSink`: one row per step, the scalars below; no dependency.

A sink is any object with ``write(report)`` and ``close()`` (:class:`gradconflict.records.history.Sink`).
:func:`~gradconflict.records.sinks.scalars.scalars` gives the flat ``{key: float}`` of one step that the CSV
sink and the dashboard sinks log. The dashboard sinks (TensorBoard, W&B) draw heat-map images, so they live
with the integrations: :mod:`gradconflict.integrations.tensorboard` and
:mod:`gradconflict.integrations.wandb`.

>>> from gradconflict.records.sinks import CSVSink, JSONLSink, scalars
"""

from __future__ import annotations

from gradconflict.records.sinks.csv_sink import CSVSink
from gradconflict.records.sinks.jsonl import JSONLSink
from gradconflict.records.sinks.scalars import pair_key, scalars

__all__ = ["CSVSink", "JSONLSink", "pair_key", "scalars"]
