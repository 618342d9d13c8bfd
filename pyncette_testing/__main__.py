"""``python -m pyncette_testing``: the same as ``pyncette-sim``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
