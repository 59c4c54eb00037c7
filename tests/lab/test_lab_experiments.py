"""End-to-end checks of the lab's experiment services (playbooks/experiments.yml) on infra01.

The portal (Apache, mod_authnz_ldap) is the one way in: alice and bob log in with their LDAP passwords;
no password or a wrong one gets 401; Prometheus and Alertmanager answer lab-admins only; the study
database refuses plain-text and non-LDAP logins. The students' workflows (docs/examples/) run through labq
on the GPU nodes against the real PostgreSQL and MLflow, and a headless Chromium logs in to the portal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from lab_helpers import PORTAL_ADMIN, REPO, run_playbook

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOST = "infra01"  # db_servers and web_portals in inventory/lab/groups.yml
NAME = "infra01.lab.test"  # the portal's server name (web_portal_server_name)
BASE = "dc=lab,dc=test"
# Test-only values (inventory/lab/group_vars/all/vault_test.yml) and the members' passwords this module sets.
ADMIN_PW = "lab-test-only-ldap-admin"
PASSWORDS = {"alice": PORTAL_ADMIN[1], "bob": "bob-exp-pw-1"}  # alice: what lab_helpers.Portal sets too
ARTIFACTS = REPO / ".lab" / "artifacts"


def set_password(host_exec, member: str, password: str) -> None:
    """The reset-a-password runbook: the admin DN sets a member's LDAP password on the LDAP server."""
    out = host_exec(HOST, "ldappasswd", "-x", "-H", "ldapi:///", "-D", f"cn=admin,{BASE}", "-w", ADMIN_PW,
                    "-s", password, f"uid={member},ou=people,{BASE}")
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def members(second_run, host_exec) -> dict[str, str]:
    for member, password in PASSWORDS.items():
        set_password(host_exec, member, password)
    return PASSWORDS


@pytest.fixture(scope="module")
def portal(lab, host_exec, tmp_path_factory) -> Iterator[Callable[..., requests.Response]]:
    """GET/POST on the portal by its address, trusting only the portal's lab CA (read on infra01)."""
    ca = tmp_path_factory.mktemp("portal") / "ca.crt"
    out = host_exec(HOST, "cat", "/etc/labkit-portal/tls/labkit-portal-ca.crt")
    assert out.returncode == 0, out.stderr
    ca.write_text(out.stdout)
    base = f"https://{lab[HOST]['address']}"
    session = requests.Session()

    def call(path: str, user: str | None = None, password: str | None = None, method: str = "GET",
             **kwargs: Any) -> requests.Response:
        auth = (user, password if password is not None else PASSWORDS[user]) if user else None
        return session.request(method, base + path, auth=auth, verify=str(ca), timeout=30,
                               allow_redirects=False, **kwargs)

    call.ca = ca  # type: ignore[attr-defined]
    yield call
    session.close()


def test_the_landing_page_lists_the_services_without_a_login(portal):
    page = portal("/")
    assert page.status_code == 200, page.text[:500]
    for service in ("/mlflow/", "/optuna/", "/prometheus/", "/alertmanager/"):
        assert f'href="{service}"' in page.text, page.text[:2000]


@pytest.mark.parametrize("path", ["/mlflow/", "/optuna/", "/prometheus/", "/alertmanager/"])
def test_no_password_and_a_wrong_password_get_401(members, portal, path):
    assert portal(path).status_code == 401
    assert portal(path, "alice", "not-her-password").status_code == 401
    assert portal(path, "nobody", "whatever").status_code == 401


def test_members_reach_their_services_and_only_admins_reach_monitoring(members, portal):
    for user in ("alice", "bob"):
        assert portal("/mlflow/health", user).status_code == 200, user
        assert portal("/optuna/api/studies", user).status_code in (200, 503), user
    # alice is in lab-admins, bob is not
    assert portal("/prometheus/-/ready", "alice").status_code == 200
    assert portal("/alertmanager/-/ready", "alice").status_code == 200
    assert portal("/prometheus/-/ready", "bob").status_code in (401, 403)
    assert portal("/alertmanager/api/v2/silences", "bob").status_code in (401, 403)


def test_monitoring_is_closed_on_the_network_and_an_anonymous_silence_is_refused(
        lab, members, portal, host_exec):
    # The finding: from a GPU node (every student has a shell there) Alertmanager took an
    # anonymous silence. Now Prometheus and Alertmanager listen on loopback only, and through the portal
    # a silence needs a lab-admins login.
    address = lab[HOST]["address"]
    for port in (9090, 9093):
        tried = host_exec("gpu01", "bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}")
        assert tried.returncode != 0, f"{address}:{port} is open to gpu01"
    silence = {"matchers": [{"name": "alertname", "value": "NodeDown", "isRegex": False}],
               "startsAt": "2026-01-01T00:00:00Z", "endsAt": "2099-01-01T00:00:00Z",
               "createdBy": "anonymous", "comment": "test"}
    for user in (None, "bob"):
        answer = portal("/alertmanager/api/v2/silences", user, method="POST", json=silence)
        assert answer.status_code in (401, 403), (user, answer.status_code)
    listed = portal("/alertmanager/api/v2/silences", "alice")
    assert listed.status_code == 200 and not [s for s in listed.json() if s["createdBy"] == "anonymous"]


