"""End-to-end checks of NFS (nfs_server on infra01, nfs_client on the GPU nodes) in the local lab.

Containers here have no kernel NFS: nfsd cannot start and nothing can be mounted. So the lab checks
NFS at configuration level (inventory/lab/group_vars/all/nfs.yml): the exports as exportfs loaded them,
the autofs maps as automount parses them, members' homes made on infra01 by users.yml, homes staying
local on the nodes (members and admins still log in), the unreachable-server check, and bad input
refused by name with nothing changed. Serving and mounting for real is `make test-nfs-vm`.
"""

from __future__ import annotations

import json

import pytest
from lab_helpers import run_playbook, ssh

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = ("infra01", "gpu01", "gpu02")
NODES = ("gpu01", "gpu02")
SUBNET = "172.30.57.0/24"
OPTIONS = "-fstype=nfs,rw,hard,vers=4,proto=tcp,timeo=600,retrans=2,noatime,nosuid,nodev"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
MANAGED = (
    "/etc/exports.d/* /etc/nfs.conf.d/* /var/lib/nfs/etab /etc/auto.master.d/* /etc/auto.labkit-* "
    "/etc/systemd/system/labkit-nfs-home-probe.*"
)


def fingerprint(host_exec, host: str) -> str:
    """Checksums of what the NFS roles manage, and the units' states: equal means nothing changed."""
    out = host_exec(
        host,
        "sh",
        "-c",
        f"cat {MANAGED} 2>/dev/null | md5sum; ls -ln /home /srv 2>/dev/null; "
        "systemctl is-enabled autofs nfs-server 2>/dev/null",
    )
    return out.stdout


def test_infra01_exports_homes_and_data_to_the_cluster_only_with_root_squash(second_run, host_exec):
    exports = host_exec("infra01", "exportfs", "-v")
    assert exports.returncode == 0, exports.stderr
    tokens = exports.stdout.split()  # `path client(options)` per export and client, wrapped or not
    pairs = sorted(zip(tokens[::2], tokens[1::2], strict=True))
    assert [path for path, _ in pairs] == ["/home", "/srv/data"], exports.stdout
    for _path, client in pairs:
        assert client.startswith(f"{SUBNET}("), exports.stdout
        assert ",root_squash," in client and "no_root_squash" not in client, client
    data = host_exec("infra01", "stat", "-c", "%G %a", "/srv/data").stdout.split()
    assert data == ["lab-members", "3775"]
    # nfsd itself cannot run in a container: it is masked, and the host boots clean.
    assert host_exec("infra01", "systemctl", "is-enabled", "nfs-server").stdout.strip() == "masked"
    assert host_exec("infra01", "systemctl", "is-system-running").stdout.strip() == "running"


def test_members_have_homes_on_the_nfs_server(second_run, host_exec):
    for name, uid in (("alice", "20001"), ("bob", "20002")):
        owner = host_exec("infra01", "stat", "-c", "%u", f"/home/{name}").stdout.strip()
        assert owner == uid, f"/home/{name} on infra01"


def test_users_playbook_makes_new_homes_on_the_server_and_leaves_existing_ones(second_run, host_exec):
    # Homes made in a scratch directory inside an export, so the lab's real homes stay as they are.
    base = "/srv/data/.labkit-test-homes"
    host_exec("infra01", "rm", "-rf", base)
    try:
        run = run_playbook("users.yml", "-e", json.dumps({"nfs_server_homes_dir": base}))
        assert run.rc == 0, run.output[-3000:]
        alice = host_exec("infra01", "stat", "-c", "%u %G %a", f"{base}/alice").stdout.split()
        assert alice == ["20001", "lab-members", "700"]
        listing = host_exec("infra01", "su", "-s", "/bin/sh", "alice", "-c", f"ls -A {base}/alice")
        assert ".bashrc" in listing.stdout.split(), listing
        # bob cannot look into alice's home.
        assert host_exec("infra01", "su", "-s", "/bin/sh", "bob", "-c", f"ls {base}/alice").returncode != 0
        # alice opens her home to her group and keeps a file there; a second run leaves both alone.
        host_exec("infra01", "chmod", "0750", f"{base}/alice")
        host_exec("infra01", "su", "-s", "/bin/sh", "alice", "-c", f"echo draft > {base}/alice/keep.txt")
        again = run_playbook("users.yml", "-e", json.dumps({"nfs_server_homes_dir": base}))
        assert again.rc == 0, again.output[-3000:]
        again.assert_changed_nothing(HOSTS)
        assert host_exec("infra01", "stat", "-c", "%a", f"{base}/alice").stdout.strip() == "750"
        assert host_exec("infra01", "cat", f"{base}/alice/keep.txt").stdout == "draft\n"
    finally:
        host_exec("infra01", "rm", "-rf", base)


