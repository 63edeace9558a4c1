"""A monitor's state for a resumed run: what it holds, and loading it all or nothing.

Every field is checked before any is applied (the history by loading it into a scratch history first), so a
malformed or foreign state raises a ``ValueError`` that names the field and leaves the monitor as it was.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradconflict.measure.engine import Engine
from gradconflict.measure.shared import SharedParameters
from gradconflict.records.history import History
from gradconflict.weighting import StepWeights

__all__ = ["STATE_SCHEMA", "MonitorState"]

#: Version of :meth:`ConflictMonitor.state_dict`.
STATE_SCHEMA = 1


def _field_error(name: str, what: str) -> ValueError:
    return ValueError(f"ConflictMonitor state field {name!r}: {what}")


@dataclass
class MonitorState:
    """The parts of a monitor that a state saves and restores."""

    shared: SharedParameters
    history: History
    weighting: StepWeights
    engine: Engine

    def save(self, step: int, shared: list[str]) -> dict[str, Any]:
        """The state: plain Python values and CPU tensors."""
        return {
            "schema": STATE_SCHEMA,
            "step": step,
            "shared": shared,
            "history": self.history.state_dict(),
            "weighting": self.weighting.state_dict(),
            "strategy_choices": self.engine.state_dict(),
        }

    def load(self, state: Mapping[str, Any]) -> int:
        """Check every field of ``state``, then restore them all; returns the step count."""
        if not isinstance(state, Mapping):
            raise ValueError(f"a ConflictMonitor state is a dict (from state_dict()), got a {type(state).__name__}")
        if state.get("schema") != STATE_SCHEMA:
            raise ValueError(f"not a ConflictMonitor state (schema {state.get('schema')!r}, expected {STATE_SCHEMA})")
        for name in ("step", "shared", "history"):
            if name not in state:
                raise _field_error(name, "missing")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise _field_error("step", f"must be a non-negative integer, got {step!r}")
        shared = state["shared"]
        if not isinstance(shared, (list, tuple)) or not all(isinstance(n, str) for n in shared):
            raise _field_error("shared", f"must be a list of parameter names, got {shared!r:.80}")
        params = {n for n, _ in self.shared.model.named_parameters()}
        missing = [n for n in shared if n not in params]
        if missing:
            raise _field_error("shared", f"the saved shared parameters {missing[:5]} are not parameters of this model")
        weighting = state.get("weighting", {})
        _check_weighting(weighting)
        choices = state.get("strategy_choices", [])
        if not isinstance(choices, list):
            raise _field_error("strategy_choices", f"must be a list, got a {type(choices).__name__}")
        scratch = History()
        try:
            scratch.load_state_dict(state["history"])
        except Exception as err:
            raise _field_error("history", f"{type(err).__name__}: {err}") from err
        finally:
            scratch.close()
        try:  # the engine loads all or nothing: the first change made
            self.engine.load_state_dict(choices)
        except Exception as err:
            raise _field_error("strategy_choices", f"{type(err).__name__}: {err}") from err
        self.shared.load(list(shared))
        self.history.load_state_dict(state["history"])
        self.weighting.load_state_dict(weighting)
        return int(step)


def _check_weighting(weighting: object) -> None:
    if not isinstance(weighting, Mapping):
        raise _field_error("weighting", f"must be a dict, got a {type(weighting).__name__}")
    method = weighting.get("method")
    if method is not None and not isinstance(method, str):
        raise _field_error("weighting", f"its 'method' must be a name or None, got {method!r}")
    if not isinstance(weighting.get("state", {}), Mapping):
        raise _field_error("weighting", "its 'state' must be a dict")
    last = weighting.get("last", {})
    if not isinstance(last, Mapping) or not all(
        isinstance(k, str) and isinstance(v, numbers.Real) for k, v in last.items()
    ):
        raise _field_error("weighting", "its 'last' must map task names to numbers")
