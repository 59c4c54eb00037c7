"""monitoring/node/labkit-nfs-home-probe: the textfile it writes for node_exporter.

There is no kernel NFS here, so "NFS" is whatever file-system type the test accepts through
LABKIT_NFS_FSTYPES; the real check of an NFS mount happens on the lab's hosts.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from mon_helpers import MONITORING
from prometheus_client.parser import text_string_to_metric_families

PROBE = MONITORING / "node" / "labkit-nfs-home-probe"


def run_probe(
    tmp_path: Path, path: Path, fstypes: str | None = None
) -> dict[str, tuple[dict[str, str], float]]:
    env = {**os.environ, "LABKIT_NFS_PROBE_PATH": str(path), "LABKIT_TEXTFILE_DIR": str(tmp_path / "tf")}
    if fstypes is not None:
        env["LABKIT_NFS_FSTYPES"] = fstypes
    (tmp_path / "tf").mkdir(exist_ok=True)
    result = subprocess.run([str(PROBE)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr  # a failing probe is a metric, not a failed unit
    assert [p.name for p in (tmp_path / "tf").iterdir()] == ["labkit_nfs_home.prom"]  # no temp file left
    text = (tmp_path / "tf" / "labkit_nfs_home.prom").read_text()
    return {s.name: (s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples}


def fstype_of(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_local_directory_is_not_nfs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    before = time.time()
    out = run_probe(tmp_path, home)
    assert out["labkit_nfs_home_ok"] == ({"path": str(home)}, 0)
    assert before - 1 <= out["labkit_nfs_home_probe_timestamp_seconds"][1] <= time.time() + 1


def test_accepted_file_system_type_is_ok(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    out = run_probe(tmp_path, home, fstypes=f"nfs {fstype_of(home)}")
    assert out["labkit_nfs_home_ok"][1] == 1


def test_missing_path_is_not_ok(tmp_path: Path) -> None:
    out = run_probe(tmp_path, tmp_path / "no-such-home", fstypes=fstype_of(tmp_path))
    assert out["labkit_nfs_home_ok"][1] == 0


@pytest.mark.parametrize("name", ['we"ird', "back\\slash"])
def test_path_label_is_escaped(tmp_path: Path, name: str) -> None:
    home = tmp_path / name
    home.mkdir()
    out = run_probe(tmp_path, home, fstypes=fstype_of(home))
    assert out["labkit_nfs_home_ok"] == ({"path": str(home)}, 1)
