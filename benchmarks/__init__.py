"""Hot-path benchmark suite of gradconflict: ``python -m benchmarks.run --help``.

``python -m benchmarks.run`` puts the current directory first on ``sys.path``; run from a checkout (or a git
worktree) that holds its own ``gradconflict/`` folder, that copy would shadow the installed package. The
benchmark measures the *installed* gradconflict (e.g. ``pip install -e`` of the tree being optimised), so the
checkout root is dropped from ``sys.path`` when another gradconflict is importable without it; otherwise the
local copy is used. The path of the gradconflict measured is printed in every report.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _drop_local_checkout() -> None:
    if "gradconflict" in sys.modules:
        return
    kept = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
    if len(kept) == len(sys.path):
        return
    saved = sys.path[:]
    sys.path[:] = kept
    importlib.invalidate_caches()
    if importlib.util.find_spec("gradconflict") is None:
        sys.path[:] = saved


_drop_local_checkout()
