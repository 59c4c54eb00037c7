"""Helpers for the lab's end-to-end checks: run playbooks, log in over SSH, parse recaps.

Imported as `lab_helpers` (a unique module name: several test directories have a conftest.py).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB_INVENTORY = REPO / "inventory" / "lab"
ADMIN_KEY = REPO / ".lab" / "admin_ed25519"
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.M,
)


TASK_RESULT = re.compile(r"^(?P<status>ok|changed|skipping|fatal|failed): \[(?P<host>[^\]\s]+)")
INCLUDED = re.compile(r"^included: \S+ for (?P<hosts>.+)$")


@dataclass
class PlaybookRun:
    rc: int
    output: str

    def assert_changed_nothing(self, hosts: set[str] | tuple[str, ...]) -> None:
        """A second run: it succeeded on exactly these hosts and changed nothing."""
        recap = self.recap()
        assert set(recap) == set(hosts), recap
        for host, counts in recap.items():
            assert counts["changed"] == 0, f"{host} changed on a second run:\n{self.output[-4000:]}"
            assert counts["failed"] == 0, f"{host} failed:\n{self.output[-4000:]}"

    def task_results(self, task: str) -> list[dict[str, str]]:
        """Each time the task named `task` ("role : name") ran: every host's result (ok, changed, skipping,
        fatal, failed, or included for an include), in the order the run printed them."""
        runs: list[dict[str, str]] = []
        current: dict[str, str] | None = None
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [", "PLAY [")):
                current = {} if line.startswith(f"TASK [{task}]") else None
                if current is not None:
                    runs.append(current)
            elif current is not None and (m := TASK_RESULT.match(line)):
                current.setdefault(m["host"], m["status"])
            elif current is not None and (m := INCLUDED.match(line)):
                for host in m["hosts"].split(", "):
                    current.setdefault(host, "included")
        return runs

    def recap(self) -> dict[str, dict[str, int]]:
        return {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in RECAP.finditer(self.output)
        }


def run_playbook(playbook: str, *args: str, inventory: Path = LAB_INVENTORY) -> PlaybookRun:
    env = dict(
        os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"
    )
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), str(REPO / "playbooks" / playbook), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


def ssh(
    address: str,
    user: str,
    *cmd: str,
    key: Path = ADMIN_KEY,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """A real SSH login from this machine to a lab host (``env``: e.g. an ssh-agent's SSH_AUTH_SOCK;
    ``stdin``: what the command reads, e.g. a password for ``--password-stdin``)."""
    return subprocess.run(
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(key),
            *extra,
            f"{user}@{address}",
            *cmd,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=None if env is None else {**os.environ, **env},
    )


SCRATCH = REPO / ".lab" / "scratch"  # the GPU nodes' shared /srv/scratch (labctl), /scratch in jobs


def pinned(constraints: Path, package: str) -> str:
    """A package's version as a constraints file pins it (``name==version``)."""
    for line in constraints.read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.split("#")[0].strip()
    raise LookupError(f"{package} is not pinned in {constraints}")


def experiment_libs() -> str:
    """Optuna (with cmaes for its CMA-ES sampler), psycopg2 and MLflow's client for the lab's job image
    (Debian 12, python3.11) in the shared
    scratch: the versions the lab's services run (the dashboard's Optuna, the server's MLflow), so the
    students' examples run unchanged in a job. Installed once (pip, the machine's index or
    PIP_INDEX_URL's mirror); returns the path jobs see it at."""
    roles = REPO / "roles"
    optuna = pinned(roles / "optuna_dashboard" / "files" / "constraints.txt", "optuna")
    defaults = (roles / "mlflow_server" / "defaults" / "main.yml").read_text()
    mlflow = re.search(r'^mlflow_server_version: "([^"]+)"', defaults, re.M)
    assert mlflow, "mlflow_server_version not found"
    wanted = [f"optuna=={optuna}", f"mlflow-skinny=={mlflow[1]}", "psycopg2-binary==2.9.10", "cmaes==0.12.0"]
    tree = SCRATCH / ("libs-" + "-".join(w.replace("==", "") for w in wanted))
    if not (tree / "optuna").is_dir():
        tmp = tree.with_suffix(".tmp")
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        subprocess.run(
            [str(REPO / ".venv" / "bin" / "pip"), "install", "--quiet", "--no-compile", "--only-binary=:all:",
             "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "--target", str(tmp), *wanted],
            check=True, capture_output=True, timeout=900,
        )
        tmp.rename(tree)
    subprocess.run(["chmod", "-R", "a+rX", str(tree)], check=True)
    return f"/scratch/{tree.name}"


PORTAL_ADMIN = ("alice", "lab-portal-admin-pw-1")  # alice is in lab-admins (inventory/lab users.yml)


class Portal:
    """The lab's web portal (https on infra01), logged in as a member, trusting only the portal's lab CA.
    The member's LDAP password is set as the LDAP admin (the reset-a-password runbook) before the first
    request and again if the portal says 401, so it does not depend on what another test set it to."""

    def __init__(self, address: str, login: tuple[str, str] = PORTAL_ADMIN) -> None:
        import tempfile

        import requests

        self.base = f"https://{address}"
        self.login = login
        ca = subprocess.run(["docker", "exec", "labkit-infra01", "cat",
                             "/etc/labkit-portal/tls/labkit-portal-ca.crt"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".crt", delete=False) as f:
            f.write(ca)
        self.session = requests.Session()
        self.session.auth = login
        self.session.verify = f.name
        self._set_password()

    def _set_password(self) -> None:
        user, password = self.login
        run = subprocess.run(
            ["docker", "exec", "labkit-infra01", "ldappasswd", "-x", "-H", "ldapi:///", "-D",
             "cn=admin,dc=lab,dc=test", "-w", "lab-test-only-ldap-admin", "-s", password,
             f"uid={user},ou=people,dc=lab,dc=test"],
            capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr

    def get(self, path: str, **kwargs: object):  # type: ignore[no-untyped-def]
        # verify on each request: a session's own is overridden by REQUESTS_CA_BUNDLE in the environment.
        answer = self.session.get(self.base + path, timeout=30, verify=self.session.verify, **kwargs)
        if answer.status_code == 401:
            self._set_password()
            answer = self.session.get(self.base + path, timeout=30, verify=self.session.verify, **kwargs)
        return answer


@functools.cache
def lab_portal(address: str) -> Portal:
    """One logged-in Portal per address for the whole session."""
    return Portal(address)
