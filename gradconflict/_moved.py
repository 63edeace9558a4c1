"""Module paths of release 0.1.0 that moved in the re-layout, kept importable with a ``DeprecationWarning``.

``import gradconflict.history`` (old) loads :mod:`gradconflict.records.history` (new) under both names, so
objects stay identical whichever path a user's code took. Only paths listed here are served; each will go in a
later release.

>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     import gradconflict.history as old
>>> import gradconflict.records.history as new
>>> old is new, caught[0].category.__name__
(True, 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

#: old module path -> new module path.
MOVED: dict[str, str] = {
    **{
        f"gradconflict.{name}": f"gradconflict.measure.{name}"
        for name in ("capture", "checkpoint", "distributed", "fsdp", "graph", "metrics", "report", "shared", "tasks")
    },
    **{
        f"gradconflict.engine{sub}": f"gradconflict.measure.engine{sub}"
        for sub in ("", ".base", ".loop", ".representation", ".segments", ".tapped")
    },
    **{
        f"gradconflict.rules{sub}": f"gradconflict.measure.rules{sub}"
        for sub in ("", ".base", ".conv", ".embedding", ".linear", ".norm")
    },
    "gradconflict.strict_json": "gradconflict._strict_json",
    "gradconflict.history": "gradconflict.records.history",
    "gradconflict.sinks": "gradconflict.records.sinks",
    "gradconflict.sinks.jsonl": "gradconflict.records.sinks.jsonl",
    "gradconflict.sinks.csv_sink": "gradconflict.records.sinks.csv_sink",
    "gradconflict.sinks.scalars": "gradconflict.records.sinks.scalars",
    "gradconflict.sinks.tensorboard_sink": "gradconflict.integrations.tensorboard",
    "gradconflict.sinks.wandb_sink": "gradconflict.integrations.wandb",
    "gradconflict.sinks.images": "gradconflict.integrations.images",
    "gradconflict.split.measures": "gradconflict.records.measures",
    "gradconflict.split.result": "gradconflict.records.comparison",
    "gradconflict.run_summary": "gradconflict.reporting.summary",
    "gradconflict.plots": "gradconflict.reporting.plots",
    "gradconflict.html_report": "gradconflict.reporting.html",
    "gradconflict.diagnosis.stats": "gradconflict.diagnosis.persistence",
    "gradconflict.cli": "gradconflict.apps.cli",
    "gradconflict.demo": "gradconflict.apps.demo",
    "gradconflict.synthetic": "gradconflict.fixtures.synthetic",
    "gradconflict.datasets": "gradconflict.fixtures.datasets",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves each old path of :data:`MOVED` as the module at its new path."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in gradconflict 0.2; import it from there (the old path goes in a later "
            "release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        # The module is the new one, already executed: register it under the old name as well.
        pass


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import gradconflict`` does)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
