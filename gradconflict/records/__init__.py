"""The run's records: what was measured, kept in memory and written to disk, in structured form.

Floor 3 of the package. :class:`~gradconflict.records.history.History` keeps the measured steps (packed, with
typed accessors), :mod:`~gradconflict.records.pairs` names task pairs, :mod:`~gradconflict.records.sinks`
writes each step as it happens, and :mod:`~gradconflict.records.comparison` with
:mod:`~gradconflict.records.measures` holds the outcome of a comparison experiment (Delta-m, smoothness,
ceilings), judged by :mod:`~gradconflict.records.gains` (the gain test). The diagnosis reads these records and
nothing else.

>>> from gradconflict.records import History, JSONLSink
"""

from __future__ import annotations

from gradconflict.records.history import History, Sink
from gradconflict.records.sinks import JSONLSink

__all__ = ["History", "JSONLSink", "Sink"]
