"""All monitoring YAML passes yamllint --strict with the repository's .yamllint (as `make lint` runs it)."""

from __future__ import annotations

import subprocess
import sys

from mon_helpers import MONITORING, REPO


def test_yamllint_strict() -> None:
    files = sorted(str(p) for ext in ("*.yml", "*.yaml") for p in MONITORING.rglob(ext))
    assert files
    # no -c/-d: yamllint reads .yamllint from the working directory (its defaults if there is none)
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
