"""`labctl down` removes what slurmd left in this machine's cgroup tree: the lab's nodes share it
(cgroupns=host), so their job cgroups sit at its root as slurm_<NodeName> and outlive the containers."""

from __future__ import annotations

from pathlib import Path

from labkit_lab import lab


def _tree(root: Path, *dirs: str) -> None:
    for d in dirs:
        (root / d).mkdir(parents=True)


def test_finds_the_named_nodes_cgroups_in_v1_and_v2_deepest_first(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        "memory/slurm_gpu01/uid_20001/job_7/step_batch",
        "devices/slurm_gpu01/uid_20001",
        "slurm_gpu02/system",  # a v2 tree
        "memory/slurm_other/uid_1",  # a node of something else on the machine
        "memory/docker/abc",
    )
    found = lab.slurm_cgroups(["gpu01", "gpu02"], root=tmp_path)
    rel = [str(p.relative_to(tmp_path)) for p in found]
    assert set(rel) == {
        "memory/slurm_gpu01",
        "memory/slurm_gpu01/uid_20001",
        "memory/slurm_gpu01/uid_20001/job_7",
        "memory/slurm_gpu01/uid_20001/job_7/step_batch",
        "devices/slurm_gpu01",
        "devices/slurm_gpu01/uid_20001",
        "slurm_gpu02",
        "slurm_gpu02/system",
    }
    depths = [len(p.parts) for p in found]
    assert depths == sorted(depths, reverse=True)  # children before parents: rmdir in this order works


def test_remove_leaves_other_cgroups(tmp_path: Path, monkeypatch) -> None:
    _tree(tmp_path, "memory/slurm_gpu01/uid_1/job_2", "memory/slurm_gpu03/uid_1", "memory/docker/x")
    real = lab.slurm_cgroups
    monkeypatch.setattr(lab, "slurm_cgroups", lambda names: real(names, root=tmp_path))
    lab.remove_slurm_cgroups(["gpu01"])
    assert not (tmp_path / "memory/slurm_gpu01").exists()
    assert (tmp_path / "memory/slurm_gpu03/uid_1").is_dir()
    assert (tmp_path / "memory/docker/x").is_dir()
