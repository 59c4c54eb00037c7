"""Make the exporter importable from the source tree even before `pip install -e .`."""

from __future__ import annotations

import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[2] / "monitoring" / "exporters"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))
