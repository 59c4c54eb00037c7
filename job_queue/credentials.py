"""``labq credentials``: the one-time helper that lets a member's jobs reach the study database and MLflow.

It asks the member's LDAP password (never from the command line or the environment), checks it against
the lab's portal first (an HTTPS GET of ``<mlflow_tracking_uri>/health``, which needs the portal's login,
trusting only the portal CA of labq's config: a 401 means a wrong password and nothing is written), then
writes in the home:

- ``~/.pgpass``: the line ``host:port:*:login:password`` for the study database (libpq escaping); any
  other line of the file is kept, an older line for the same server and login is replaced;
- ``~/.mlflow/credentials``: ``[mlflow]`` with ``mlflow_tracking_username``/``mlflow_tracking_password``
  (the rest of the file kept);
- ``~/.postgresql/root.crt``: the database CA (certificates already there for other servers are kept);
- ``~/.mlflow/labkit-ca.crt``: the portal CA (what ``MLFLOW_TRACKING_SERVER_CERT_PATH`` names in jobs).

Each file is written whole to a temporary file beside it (mode 0600) and renamed over the old one, in a
directory of mode 0700. ``--check`` tells what is in place (and whether the portal still accepts the
stored login) without showing a password.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import os
import pwd
import re
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .experiments import MLFLOW_CA, MLFLOW_CREDENTIALS, PG_ROOT_CERT, PGPASS, Experiments

CHECK_PATH = "/health"  # behind the portal's login like all of /mlflow; needs no MLflow permission
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.S)
_MLFLOW_KEYS = ("mlflow_tracking_username", "mlflow_tracking_password")


class CredentialsError(Exception):
    """Something the member must fix (the message says what); nothing was written."""


class WrongPassword(CredentialsError):
    pass


# ------------------------------------------------------------------ the portal
def check_login(exp: Experiments, login: str, password: str, timeout: float = 20.0) -> None:
    """Raise WrongPassword if the portal refuses ``login``/``password`` (401), CredentialsError if it
    cannot be asked (TLS, network, another answer); return if it accepts them."""
    url = exp.mlflow_tracking_uri + CHECK_PATH
    try:
        ctx = ssl.create_default_context(cafile=exp.mlflow_ca_file)  # only the lab's CA, no system CAs
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot read the portal CA {exp.mlflow_ca_file}: {exc}") from exc
    token = base64.b64encode(f"{login}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})  # noqa: S310 - https only
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=ctx) as answer:  # noqa: S310
            answer.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise WrongPassword(f"the portal refused the login of {login}: wrong password "
                                "(nothing was written)") from None
        raise CredentialsError(f"the portal answered {exc.code} {exc.reason} for {url} "
                               "(nothing was written)") from None
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise CredentialsError(f"cannot reach the portal at {url}: {why} (nothing was written)") from None


# ------------------------------------------------------------------ file contents
def pgpass_escape(field: str) -> str:
    return field.replace("\\", "\\\\").replace(":", "\\:")


def _pgpass_fields(line: str) -> list[str]:
    fields: list[str] = []
    cur, i = "", 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            cur += line[i + 1]
            i += 2
            continue
        if ch == ":" and len(fields) < 4:
            fields.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    fields.append(cur)
    return fields


def pgpass_text(old: str, host: str, port: int, login: str, password: str) -> str:
    """``old`` with the line for (host, port, login) replaced by one with ``password`` (any database)."""
    if "\n" in password or "\r" in password:
        raise CredentialsError("the password contains a line break; libpq's password file cannot hold it")
    keep = []
    for line in old.splitlines():
        f = _pgpass_fields(line)
        ours = (not line.lstrip().startswith("#") and len(f) == 5 and f[0] == host and f[1] == str(port)
                and f[3] == login)
        if not ours:
            keep.append(line)
    mine = ":".join(pgpass_escape(x) for x in (host, str(port), "*", login, password))
    return "\n".join([*keep, mine]) + "\n"


def mlflow_text(old: str, login: str, password: str) -> str:
    """``old`` with ``[mlflow]``'s username and password set (read with configparser, as MLflow does:
    ``%`` is doubled; leading or trailing blanks and line breaks cannot be stored)."""
    if password != password.strip() or "\n" in password or "\r" in password or not password:
        raise CredentialsError("the password starts or ends with a blank or holds a line break; "
                               "MLflow's credentials file cannot hold it")
    out: list[str] = []
    section = ""
    placed = False
    values = (login, password)
    new = [f"{key} = {value.replace('%', '%%')}" for key, value in zip(_MLFLOW_KEYS, values, strict=True)]
    for line in old.splitlines():
        head = re.fullmatch(r"\s*\[([^\]]*)\]\s*", line)
        if head:
            section = head.group(1).strip()
            out.append(line)
            if section == "mlflow" and not placed:
                out += new
                placed = True
            continue
        key = re.split(r"\s*[=:]", line.strip(), maxsplit=1)[0].lower()
        if section == "mlflow" and key in _MLFLOW_KEYS:
            continue
        out.append(line)
    if not placed:
        if out and out[-1].strip():
            out.append("")
        out += ["[mlflow]", *new]
    return "\n".join(out) + "\n"


def merged_certs(old: str, new: str, source: str) -> str:
    """The certificates of ``old`` with those of ``new`` added (each once)."""
    add = [m.group(0) for m in _PEM.finditer(new)]
    if not add:
        raise CredentialsError(f"{source} holds no PEM certificate")
    have = [m.group(0) for m in _PEM.finditer(old)]
    return "\n".join(dict.fromkeys(have + add)) + "\n"


# ------------------------------------------------------------------ writing
def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # noqa: PTH101 - an existing directory made wider by hand is narrowed


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once (a temporary 0600 file beside it, renamed over it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # noqa: PTH105
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # noqa: PTH108
        raise


@dataclass
class Plan:
    """Every file and its new content, computed before any is written."""

    files: list[tuple[Path, str]]


def plan(exp: Experiments, login: str, home: Path, password: str) -> Plan:
    files: list[tuple[Path, str]] = []
    if exp.study_db:
        pgpass = pgpass_text(_read(home / PGPASS), exp.study_db_host, exp.study_db_port, login, password)
        root = merged_certs(_read(home / PG_ROOT_CERT), _read_ca(exp.study_db_ca_file), exp.study_db_ca_file)
        files += [(home / PGPASS, pgpass), (home / PG_ROOT_CERT, root)]
    if exp.mlflow:
        creds = mlflow_text(_read(home / MLFLOW_CREDENTIALS), login, password)
        ca = merged_certs("", _read_ca(exp.mlflow_ca_file), exp.mlflow_ca_file)
        files += [(home / MLFLOW_CREDENTIALS, creds), (home / MLFLOW_CA, ca)]
    return Plan(files)


def _read_ca(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read the lab's CA certificate {path}: {exc.strerror}") from exc


def setup(exp: Experiments, login: str, home: Path, password: str, *, verify: bool = True,
          checker: Callable[[Experiments, str, str], None] = check_login) -> list[Path]:
    """Check the password, then write every file; the paths written."""
    if not (exp.study_db or exp.mlflow):
        raise CredentialsError("this node's labq config sets neither a study database nor MLflow "
                               "([experiments] in the config): nothing to set up")
    if not password:
        raise CredentialsError("empty password: nothing was written")
    if verify:
        if not exp.mlflow:
            raise CredentialsError("no portal is configured to check the password against "
                                   "(experiments.mlflow_tracking_uri); use --no-check to write it unchecked")
        checker(exp, login, password)
    todo = plan(exp, login, home, password)
    for path, text in todo.files:
        if path.parent != home:
            _private_dir(path.parent)
        write_private(path, text)
    return [p for p, _ in todo.files]


# ------------------------------------------------------------------ --check
def _mode_ok(path: Path) -> bool:
    return path.stat().st_mode & 0o077 == 0


def stored_mlflow_password(text: str, login: str) -> str | None:
    import configparser

    cp = configparser.ConfigParser()
    try:
        cp.read_string(text)
        sec = cp["mlflow"]
    except (configparser.Error, KeyError):
        return None
    if sec.get(_MLFLOW_KEYS[0]) != login:
        return None
    return sec.get(_MLFLOW_KEYS[1]) or None


def status(exp: Experiments, login: str, home: Path, *, ask_portal: bool = True,
           checker: Callable[[Experiments, str, str], None] = check_login) -> tuple[list[str], bool]:
    """Lines describing what is set up (no secret in them) and whether all of it is."""
    lines: list[str] = []
    ok = True

    def item(good: bool, text: str) -> None:
        nonlocal ok
        ok = ok and good
        lines.append(f"{'ok     ' if good else 'MISSING'} {text}")

    if not (exp.study_db or exp.mlflow):
        return ["this node's labq config sets neither a study database nor MLflow: nothing to set up"], True
    if exp.study_db:
        path = home / PGPASS
        want = (exp.study_db_host, str(exp.study_db_port))
        have = any(len(f) == 5 and (f[0], f[1]) == want and f[3] == login and f[4]
                   for f in map(_pgpass_fields, _read(path).splitlines()))
        where = f"{exp.study_db_host}:{exp.study_db_port}"
        item(have and _mode_ok(path), f"~/{PGPASS}: a password for {login} at {where}" + (
            "" if not have or _mode_ok(path) else " (but the file is readable by others: chmod 600)"))
        item(_has_ca(home / PG_ROOT_CERT, exp.study_db_ca_file), f"~/{PG_ROOT_CERT}: the database CA")
    if exp.mlflow:
        path = home / MLFLOW_CREDENTIALS
        stored = stored_mlflow_password(_read(path), login)
        item(stored is not None and _mode_ok(path), f"~/{MLFLOW_CREDENTIALS}: the MLflow login of {login}")
        item(_has_ca(home / MLFLOW_CA, exp.mlflow_ca_file), f"~/{MLFLOW_CA}: the portal CA")
        if stored is not None and ask_portal:
            try:
                checker(exp, login, stored)
                item(True, "the portal accepts the stored login")
            except WrongPassword:
                item(False, "the portal refuses the stored password (changed?): run labq credentials again")
            except CredentialsError as exc:
                item(False, f"could not ask the portal: {exc}".replace(" (nothing was written)", ""))
    return lines, ok


def _has_ca(path: Path, source: str) -> bool:
    try:
        want = {m.group(0) for m in _PEM.finditer(Path(source).read_text())}
    except OSError:
        return False
    have = {m.group(0) for m in _PEM.finditer(_read(path))}
    return bool(want) and want <= have


# ------------------------------------------------------------------ the command
def read_password(from_stdin: bool, stdin: TextIO, login: str) -> str:
    if from_stdin:
        line = stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    return getpass.getpass(f"LDAP password of {login}: ")


def caller() -> tuple[str, Path]:
    """The caller's login and home (their passwd entry: the home labq mounts into their jobs)."""
    pw = pwd.getpwuid(os.getuid())
    return pw.pw_name, Path(pw.pw_dir)


def main(exp: Experiments, *, check: bool, password_stdin: bool, no_check: bool,
         login: str | None = None, home: Path | None = None, stdin: TextIO | None = None) -> int:
    if login is None or home is None:
        login, home = caller()
    if check:
        lines, ok = status(exp, login, home)
        print("\n".join(lines))
        return 0 if ok else 1
    try:
        password = read_password(password_stdin, stdin or sys.stdin, login)
        written = setup(exp, login, home, password, verify=not no_check)
    except CredentialsError as exc:
        print(f"labq credentials: {exc}", file=sys.stderr)
        return 4 if isinstance(exc, WrongPassword) else 1
    except (EOFError, KeyboardInterrupt):
        print("labq credentials: no password given; nothing was written", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote ~/{path.relative_to(home)} (mode 0600)")
    return 0
