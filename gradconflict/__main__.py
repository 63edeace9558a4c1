"""``python -m gradconflict``: the same as the ``gradconflict`` command."""

from __future__ import annotations

import sys

from gradconflict.apps.cli import main

sys.exit(main())
