"""Real NFS between two VMs: the lab's NFS playbook (roles nfs_server, nfs_client) on kernels that serve
and mount NFS, which the lab's containers cannot (`make test-nfs-vm`; docs/nfs-vm.md).

nfsvm-server exports /home and /srv/data to the private link with root_squash and makes alice's home;
nfsvm-client mounts them through autofs. alice's files cross with her uid both ways, root on the client
is nobody on the server, the mounts are NFSv4, and a second converge changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from lab_helpers import PlaybookRun
from labkit_lab import nfs_vm

pytestmark = [pytest.mark.nfs_vm, pytest.mark.slow, pytest.mark.timeout(2400)]

ALICE_UID = 20001
MEMBERS_GID = 10000
NOBODY = 65534
HOME = "/home/alice"
SCRATCH_SERVER = "/srv/data/scratch"
SCRATCH_CLIENT = "/data/scratch"


def log(msg: str) -> None:
    print(f"test_nfs_vm: {msg}", flush=True)


@pytest.fixture(scope="module")
def vms() -> Iterator[dict[str, nfs_vm.RunningVm]]:
    """Both VMs booted on fresh overlays of the cached image; powered off (or killed) afterwards."""
    image = nfs_vm.build_image()
    started = time.monotonic()
    try:
        running = nfs_vm.up(image)
        log(f"both VMs answer ssh after {time.monotonic() - started:.0f}s")
        yield {vm.name: vm for vm in running}
    finally:
        nfs_vm.down()


@pytest.fixture(scope="module")
def converged(vms: dict[str, nfs_vm.RunningVm]) -> PlaybookRun:
    """The first converge of fresh VMs: it must succeed on both and change them."""
    started = time.monotonic()
    rc, output = nfs_vm.run_playbook(echo=True)
    run = PlaybookRun(rc, output)
    log(f"first converge: rc {rc} in {time.monotonic() - started:.0f}s, recap {run.recap()}")
    assert rc == 0, output[-6000:]
    assert set(run.recap()) == set(vms), output[-3000:]
    return run


@pytest.fixture(scope="module")
def server(vms: dict[str, nfs_vm.RunningVm], converged: PlaybookRun) -> nfs_vm.RunningVm:
    return vms[nfs_vm.SERVER.name]


@pytest.fixture(scope="module")
def client(vms: dict[str, nfs_vm.RunningVm], converged: PlaybookRun) -> nfs_vm.RunningVm:
    return vms[nfs_vm.CLIENT.name]


def sh(vm: nfs_vm.RunningVm, command: str) -> str:
    """Run a command as labadmin (sudo inside for root or alice) and return its stdout; it must succeed."""
    out = nfs_vm.vm_ssh(vm, command)
    assert out.returncode == 0, f"{vm.name}: {command}: rc {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout.strip()


def test_first_converge_changed_both_vms(converged: PlaybookRun) -> None:
    recap = converged.recap()
    assert all(counts["changed"] > 0 and counts["failed"] == 0 for counts in recap.values()), recap


def test_server_exports_with_root_squash_to_the_private_link_only(server: nfs_vm.RunningVm) -> None:
    exports = sh(server, "sudo exportfs -v")
    lines = " ".join(exports.split())
    for path in ("/home", "/srv/data"):
        assert f"{path} {nfs_vm.PRIVATE_NET}(" in lines, exports
    assert "root_squash" in exports and "no_root_squash" not in exports, exports
    assert sh(server, "systemctl is-active nfs-server") == "active"


def test_alices_home_is_mounted_over_nfs4_from_the_server(client: nfs_vm.RunningVm) -> None:
    # autofs mounts it when used: a listing is a use.
    sh(client, f"ls -ln {HOME} >/dev/null 2>&1 || true")
    mounts = sh(client, f"findmnt -n -t nfs4 -o SOURCE,TARGET,FSTYPE,OPTIONS {HOME}")
    source, target, fstype, options = mounts.split()
    assert source in (f"{nfs_vm.SERVER.name}:{HOME}", f"{nfs_vm.SERVER.address}:{HOME}"), mounts
    assert (target, fstype) == (HOME, "nfs4"), mounts
    assert "hard" in options.split(","), mounts
    assert f"addr={nfs_vm.SERVER.address}" in options, mounts


def test_a_file_alice_made_on_the_server_is_hers_on_the_client(
    server: nfs_vm.RunningVm, client: nfs_vm.RunningVm
) -> None:
    # The home the role made: alice's, mode 0700, group lab-members.
    assert sh(server, f"stat -c '%u %g %a' {HOME}") == f"{ALICE_UID} {MEMBERS_GID} 700"
    sh(server, f"sudo -u alice sh -c 'echo written on the server > {HOME}/from-server.txt'")
    assert sh(client, f"stat -c '%u %g %a' {HOME}") == f"{ALICE_UID} {MEMBERS_GID} 700"
    listing = sh(client, f"sudo -u alice ls -ln {HOME}")
    line = next(row for row in listing.splitlines() if row.endswith("from-server.txt"))
    assert line.split()[2:4] == [str(ALICE_UID), str(MEMBERS_GID)], listing
    assert sh(client, f"sudo -u alice cat {HOME}/from-server.txt") == "written on the server"
    assert sh(client, f"sudo -u alice stat -c %U {HOME}/from-server.txt") == "alice"


def test_a_file_alice_writes_on_the_client_lands_on_the_server_as_hers(
    server: nfs_vm.RunningVm, client: nfs_vm.RunningVm
) -> None:
    sh(client, f"sudo -u alice sh -c 'echo written on the client > {HOME}/from-client.txt'")
    assert sh(server, f"sudo stat -c '%u %g' {HOME}/from-client.txt") == f"{ALICE_UID} {MEMBERS_GID}"
    assert sh(server, f"sudo cat {HOME}/from-client.txt") == "written on the client"


def test_root_on_the_client_cannot_write_as_root(server: nfs_vm.RunningVm, client: nfs_vm.RunningVm) -> None:
    # alice's home is 0700: root on the client is nobody on the server, and nobody may not enter it.
    denied = nfs_vm.vm_ssh(client, f"sudo touch {HOME}/written-by-root")
    assert denied.returncode != 0, denied
    assert "Permission denied" in denied.stderr, denied.stderr
    denied = nfs_vm.vm_ssh(client, f"sudo ls {HOME}")
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    assert sh(server, f"sudo test -e {HOME}/written-by-root && echo there || echo absent") == "absent"
    # Where anyone may write, root's file is nobody's on the server, never root's.
    sh(client, f"sudo sh -c 'echo from root > {SCRATCH_CLIENT}/from-root.txt'")
    assert sh(server, f"stat -c '%u %g' {SCRATCH_SERVER}/from-root.txt") == f"{NOBODY} {NOBODY}"
    assert sh(client, f"findmnt -n -t nfs4 -o TARGET --target {SCRATCH_CLIENT}") == "/data"


def test_the_home_probe_sees_the_nfs_home(client: nfs_vm.RunningVm) -> None:
    """labkit-nfs-home-probe (alert NfsHomeNotMounted) reports the home area up on a real NFS mount."""
    sh(client, "sudo systemctl start labkit-nfs-home-probe.service")
    metrics = sh(client, "cat /var/lib/prometheus/node-exporter/labkit_nfs_home.prom")
    samples = [line for line in metrics.splitlines() if line.startswith("labkit_nfs_home_ok{")]
    assert samples and all(line.endswith(" 1") for line in samples), metrics


def test_a_second_converge_changes_nothing(vms: dict[str, nfs_vm.RunningVm], converged: PlaybookRun) -> None:
    started = time.monotonic()
    rc, output = nfs_vm.run_playbook(echo=True)
    log(f"second converge: rc {rc} in {time.monotonic() - started:.0f}s")
    assert rc == 0, output[-6000:]
    PlaybookRun(rc, output).assert_changed_nothing(set(vms))
