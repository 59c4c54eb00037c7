"""End-to-end checks of LDAP (ldap_server on infra01) and sssd (ldap_client everywhere) in the local lab.

Real logins: sssd resolves alice on gpu01, sshd takes her key from LDAP, she changes her password with
`passwd` (driven through a pseudo-terminal, as a person types it), anonymous LDAP reads nothing, bad
member lists are refused before any change, and a member marked absent can no longer log in while her
files stay. The lab's test members log in with the lab's test key (inventory/lab/group_vars/all/users.yml).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time

import pytest
from lab_helpers import ADMIN_KEY, run_playbook, ssh
from test_lab_experiments import NAME, db_client, portal, psql

__all__ = ["db_client", "portal"]  # fixtures of the experiment services' checks, used here

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BASE = "dc=lab,dc=test"
ADMIN_DN = f"cn=admin,{BASE}"
# Test-only values from inventory/lab/group_vars/all/vault_test.yml.
ADMIN_PW = "lab-test-only-ldap-admin"
BIND_DN = f"cn=sssd,ou=services,{BASE}"
BIND_PW = "lab-test-only-ldap-bind"
ALICE_DN = f"uid=alice,ou=people,{BASE}"
DB_LOGIN = f"host={NAME} dbname=alice user=alice sslmode=verify-full sslrootcert=/tmp/db-ca.crt"
LDAP_URI = "ldaps://infra01.lab.test"
KEY = "{{ lab_admin_pubkey }}"
MEMBERS = [
    {"name": "alice", "uid": 20001, "full_name": "Alice Liddell", "mail": "alice@lab.test",
     "ssh_keys": [KEY], "groups": ["lab-admins"]},
    {"name": "bob", "uid": 20002, "full_name": "Bob Builder", "mail": "bob@lab.test", "ssh_keys": [KEY]},
]  # fmt: skip


def directory_checksum(host_exec) -> str:
    """Checksum of the directory's data (slapcat): equal before and after means LDAP did not change."""
    return host_exec("infra01", "sh", "-c", f"slapcat -b {BASE} | md5sum").stdout


def set_password_as_admin(host_exec, password: str) -> None:
    """The reset-a-password runbook: the admin DN sets a member's password over the local socket."""
    out = host_exec(
        "infra01",
        "ldappasswd",
        "-x",
        "-H",
        "ldapi:///",
        "-D",
        ADMIN_DN,
        "-w",
        ADMIN_PW,
        "-s",
        password,
        ALICE_DN,
    )
    assert out.returncode == 0, out.stderr


def binds_as_alice(host_exec, password: str) -> bool:
    out = host_exec("gpu01", "ldapwhoami", "-x", "-H", LDAP_URI, "-D", ALICE_DN, "-w", password)
    return out.returncode == 0 and out.stdout.strip() == f"dn:{ALICE_DN}"


