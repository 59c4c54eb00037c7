"""The lab's experiment services as jobs see them: the study database and MLflow (config ``[experiments]``).

Every setting is optional; an empty ``[experiments]`` table (the default) turns the feature off. With
``study_db_host`` set, each job container gets ``LABKIT_STUDY_DB``, a PostgreSQL URL for the member's own
database (named like the login, as their role) with ``sslmode=verify-full`` and no password: libpq reads it
from ``~/.pgpass`` (``PGPASSFILE``) and checks the server against ``~/.postgresql/root.crt``
(``PGSSLROOTCERT``), both written once by ``labq credentials`` (job_queue/credentials.py). The two
``PG*`` paths are set explicitly because a job image rarely has the member in its ``/etc/passwd``, and
libpq finds ``~`` through ``getpwuid``. With ``mlflow_tracking_uri`` set, jobs get ``MLFLOW_TRACKING_URI``
and ``MLFLOW_TRACKING_SERVER_CERT_PATH`` (the home copy of the portal's CA); MLflow's client reads the
login from ``~/.mlflow/credentials``. No password is ever part of a job's environment.

``extra_hosts`` (name -> address) are added to the containers' ``/etc/hosts`` (Docker's ``extra_hosts``),
for labs whose job containers cannot resolve the portal's or the database's name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

ENV_STUDY_DB = "LABKIT_STUDY_DB"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_TRACKING_CERT = "MLFLOW_TRACKING_SERVER_CERT_PATH"
ENV_PGPASSFILE = "PGPASSFILE"
ENV_PGSSLROOTCERT = "PGSSLROOTCERT"

# Where `labq credentials` writes, relative to the member's home (the job sees the same home).
PGPASS = ".pgpass"
PG_ROOT_CERT = ".postgresql/root.crt"
MLFLOW_CREDENTIALS = ".mlflow/credentials"
MLFLOW_CA = ".mlflow/labkit-ca.crt"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")

KNOWN_KEYS = frozenset({"study_db_host", "study_db_port", "study_db_ca_file", "mlflow_tracking_uri",
                        "mlflow_ca_file", "extra_hosts"})


class ExperimentsConfigError(ValueError):
    """A wrong value in the ``[experiments]`` table (the message names the key)."""


@dataclass(frozen=True)
class Experiments:
    study_db_host: str = ""
    """Host name of the study database (the name in its certificate); empty: no LABKIT_STUDY_DB."""
    study_db_port: int = 5432
    study_db_ca_file: str = ""
    """The database CA's certificate on this node (copied to ~/.postgresql/root.crt by labq credentials)."""
    mlflow_tracking_uri: str = ""
    """The portal's MLflow, e.g. https://portal.lab.example.org/mlflow; empty: no MLflow settings."""
    mlflow_ca_file: str = ""
    """The portal CA's certificate on this node (copied to ~/.mlflow/labkit-ca.crt)."""
    extra_hosts: dict[str, str] = field(default_factory=dict)
    """Name -> address lines added to every job container's /etc/hosts."""

    @property
    def study_db(self) -> bool:
        return bool(self.study_db_host)

    @property
    def mlflow(self) -> bool:
        return bool(self.mlflow_tracking_uri)


def _key(name: str) -> str:
    return f"config: 'experiments.{name}'"


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host))
    return True


def parse_experiments(data: Any) -> Experiments:
    if not isinstance(data, dict):
        raise ExperimentsConfigError("config: 'experiments' must be a table")
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise ExperimentsConfigError(f"config: unknown key 'experiments.{unknown[0]}'")
    for name in ("study_db_host", "study_db_ca_file", "mlflow_tracking_uri", "mlflow_ca_file"):
        if name in data and not isinstance(data[name], str):
            raise ExperimentsConfigError(f"{_key(name)} must be a string")
    host = data.get("study_db_host", "")
    if host and not _host_ok(host):
        raise ExperimentsConfigError(f"{_key('study_db_host')} must be a host name or address, not '{host}'")
    port = data.get("study_db_port", 5432)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ExperimentsConfigError(f"{_key('study_db_port')} must be a port number (1-65535)")
    for name in ("study_db_ca_file", "mlflow_ca_file"):
        value = data.get(name, "")
        if value and not value.startswith("/"):
            raise ExperimentsConfigError(f"{_key(name)} must be an absolute path, not '{value}'")
    uri = data.get("mlflow_tracking_uri", "")
    if uri:
        parts = urlsplit(uri)
        if parts.scheme != "https" or not parts.hostname or parts.username or parts.password or parts.query:
            raise ExperimentsConfigError(f"{_key('mlflow_tracking_uri')} must be an https:// URL without "
                                         "a login or query, e.g. https://portal.example.org/mlflow "
                                         f"(not '{uri}')")
    if host and not data.get("study_db_ca_file"):
        raise ExperimentsConfigError(f"{_key('study_db_ca_file')} is needed with study_db_host "
                                     "(the database CA jobs verify the server against)")
    if uri and not data.get("mlflow_ca_file"):
        raise ExperimentsConfigError(f"{_key('mlflow_ca_file')} is needed with mlflow_tracking_uri "
                                     "(the portal CA MLflow's client trusts)")
    hosts = data.get("extra_hosts", {})
    if not isinstance(hosts, dict):
        raise ExperimentsConfigError(f"{_key('extra_hosts')} must be a table of name = \"address\"")
    for name, address in hosts.items():
        if not _HOSTNAME.fullmatch(name) or name.replace(".", "").isdigit():
            raise ExperimentsConfigError(f"{_key('extra_hosts')}: '{name}' is not a host name")
        try:
            ipaddress.ip_address(address if isinstance(address, str) else "")
        except ValueError:
            raise ExperimentsConfigError(f"{_key('extra_hosts')}: the address of '{name}' must be an IP "
                                         f"address, not {address!r}") from None
    return Experiments(study_db_host=host, study_db_port=port,
                       study_db_ca_file=data.get("study_db_ca_file", ""),
                       mlflow_tracking_uri=uri.rstrip("/"), mlflow_ca_file=data.get("mlflow_ca_file", ""),
                       extra_hosts=dict(hosts))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def study_db_url(exp: Experiments, login: str) -> str:
    """The member's study database: no password (libpq's password file), the server's name verified."""
    user = quote(login, safe="")
    return f"postgresql://{user}@{_url_host(exp.study_db_host)}:{exp.study_db_port}/{user}?sslmode=verify-full"


def job_env(exp: Experiments, login: str, home: str) -> dict[str, str]:
    """The variables a job of ``login`` (home ``home``) gets for the lab's experiment services."""
    env: dict[str, str] = {}
    home = home.rstrip("/") or "/"
    if exp.study_db:
        env[ENV_STUDY_DB] = study_db_url(exp, login)
        env[ENV_PGPASSFILE] = f"{home}/{PGPASS}"
        env[ENV_PGSSLROOTCERT] = f"{home}/{PG_ROOT_CERT}"
    if exp.mlflow:
        env[ENV_TRACKING_URI] = exp.mlflow_tracking_uri
        env[ENV_TRACKING_CERT] = f"{home}/{MLFLOW_CA}"
    return env