@pytest.mark.parametrize("node", NODES)
def test_nodes_have_the_maps_autofs_would_use(second_run, host_exec, node):
    dump = host_exec(node, "automount", "-m")
    assert dump.returncode == 0, dump.stderr
    text = dump.stdout
    assert "Mount point: /home" in text
    assert f"* | {OPTIONS} infra01:/home/&" in text, text
    assert f"labkit-nfs-probe | {OPTIONS} infra01:/home" in text, text
    assert f"/data | {OPTIONS} infra01:/srv/data" in text, text


def test_homes_stay_local_in_the_lab_and_everyone_still_logs_in(second_run, host_exec, lab):
    for node in NODES:
        assert host_exec(node, "systemctl", "is-enabled", "autofs").stdout.strip() == "masked"
        assert host_exec(node, "findmnt", "-n", "-t", "autofs,nfs,nfs4").stdout == ""
        assert host_exec(node, "systemctl", "is-system-running").stdout.strip() == "running"
        # The probe does not run where nothing is mounted (no false NfsHomeNotMounted in the lab).
        timer = host_exec(node, "systemctl", "is-enabled", "labkit-nfs-home-probe.timer")
        assert timer.stdout.strip() == "disabled"
        assert host_exec(node, "test", "-e", f"{TEXTFILE_DIR}/labkit_nfs_home.prom").returncode != 0
    address = lab["gpu01"]["address"]
    alice = ssh(address, "alice", "pwd")
    assert alice.returncode == 0 and alice.stdout.strip() == "/home/alice", alice.stderr
    admin = ssh(address, "labadmin", "pwd; sudo -n id -u")
    assert admin.returncode == 0, admin.stderr
    assert admin.stdout.split() == ["/var/local/admins/labadmin", "0"]  # outside /home, as with NFS homes


BAD_INPUTS = [
    pytest.param(
        {"nfs_server_exports": [{"path": "/home", "options": ["rw", "sync", "no_root_squash"]}]},
        "nfs_server_exports",
        id="no-root-squash",
    ),
    pytest.param(
        {"nfs_server_exports": [{"path": "/home", "clients": ["*"]}]}, "nfs_server_exports", id="world"
    ),
    pytest.param(
        {"nfs_server_exports": [{"path": "/home", "options": ["rw,sync"]}]},
        "nfs_server_exports",
        id="one-string",
    ),
    pytest.param({"nfs_server_threads": "many"}, "nfs_server_threads", id="threads-not-int"),
    pytest.param({"nfs_client_mount_options": ["rw,hard"]}, "nfs_client_mount_options", id="client-options"),
    pytest.param({"nfs_client_server": ""}, "nfs_client_server", id="no-server"),
    pytest.param(
        {"nfs_client_data_mountpoint": "/home/data"}, "nfs_client_data_mountpoint", id="data-in-home"
    ),
    # The lab's nodes make homes at login; turning autofs on there is refused before it hides them.
    pytest.param({"nfs_client_service_enabled": True}, "ldap_client_mkhomedir", id="autofs-with-mkhomedir"),
]


@pytest.mark.parametrize(("extra_vars", "named"), BAD_INPUTS)
def test_bad_input_is_rejected_by_name_and_changes_nothing(second_run, host_exec, extra_vars, named):
    before = {h: fingerprint(host_exec, h) for h in HOSTS}
    run = run_playbook("nfs.yml", "-e", json.dumps(extra_vars))
    if run.rc == 0:  # accepted: put the shared lab back (autofs masked) before failing
        run_playbook("nfs.yml")
    assert run.rc != 0
    assert named in run.output
    for host, counts in run.recap().items():
        assert counts["changed"] == 0, f"{host} changed despite bad input"
    assert {h: fingerprint(host_exec, h) for h in HOSTS} == before


def test_unreachable_server_fails_clearly_before_any_change(second_run, host_exec):
    # nfsd does not run on infra01 in the lab: exactly what a node sees when the server is down.
    before = {h: fingerprint(host_exec, h) for h in NODES}
    run = run_playbook("nfs.yml", "-l", "nfs_clients", "-e", json.dumps({"nfs_client_check_server": True}))
    assert run.rc != 0
    said = " ".join(run.output.split())  # the message as one line, however the callback wrapped it
    assert "the NFS server infra01 (nfs_client_server) does not answer on TCP 2049" in said
    assert "nfs_client_check_server: false" in run.output
    assert all(counts["changed"] == 0 for counts in run.recap().values())
    assert {h: fingerprint(host_exec, h) for h in NODES} == before


def test_local_account_under_home_is_named_and_nothing_changes(second_run, host_exec):
    host_exec("gpu02", "useradd", "-u", "1500", "-m", "-d", "/home/mallory", "mallory")
    try:
        before = fingerprint(host_exec, "gpu02")
        run = run_playbook("nfs.yml", "-l", "gpu02")
        assert run.rc != 0
        assert "mallory" in run.output and "nfs_client_home_mountpoint" in run.output
        assert "common_admin_home_base" in run.output
        assert run.recap()["gpu02"]["changed"] == 0
        assert fingerprint(host_exec, "gpu02") == before
    finally:
        host_exec("gpu02", "userdel", "-r", "mallory")