def passwd_over_ssh(address: str, old: str, new: str) -> str:
    """Run `passwd` as alice on a real terminal (ssh -tt under a pty) and answer its prompts."""
    options = ["BatchMode=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]
    argv = ["ssh", "-tt", *(f"-o{o}" for o in options), "-i", str(ADMIN_KEY), f"alice@{address}", "passwd"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes ssh on the pty
        os.execvp(argv[0], argv)
    answers = [
        (re.compile(r"current password: *$", re.I), old),
        (re.compile(r"new password: *$", re.I), new),
        (re.compile(r"(retype|re-?enter) new password: *$", re.I), new),
    ]
    seen = ""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1024).decode(errors="replace")
            except OSError:  # the session ended
                break
            if not chunk:
                break
            seen += chunk
            tail = seen.rstrip("\r\n").splitlines()[-1] if seen.strip() else ""
            for pattern, answer in answers:
                if pattern.search(tail) and not seen.endswith("\n"):
                    os.write(fd, (answer + "\n").encode())
                    seen += "\n"
                    break
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    return seen


def test_alice_resolves_on_the_nodes(second_run, host_exec):
    for host in ("gpu01", "gpu02"):
        out = host_exec(host, "getent", "passwd", "alice")
        assert out.stdout.strip() == "alice:*:20001:10000:Alice Liddell:/home/alice:/bin/bash", out
        groups = host_exec(host, "id", "-Gn", "alice").stdout.split()
        assert sorted(groups) == ["lab-admins", "lab-members"]


def test_alice_logs_in_with_her_key_from_ldap_and_a_wrong_key_fails(second_run, lab, tmp_path):
    address = lab["gpu01"]["address"]
    login = ssh(address, "alice", "id -un; stat -c %U $HOME")
    assert login.returncode == 0, login.stderr
    assert login.stdout.split() == ["alice", "alice"]  # pam_mkhomedir made her home, owned by her
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    wrong = ssh(address, "alice", "true", key=stranger)
    assert wrong.returncode == 255 and "Permission denied" in wrong.stderr


def test_anonymous_ldapsearch_reads_no_password(second_run, host_exec):
    anon = host_exec(
        "gpu01", "ldapsearch", "-LLL", "-x", "-H", LDAP_URI, "-b", BASE, "(objectClass=*)", "*", "+"
    )
    assert anon.returncode in (0, 32), anon.stderr
    assert "userPassword" not in anon.stdout
    assert "uid: alice" not in anon.stdout  # anonymous reads no entry at all
    # Nor does the clients' service account or a member: only the admin DN reads passwords.
    set_password_as_admin(host_exec, "Initial-Lab-Pw-4417")
    for bind in (["-D", BIND_DN, "-w", BIND_PW], ["-D", ALICE_DN, "-w", "Initial-Lab-Pw-4417"]):
        out = host_exec(
            "gpu01", "ldapsearch", "-LLL", "-x", "-H", LDAP_URI, *bind, "-b", BASE, "(uid=*)", "*"
        )
        assert out.returncode == 0, out.stderr
        assert "uid: alice" in out.stdout
        assert "userPassword" not in out.stdout
    # Plain LDAP without TLS is refused outright.
    plain = host_exec(
        "gpu01", "ldapwhoami", "-x", "-H", "ldap://infra01.lab.test", "-D", BIND_DN, "-w", BIND_PW
    )
    assert plain.returncode == 13 and "onfidentiality required" in plain.stderr


def test_alice_changes_her_password_with_passwd(second_run, lab, host_exec):
    set_password_as_admin(host_exec, "Initial-Lab-Pw-4417")
    transcript = passwd_over_ssh(lab["gpu01"]["address"], "Initial-Lab-Pw-4417", "Changed-By-Herself-8832")
    assert re.search(r"current password", transcript, re.I), transcript
    assert re.search(r"updated successfully", transcript, re.I), transcript
    assert binds_as_alice(host_exec, "Changed-By-Herself-8832")
    assert not binds_as_alice(host_exec, "Initial-Lab-Pw-4417")


def test_sudo_for_the_admin_group_only(second_run, lab, host_exec):
    set_password_as_admin(host_exec, "Sudo-Lab-Pw-1290")
    address = lab["gpu01"]["address"]
    alice = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "LogLevel=ERROR", "-i", str(ADMIN_KEY), f"alice@{address}", "sudo -S -p '' id -u"],
        input="Sudo-Lab-Pw-1290\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert alice.stdout.strip() == "0", alice.stderr
    bob = ssh(address, "bob", "sudo -n true")
    assert bob.returncode != 0


BAD_MEMBERS = [
    pytest.param([*MEMBERS, dict(MEMBERS[1], uid=20009)], "lab_users", id="duplicate-name"),
    pytest.param([*MEMBERS, dict(MEMBERS[1], name="bob2")], "lab_users", id="duplicate-uid"),
    pytest.param([dict(MEMBERS[0], ssh_keys=["ssh-ed25519 not-a-key alice@x"])], "lab_users", id="bad-key"),
    pytest.param([{k: v for k, v in MEMBERS[0].items() if k != "mail"}], "mail", id="missing-mail"),
    pytest.param([dict(MEMBERS[0], groups=["no-such-group"])], "lab_users", id="unknown-group"),
]


