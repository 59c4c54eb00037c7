"""Replaying recorded Slurm output (tests/monitoring/data/slurm) to the real labkit-slurm-exporter.

``replay_bin_dir`` writes one small script per Slurm binary (sinfo, squeue, ...) that checks it was
called with the recorded command line, prints the recorded stdout and stderr and exits with the
recorded code. The exporter runs them through its own subprocess code (``--slurm-bin-dir``), so
everything from running a command to parsing its answer is the real code.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import requests
from mon_helpers import exporter_env, free_port, running, wait_for

SLURM_DATA = Path(__file__).resolve().parent / "data" / "slurm"
SCENARIOS = ("busy", "dbd-down", "controller-down")
BINARIES = ("sinfo", "squeue", "sdiag", "sshare", "scontrol", "sacctmgr")

_SCRIPT = """#!/bin/bash
expected=$(cat {argv})
actual=$(printf '%s\\n' "$(basename "$0")" "$@")
if [ "$expected" != "$actual" ]; then
    echo "replay: called as [$actual], recorded as [$expected]" >&2
    exit 99
fi
cat {stdout}
cat {stderr} >&2
exit "$(cat {rc})"
"""


def replay_bin_dir(dest: Path, scenario: str, override: Mapping[str, str] | None = None) -> Path:
    """A directory of the six binaries replaying ``scenario``; ``override`` maps a binary to a script body."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in BINARIES:
        rec = SLURM_DATA / scenario / name
        body = (override or {}).get(name) or _SCRIPT.format(
            **{part: shlex.quote(f"{rec}.{part}") for part in ("argv", "stdout", "stderr", "rc")}
        )
        script = dest / name
        script.write_text(body if body.startswith("#!") else "#!/bin/bash\n" + body)
        script.chmod(0o755)
    return dest


@contextmanager
def slurm_exporter(bin_dir: Path, log: Path, timeout: float = 5.0, port: int = 0) -> Iterator[str]:
    """The real exporter on loopback (``port``, or a free one) reading ``bin_dir``; yields /metrics URL."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "labkit_exporters.slurm",
        "--listen-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--slurm-bin-dir",
        str(bin_dir),
        "--timeout",
        str(timeout),
    ]
    url = f"http://127.0.0.1:{port}/metrics"
    with running(cmd, log, env=exporter_env()) as proc:
        wait_for(lambda: requests.get(url, timeout=20).ok or None, timeout=30, what=f"slurm exporter ({log})")
        assert proc.poll() is None
        yield url