def test_http_redirects_to_https(lab):
    answer = requests.get(f"http://{lab[HOST]['address']}/mlflow/", allow_redirects=False, timeout=10)
    assert answer.status_code == 301
    assert answer.headers["Location"].startswith(f"https://{NAME}/")


def psql(host_exec, conninfo: str, password: str, sql: str = "SELECT current_user"):
    """psql on gpu01 (a lab host in the allowed network), as a member would connect."""
    return host_exec("gpu01", "env", f"PGPASSWORD={password}", "PGCONNECT_TIMEOUT=10", "psql", "-XAtq",
                     conninfo, "-c", sql)


@pytest.fixture(scope="module")
def db_client(second_run, host_exec) -> None:
    """PostgreSQL's client on gpu01 (the node image has none): Debian's package, through the apt proxy."""
    if host_exec("gpu01", "which", "psql").returncode != 0:
        out = host_exec("gpu01", "bash", "-c", "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                        "--no-install-recommends postgresql-client-15 >/dev/null")
        assert out.returncode == 0, out.stderr
    ca = host_exec(HOST, "cat", "/etc/postgresql/tls/labkit-db-ca.crt")
    assert ca.returncode == 0, ca.stderr
    host_exec("gpu01", "bash", "-c", f"cat > /tmp/db-ca.crt <<'EOF'\n{ca.stdout}EOF")


def test_database_logins_are_tls_and_ldap_only(members, db_client, host_exec):
    tls = f"host={NAME} dbname=alice user=alice sslmode=verify-full sslrootcert=/tmp/db-ca.crt"
    good = psql(host_exec, tls, PASSWORDS["alice"])
    assert good.returncode == 0 and good.stdout.strip() == "alice", good.stderr
    # plain text: refused by pg_hba.conf (hostnossl ... reject), even with the right password
    plain = psql(host_exec, f"host={NAME} dbname=alice user=alice sslmode=disable", PASSWORDS["alice"])
    assert plain.returncode != 0 and "no encryption" in plain.stderr, plain.stderr
    # a wrong password: LDAP says no
    wrong = psql(host_exec, tls, "not-her-password")
    assert wrong.returncode != 0 and "LDAP authentication failed" in wrong.stderr, wrong.stderr
    # not an LDAP account, and the superuser over the network
    for user in ("nobody", "postgres"):
        other = psql(host_exec, tls.replace("user=alice", f"user={user}"), "whatever")
        assert other.returncode != 0 and "authentication failed" in other.stderr, other.stderr
    # bob cannot even connect to alice's database
    bob = psql(host_exec, tls.replace("user=alice", "user=bob"), PASSWORDS["bob"])
    assert bob.returncode != 0 and "permission denied for database" in bob.stderr, bob.stderr


def services_fingerprint(host_exec) -> str:
    files = host_exec(HOST, "bash", "-c", "sha256sum /etc/postgresql/15/main/pg_hba.conf "
                      "/etc/postgresql/15/main/conf.d/*.conf /etc/apache2/sites-available/labkit-portal.conf "
                      "/etc/systemd/system/mlflow-server.service "
                      "/etc/systemd/system/optuna-dashboard.service")
    started = host_exec(HOST, "systemctl", "show", "-p", "ActiveEnterTimestamp", "postgresql@15-main",
                        "apache2", "mlflow-server", "optuna-dashboard")
    return files.stdout + files.stderr + started.stdout


BAD_INPUTS = [
    pytest.param({"postgresql_connection_limit": 0}, "postgresql_connection_limit",
                 id="connection-limit-zero"),
    pytest.param({"postgresql_allowed_networks": ["172.30.57.0/33"]}, "postgresql_allowed_networks",
                 id="network-not-a-cidr"),
    pytest.param({"postgresql_ldap_tls": "none"}, "postgresql_ldap_tls", id="ldap-without-tls"),
    pytest.param({"mlflow_server_db_password": ""}, "mlflow_server_db_password", id="mlflow-no-db-password"),
    pytest.param({"mlflow_server_port": 70000}, "mlflow_server_port", id="mlflow-port-out-of-range"),
    pytest.param({"mlflow_server_db_sslmode": "disable"}, "mlflow_server_db_sslmode",
                 id="mlflow-db-plain-text"),
    pytest.param({"optuna_dashboard_workers": 0}, "optuna_dashboard_workers", id="dashboard-no-workers"),
    pytest.param({"web_portal_https_port": "https"}, "web_portal_https_port", id="portal-port-not-a-number"),
    pytest.param({"web_portal_services": [{"name": "X", "path": "nope", "description": "d",
                                           "backend": "http://127.0.0.1:1/"}]},
                 "path", id="portal-service-path-malformed"),
]


@pytest.mark.parametrize(("extra_vars", "named"), BAD_INPUTS)
def test_bad_input_is_refused_by_name_and_changes_nothing(second_run, host_exec, extra_vars, named):
    before = services_fingerprint(host_exec)
    run = run_playbook("experiments.yml", "-e", json.dumps(extra_vars))
    assert run.rc != 0, run.output[-3000:]
    assert named in run.output, run.output[-3000:]
    for host, counts in run.recap().items():
        assert counts["changed"] == 0, f"{host} changed despite bad input:\n{run.output[-3000:]}"
    assert services_fingerprint(host_exec) == before


def artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name
