"""The monitor: the one object a training loop talks to, a short facade over the measuring core and the run's records.

Floor 4 of the package. :class:`ConflictMonitor` validates its options, measures a step with an engine of
:mod:`gradconflict.measure`, lets autograd write ``.grad`` (weighted as :mod:`gradconflict.weighting` says),
and hands the report to the history and its sinks (:mod:`gradconflict.records`).

>>> from gradconflict.monitor import ConflictMonitor, DetachedTaskWarning, MeasurementWarning
"""

from __future__ import annotations

from gradconflict.monitor._monitor import ConflictMonitor, DetachedTaskWarning, MeasurementWarning

__all__ = ["ConflictMonitor", "DetachedTaskWarning", "MeasurementWarning"]