@pytest.mark.parametrize(("members", "named"), BAD_MEMBERS)
def test_bad_members_are_rejected_before_any_change(second_run, host_exec, members, named):
    before = directory_checksum(host_exec)
    run = run_playbook("users.yml", "-e", json.dumps({"lab_users": members}))
    assert run.rc != 0
    assert named in run.output
    for host, counts in run.recap().items():
        assert counts["changed"] == 0, f"{host} changed despite bad input"
    assert directory_checksum(host_exec) == before


def test_absent_member_cannot_log_in_and_keeps_her_files(second_run, lab, host_exec, portal, db_client):
    """Marked absent, alice can log in nowhere: not over SSH, not to the portal, not to the study database
    (her files and her database stay)."""
    address = lab["gpu01"]["address"]
    wrote = ssh(address, "alice", "echo thesis-draft > ~/keep.txt")
    assert wrote.returncode == 0, wrote.stderr
    set_password_as_admin(host_exec, "absent-test-pw-1")
    assert portal("/mlflow/health", "alice", "absent-test-pw-1").status_code == 200
    assert psql(host_exec, DB_LOGIN, "absent-test-pw-1").returncode == 0
    gone = [dict(MEMBERS[0], ssh_keys=[], state="absent"), MEMBERS[1]]
    try:
        run = run_playbook("users.yml", "-e", json.dumps({"lab_users": gone}))
        assert run.rc == 0, run.output[-3000:]
        refused = ssh(address, "alice", "true")
        assert refused.returncode == 255 and "Permission denied" in refused.stderr
        passwd = host_exec("gpu01", "getent", "passwd", "alice").stdout
        assert passwd.strip().endswith(":/usr/sbin/nologin")
        assert host_exec("gpu01", "id", "-Gn", "alice").stdout.split() == ["lab-members"]  # primary gid only
        assert host_exec("gpu01", "cat", "/home/alice/keep.txt").stdout == "thesis-draft\n"
        assert ssh(address, "bob", "id -un").stdout.strip() == "bob"  # others are untouched
        # the portal trusts a looked-up login for web_portal_ldap_cache_seconds (5 s in the lab)
        deadline = time.monotonic() + 30
        while portal("/mlflow/health", "alice", "absent-test-pw-1").status_code != 401:
            assert time.monotonic() < deadline, "the portal still lets alice in"
            time.sleep(2)
        db = psql(host_exec, DB_LOGIN, "absent-test-pw-1")
        assert db.returncode != 0 and "authentication failed" in db.stderr, db.stderr
        kept = host_exec("infra01", "runuser", "-u", "postgres", "--", "psql", "-XAtq", "-c",
                         "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'alice'")
        assert kept.stdout.strip() == "f", kept.stdout + kept.stderr  # her role (and database) stay
    finally:
        back = run_playbook("users.yml")  # the inventory has her present again
        assert back.rc == 0, back.output[-3000:]
    again = ssh(address, "alice", "cat ~/keep.txt")
    assert again.returncode == 0 and again.stdout == "thesis-draft\n", again.stderr


def test_nightly_backup_holds_the_members(second_run, host_exec):
    timer = host_exec("infra01", "systemctl", "is-enabled", "labkit-ldap-backup.timer")
    assert timer.stdout.strip() == "enabled"
    run = host_exec("infra01", "systemctl", "start", "labkit-ldap-backup.service")
    assert run.returncode == 0, run.stderr
    latest = host_exec(
        "infra01", "sh", "-c", "ls -t /var/backups/ldap/data-*.ldif.gz | head -1"
    ).stdout.strip()
    content = host_exec("infra01", "sh", "-c", f"zcat {latest}").stdout
    assert f"dn: {ALICE_DN}" in content and "sshPublicKey: ssh-ed25519" in content
