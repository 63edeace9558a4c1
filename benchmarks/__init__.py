"""Hot-path benchmark suite of gradconflict: ``python -m benchmarks.run --help``.

``python -m benchmarks.run`` puts the current directory first on ``sys.path``. Run from a checkout (or a git
worktree) whose own ``gradconflict/`` folder is not the installed package, that copy would shadow the
installed one; but the benchmark measures the *installed* gradconflict (e.g. ``pip install -e`` of the tree
being optimised). So, on import, gradconflict is imported once with the checkout root left out of
``sys.path`` (then ``sys.path`` is restored as it was); if it is not installed, the local copy is used. The
path of the gradconflict measured is printed in every report.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _prefer_installed_gradconflict() -> None:
    if "gradconflict" in sys.modules:
        return
    saved = sys.path[:]
    kept = [p for p in saved if Path(p or ".").resolve() != _ROOT]
    if len(kept) == len(saved):
        return
    try:
        sys.path[:] = kept
        importlib.invalidate_caches()
        if importlib.util.find_spec("gradconflict") is not None:
            importlib.import_module("gradconflict")
    finally:
        sys.path[:] = saved


_prefer_installed_gradconflict()
