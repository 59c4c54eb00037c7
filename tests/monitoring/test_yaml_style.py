"""All monitoring YAML passes yamllint's default rules, strictly (2-space indent, `---`, 80 columns)."""

from __future__ import annotations

import subprocess
import sys

from mon_helpers import MONITORING, REPO


def test_yamllint_default_strict() -> None:
    files = sorted(str(p) for ext in ("*.yml", "*.yaml") for p in MONITORING.rglob(ext))
    assert files
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-d", "default", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
