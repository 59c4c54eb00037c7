"""End-to-end checks of `common` (and the playbooks) on the converged local lab."""

from __future__ import annotations

import json
import re
import time

import pytest
from lab_helpers import ADMIN_KEY, run_playbook, ssh

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = ("infra01", "gpu01", "gpu02")


def fingerprint(host_exec, host: str) -> str:
    """Checksums of what `common` manages; equal before and after means the host did not change."""
    out = host_exec(
        host,
        "sh",
        "-c",
        "cat /etc/passwd /etc/group /etc/hosts /etc/chrony/chrony.conf /etc/ssh/sshd_config.d/* "
        "/etc/apt/apt.conf.d/* /etc/sudoers.d/* /etc/systemd/journald.conf.d/* /etc/timezone "
        "/etc/ssh/ssh_known_hosts "
        "2>/dev/null | md5sum",
    )
    return out.stdout


def test_second_converge_changes_nothing(second_run):
    """Every playbook that site.yml imports (identity, nfs, gpu_nodes, job_queue, monitoring) is idempotent:
    this one recap is their second run; the other modules reuse it (fixture second_run)."""
    second_run.assert_changed_nothing(HOSTS)


@pytest.mark.parametrize("host", HOSTS)
def test_admin_logs_in_by_key_and_has_sudo(lab, host):
    result = ssh(lab[host]["address"], "labadmin", "sudo", "-n", "id", "-u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_wrong_key_password_and_root_are_refused(lab, tmp_path):
    import subprocess

    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    address = lab["gpu01"]["address"]
    wrong = ssh(address, "labadmin", "true", key=stranger)
    assert wrong.returncode == 255 and "Permission denied" in wrong.stderr
    password = ssh(
        address,
        "labadmin",
        "true",
        extra=(
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
        ),
    )
    assert password.returncode == 255 and "Permission denied (publickey)" in password.stderr
    root = ssh(address, "root", "true", key=ADMIN_KEY)
    assert root.returncode == 255 and "Permission denied" in root.stderr


def test_cluster_names_resolve_without_dns(lab, host_exec):
    for host in HOSTS:
        out = host_exec("infra01", "getent", "hosts", f"{host}.lab.test")
        assert out.returncode == 0
        assert out.stdout.split()[0] == lab[host]["address"]
        assert host in out.stdout.split()


def test_nodes_follow_the_infra_hosts_clock(lab, host_exec):
    infra = lab["infra01"]["address"]
    deadline = time.monotonic() + 90
    sources = ""
    while time.monotonic() < deadline:
        sources = host_exec("gpu01", "chronyc", "-n", "sources").stdout
        if any(line.startswith("^*") and infra in line for line in sources.splitlines()):
            break
        time.sleep(2)
    else:
        pytest.fail(f"gpu01 never selected infra01 ({infra}) as its time source:\n{sources}")
    tracking = host_exec("gpu01", "chronyc", "-n", "tracking").stdout
    assert "Stratum         : 11" in tracking


def test_journal_and_time_zone_in_force(lab, host_exec):
    assert host_exec("gpu02", "date", "+%Z").stdout.strip() in ("CET", "CEST")
    config = host_exec("gpu02", "systemd-analyze", "cat-config", "systemd/journald.conf").stdout
    assert "SystemMaxUse=1G" in config


BAD_INPUTS = [
    pytest.param({"common_timezone": 123}, "common_timezone", id="timezone-not-a-string"),
    pytest.param({"common_timezone": "Mars/Olympus Mons"}, "common_timezone", id="timezone-malformed"),
    pytest.param(
        {"common_ssh_permit_root_login": "yes"}, "common_ssh_permit_root_login", id="root-login-choice"
    ),
    pytest.param(
        {"common_admins": [{"name": "eve", "ssh_keys": ["ssh-rsa not-a-key eve@x"]}]},
        "common_admins",
        id="bad-key",
    ),
    pytest.param({"common_admins": [{"ssh_keys": []}]}, "name", id="admin-without-name"),
    pytest.param({"common_apt_cache_valid_time": "soon"}, "common_apt_cache_valid_time", id="int-expected"),
    pytest.param({"ssh_known_hosts_key_types": ["dsa"]}, "ssh_known_hosts_key_types", id="known-hosts-dsa"),
    # Checked by the role's preflight (after common has run): only the role's tag, to keep the suite short.
    pytest.param(
        {"ssh_known_hosts_extra_lines": ["nas01 ssh-ed25519"]},
        "ssh_known_hosts_extra_lines",
        id="known-hosts-line",
        marks=pytest.mark.tags("ssh_known_hosts"),
    ),
    pytest.param(
        {"ssh_known_hosts_hosts": ["gpu09"]},
        "ssh_known_hosts_hosts",
        id="known-hosts-nohost",
        marks=pytest.mark.tags("ssh_known_hosts"),
    ),
]


@pytest.mark.parametrize(("extra_vars", "named"), BAD_INPUTS)
def test_bad_input_is_rejected_by_name_and_changes_nothing(request, lab, host_exec, extra_vars, named):
    before = {h: fingerprint(host_exec, h) for h in HOSTS}
    tags = request.node.get_closest_marker("tags")
    only = ("--tags", ",".join(tags.args)) if tags else ()
    run = run_playbook("site.yml", "-e", json.dumps(extra_vars), *only)
    assert run.rc != 0
    assert named in run.output
    for host, counts in run.recap().items():
        assert counts["changed"] == 0, f"{host} changed despite bad input"
    assert {h: fingerprint(host_exec, h) for h in HOSTS} == before
    assert host_exec("gpu01", "getent", "passwd", "eve").returncode != 0


def test_a_late_roles_bad_setting_stops_site_yml_before_the_first_play(lab):
    """argument_specs of every role are checked up front (playbooks/check-inputs.yml): a wrong type for
    the job queue, whose play runs last, stops the run before the base system's play starts."""
    run = run_playbook("site.yml", "-e", json.dumps({"job_queue_max_gpus_per_user": "many"}))
    assert run.rc != 0
    assert "job_queue_max_gpus_per_user" in run.output and "cannot be converted to an int" in run.output
    assert "PLAY [Base system on every host]" not in run.output, run.output[-3000:]
    assert all(counts["changed"] == 0 for counts in run.recap().values())


def known_hosts_lines(host_exec, host: str) -> set[str]:
    out = host_exec(host, "cat", "/etc/ssh/ssh_known_hosts")
    assert out.returncode == 0, out.stderr
    return {line for line in out.stdout.splitlines() if line and not line.startswith("#")}


def test_every_host_knows_every_hosts_current_keys(lab, host_exec):
    known = {knower: known_hosts_lines(host_exec, knower) for knower in HOSTS}
    for host in HOSTS:
        names = f"{host},{host}.lab.test,{lab[host]['address']}"
        for key_file in ("ssh_host_ed25519_key.pub", "ssh_host_ecdsa_key.pub", "ssh_host_rsa_key.pub"):
            key_type, key = host_exec(host, "cat", f"/etc/ssh/{key_file}").stdout.split()[:2]
            for knower, lines in known.items():
                assert f"{names} {key_type} {key}" in lines, (knower, host)


def test_a_member_sshes_between_nodes_with_strict_host_key_checking(lab, agent):
    """alice (LDAP, no known_hosts of her own) logs in to gpu01 with her agent, then ssh-es on by name, by
    FQDN and by address: every host key is verified against /etc/ssh/ssh_known_hosts alone."""
    hops = [("gpu01", "gpu02", "gpu02"), ("gpu01", "gpu02.lab.test", "gpu02")]
    hops.append(("gpu02", lab["gpu01"]["address"], "gpu01"))
    for node, target, expected in hops:
        hop = (
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/dev/null "
            f"-o ConnectTimeout=10 {target} hostname"
        )
        out = ssh(lab[node]["address"], "alice", hop, extra=("-A",), env=agent)
        assert out.returncode == 0, (node, target, out.stderr)
        assert out.stdout.strip() == expected


def test_rebuild_node_needs_exactly_one_host(lab):
    run = run_playbook("rebuild-node.yml")
    assert run.rc != 0
    assert "run it with -l HOST" in run.output


def test_rebuild_node_converges_one_host_and_reports_health(lab):
    run = run_playbook("rebuild-node.yml", "-l", "gpu02")
    assert run.rc == 0, run.output[-3000:]
    assert set(run.recap()) == {"gpu02"}
    assert "systemd: running; failed units: none" in run.output
    assert re.search(r"running: .*chrony.*ssh", run.output)
