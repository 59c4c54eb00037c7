"""The lab's experiment services from the job side: the ``[experiments]`` config, the job environment (both
runners), and ``labq credentials`` against a real HTTPS server on loopback with a throwaway CA."""

from __future__ import annotations

import base64
import configparser
import datetime
import http.server
import io
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from job_queue import cli, credentials
from job_queue.config import ConfigError, parse_config
from job_queue.credentials import CredentialsError, WrongPassword, pgpass_text, setup, status
from job_queue.experiments import Experiments, job_env, parse_experiments, study_db_url
from job_queue.models import Job, JobSpec, JobState
from job_queue.runtime import container_options
from job_queue.slurm import SlurmJob
from job_queue.slurm_runner import slurm_container_options

EXP = {
    "study_db_host": "db.lab.test", "study_db_port": 5433, "study_db_ca_file": "/etc/labq/ca/study-db-ca.crt",
    "mlflow_tracking_uri": "https://portal.lab.test/mlflow/", "mlflow_ca_file": "/etc/labq/ca/portal-ca.crt",
    "extra_hosts": {"portal.lab.test": "172.30.57.10", "db.lab.test": "172.30.57.10"},
}
ENV_NAMES = {"LABKIT_STUDY_DB", "PGPASSFILE", "PGSSLROOTCERT", "MLFLOW_TRACKING_URI",
             "MLFLOW_TRACKING_SERVER_CERT_PATH"}


def _job(user: str = "alice", env: dict[str, str] | None = None) -> Job:
    spec = JobSpec(user=user, uid=1001, gid=1001, groups=[1001], home=f"/home/{user}", cwd=f"/home/{user}",
                   image="img", command=["python3", "train.py"], gpus=1, name="t", env=env or {})
    return Job(id=7, spec=spec, state=JobState.RUNNING, submit_time=0.0, assigned_gpus=["GPU-fake-0"])


# ---------------------------------------------------------------- config
def test_experiments_are_off_unless_configured() -> None:
    cfg = parse_config({})
    assert not cfg.experiments.study_db and not cfg.experiments.mlflow
    env = container_options(_job(), cfg)["environment"]
    assert not ENV_NAMES & set(env)
    assert "extra_hosts" not in container_options(_job(), cfg)


def test_experiments_config_is_read() -> None:
    exp = parse_config({"experiments": EXP}).experiments
    assert exp.study_db_host == "db.lab.test" and exp.study_db_port == 5433
    assert exp.mlflow_tracking_uri == "https://portal.lab.test/mlflow"  # trailing slash dropped
    assert exp.extra_hosts["portal.lab.test"] == "172.30.57.10"


@pytest.mark.parametrize(("change", "word"), [
    ({"bogus": 1}, "experiments.bogus"),
    ({"study_db_host": "db.lab.test/x"}, "experiments.study_db_host"),
    ({"study_db_host": 5}, "experiments.study_db_host"),
    ({"study_db_port": 0}, "experiments.study_db_port"),
    ({"study_db_port": "5432"}, "experiments.study_db_port"),
    ({"study_db_port": True}, "experiments.study_db_port"),
    ({"study_db_ca_file": "ca.crt"}, "experiments.study_db_ca_file"),
    ({"study_db_ca_file": ""}, "experiments.study_db_ca_file"),
    ({"mlflow_tracking_uri": "http://portal.lab.test/mlflow"}, "experiments.mlflow_tracking_uri"),
    ({"mlflow_tracking_uri": "https://alice:pw@portal.lab.test/mlflow"}, "experiments.mlflow_tracking_uri"),
    ({"mlflow_ca_file": ""}, "experiments.mlflow_ca_file"),
    ({"extra_hosts": {"portal.lab.test": "not-an-ip"}}, "experiments.extra_hosts"),
    ({"extra_hosts": {"bad name": "10.0.0.1"}}, "experiments.extra_hosts"),
    ({"extra_hosts": ["portal.lab.test"]}, "experiments.extra_hosts"),
])
def test_bad_experiments_settings_are_refused_by_name(change: dict[str, Any], word: str) -> None:
    with pytest.raises(ConfigError, match=word.replace(".", r"\.")):
        parse_config({"experiments": {**EXP, **change}})


def test_experiments_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="'experiments' must be a table"):
        parse_config({"experiments": "on"})


# ---------------------------------------------------------------- job environment
def test_study_db_url_has_the_login_and_no_password() -> None:
    exp = parse_experiments(EXP)
    assert study_db_url(exp, "alice") == "postgresql://alice@db.lab.test:5433/alice?sslmode=verify-full"
    v6 = parse_experiments({**EXP, "study_db_host": "fd00::5"})
    assert study_db_url(v6, "bob") == "postgresql://bob@[fd00::5]:5433/bob?sslmode=verify-full"


def test_job_containers_get_the_services_and_the_extra_hosts() -> None:
    cfg = parse_config({"experiments": EXP, "gpus": ["GPU-fake-0"]})
    opts = container_options(_job(), cfg)
    env = opts["environment"]
    assert env["LABKIT_STUDY_DB"] == "postgresql://alice@db.lab.test:5433/alice?sslmode=verify-full"
    assert env["PGPASSFILE"] == "/home/alice/.pgpass"
    assert env["PGSSLROOTCERT"] == "/home/alice/.postgresql/root.crt"
    assert env["MLFLOW_TRACKING_URI"] == "https://portal.lab.test/mlflow"
    assert env["MLFLOW_TRACKING_SERVER_CERT_PATH"] == "/home/alice/.mlflow/labkit-ca.crt"
    assert opts["extra_hosts"] == {"db.lab.test": "172.30.57.10", "portal.lab.test": "172.30.57.10"}
    # A job's own --env may point elsewhere; labq's own variables still win over --env.
    own = container_options(_job(env={"LABKIT_STUDY_DB": "sqlite:///x.db", "LABQ_JOB_ID": "9"}), cfg)
    assert own["environment"]["LABKIT_STUDY_DB"] == "sqlite:///x.db"
    assert own["environment"]["LABQ_JOB_ID"] == "7"
    # Only the database, only MLflow.
    only_db = parse_experiments({k: v for k, v in EXP.items() if not k.startswith("mlflow")})
    db = job_env(only_db, "bob", "/h/bob/")
    assert set(db) == {"LABKIT_STUDY_DB", "PGPASSFILE", "PGSSLROOTCERT"}
    assert db["PGPASSFILE"] == "/h/bob/.pgpass"
    ml = job_env(parse_experiments({k: v for k, v in EXP.items() if not k.startswith("study")}), "bob", "/h/")
    assert set(ml) == {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_SERVER_CERT_PATH"}


def test_slurm_job_containers_get_the_same_settings() -> None:
    cfg = parse_config({"experiments": EXP, "gpus": ["GPU-fake-0"]})
    sj = SlurmJob(id=7, user="alice", uid=1001, state="RUNNING", nodes=("gpu01",),
                  batch_host="gpu01", gpu_indices=(0,), raw={})
    opts = slurm_container_options(_job(), sj, cfg, "gpu01", "/slurm/job_7/step_batch", ["/dev/nvidia0"])
    env = opts["environment"]
    assert env["LABKIT_STUDY_DB"].startswith("postgresql://alice@db.lab.test:5433/alice?")
    assert env["MLFLOW_TRACKING_URI"] == "https://portal.lab.test/mlflow" and env["SLURM_JOB_ID"] == "7"
    assert opts["extra_hosts"]["portal.lab.test"] == "172.30.57.10"
    assert opts["cgroup_parent"] == "/slurm/job_7/step_batch"
    assert not any("pw" in v.lower() or "password" in v.lower() for v in env.values())


# ---------------------------------------------------------------- a portal on loopback
def _ca_and_cert(tmp: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 it signs: (ca.crt, server.crt, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])

    def builder(subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1)))

    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
    ca = (builder(ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage, critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    loopback = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key.public_key())
            .add_extension(loopback, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = (tmp / f"{name}-ca.crt", tmp / f"{name}.crt", tmp / f"{name}.key")
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    private = serialization.PrivateFormat.PKCS8
    paths[2].write_bytes(key.private_bytes(pem, private, serialization.NoEncryption()))
    return paths


class Portal:
    """An HTTPS server on 127.0.0.1 that answers /mlflow/ requests with Basic auth of one member."""

    def __init__(self, tmp: Path, name: str = "portal") -> None:
        self.ca, cert, key = _ca_and_cert(tmp, name)
        self.passwords = {"alice": "s3cr:et\\%pw"}
        self.seen: list[str] = []
        portal = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                portal.seen.append(self.path)
                sent = self.headers.get("Authorization", "")
                good = {"Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()
                        for u, p in portal.passwords.items()}
                if self.path != "/mlflow/health" or sent not in good:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="lab"')
                    self.end_headers()
                    return
                body = json.dumps({"experiments": []}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/mlflow"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[Portal]:
    p = Portal(tmp_path)
    yield p
    p.close()


def _exp(portal: Portal, tmp: Path) -> Experiments:
    db_ca, _, _ = _ca_and_cert(tmp, "db")
    return parse_experiments({"study_db_host": "db.lab.test", "study_db_port": 5432,
                              "study_db_ca_file": str(db_ca), "mlflow_tracking_uri": portal.url,
                              "mlflow_ca_file": str(portal.ca)})


def _tree(home: Path) -> dict[str, str]:
    return {str(p.relative_to(home)): p.read_text() for p in sorted(home.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- labq credentials
def test_credentials_writes_private_files_and_keeps_other_lines(portal: Portal, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    exp = _exp(portal, tmp_path)
    other_ca = _ca_and_cert(tmp_path, "other")[0].read_text()
    (home / ".pgpass").write_text("other.host:5432:*:alice:keep-me\ndb.lab.test:5432:*:alice:old-pw\n"
                                  "db.lab.test:5432:*:carol:carols\n# a comment\n")
    (home / ".mlflow").mkdir(mode=0o755)
    (home / ".mlflow" / "credentials").write_text(
        "[other]\nkey = value\n\n[mlflow]\nmlflow_tracking_username = x\nmlflow_tracking_password = old\n"
        "extra = 1\n")
    (home / ".postgresql").mkdir()
    (home / ".postgresql" / "root.crt").write_text(other_ca)
    password = portal.passwords["alice"]
    written = setup(exp, "alice", home, password)
    assert portal.seen == ["/mlflow/health"]
    assert {p.relative_to(home).as_posix() for p in written} == {
        ".pgpass", ".postgresql/root.crt", ".mlflow/credentials", ".mlflow/labkit-ca.crt"}
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for d in (home / ".mlflow", home / ".postgresql"):
        assert d.stat().st_mode & 0o777 == 0o700, d
    assert not [p for p in home.rglob("*.tmp")]
    # libpq's format: ':' and '\' escaped with '\'; the old line for this server and login replaced only.
    assert (home / ".pgpass").read_text().splitlines() == [
        "other.host:5432:*:alice:keep-me", "db.lab.test:5432:*:carol:carols", "# a comment",
        "db.lab.test:5432:*:alice:s3cr\\:et\\\\%pw"]
    # Read back as MLflow reads it (configparser with interpolation): the exact password; other keys kept.
    cp = configparser.ConfigParser()
    cp.read(home / ".mlflow" / "credentials")
    assert cp["mlflow"]["mlflow_tracking_username"] == "alice"
    assert cp["mlflow"]["mlflow_tracking_password"] == password
    assert cp["mlflow"]["extra"] == "1" and cp["other"]["key"] == "value"
    # The lab's CAs: the database's added to root.crt (the other server's kept), the portal's copied.
    root = (home / ".postgresql" / "root.crt").read_text()
    assert other_ca.strip() in root and Path(exp.study_db_ca_file).read_text().strip() in root
    assert (home / ".mlflow" / "labkit-ca.crt").read_text().strip() == portal.ca.read_text().strip()
    # Twice gives the same files (no duplicated line or certificate).
    before = _tree(home)
    setup(exp, "alice", home, password)
    assert _tree(home) == before


def test_mlflow_reads_the_credentials_file(portal: Portal, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    creds = pytest.importorskip("mlflow.utils.credentials", reason="mlflow is not installed in this venv")
    home = tmp_path / "home"
    home.mkdir()
    setup(_exp(portal, tmp_path), "alice", home, portal.passwords["alice"])
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert creds.read_mlflow_creds() == ("alice", portal.passwords["alice"])


def test_a_wrong_password_writes_nothing(portal: Portal, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pgpass").write_text("db.lab.test:5432:*:alice:old-pw\n")
    before = _tree(home)
    with pytest.raises(WrongPassword, match="wrong password"):
        setup(_exp(portal, tmp_path), "alice", home, "not-her-password")
    assert _tree(home) == before
    assert not (home / ".mlflow").exists() and not (home / ".postgresql").exists()


def test_a_portal_with_another_ca_is_not_trusted(tmp_path: Path) -> None:
    stranger = Portal(tmp_path, "stranger")
    try:
        lab_ca = _ca_and_cert(tmp_path, "lab")[0]
        exp = parse_experiments({"mlflow_tracking_uri": stranger.url, "mlflow_ca_file": str(lab_ca)})
        home = tmp_path / "home"
        home.mkdir()
        with pytest.raises(CredentialsError, match="cannot reach the portal") as err:
            setup(exp, "alice", home, stranger.passwords["alice"])
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) and not isinstance(err.value, WrongPassword)
        assert stranger.seen == [] and _tree(home) == {}
    finally:
        stranger.close()


def test_passwords_the_files_cannot_hold_are_refused() -> None:
    with pytest.raises(CredentialsError, match="line break"):
        pgpass_text("", "h", 5432, "alice", "a\nb")
    with pytest.raises(CredentialsError, match="blank"):
        credentials.mlflow_text("", "alice", " padded")


def test_check_tells_what_is_set_up_without_secrets(portal: Portal, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    exp = _exp(portal, tmp_path)
    lines, ok = status(exp, "alice", home)
    assert not ok and len([x for x in lines if x.startswith("MISSING")]) == 4, lines
    password = portal.passwords["alice"]
    setup(exp, "alice", home, password)
    lines, ok = status(exp, "alice", home)
    assert ok, lines
    assert "the portal accepts the stored login" in lines[-1]
    assert not any(password in x or "s3cr" in x for x in lines)
    portal.passwords["alice"] = "changed-in-ldap"
    lines, ok = status(exp, "alice", home)
    assert not ok and "refuses the stored password" in lines[-1]
    (home / ".pgpass").chmod(0o644)
    lines, _ = status(exp, "alice", home, ask_portal=False)
    assert "chmod 600" in lines[0]


def test_the_cli_reads_the_password_from_stdin_only(portal: Portal, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    exp = _exp(portal, tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f"""[experiments]
study_db_host = "db.lab.test"
study_db_ca_file = "{exp.study_db_ca_file}"
mlflow_tracking_uri = "{portal.url}"
mlflow_ca_file = "{portal.ca}"
""")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(credentials, "caller", lambda: ("alice", home))
    monkeypatch.setattr("sys.stdin", io.StringIO("wrong\n"))
    assert cli.main(["--config", str(config), "credentials", "--password-stdin"]) == cli.EXIT_PERMISSION
    assert "wrong password" in capsys.readouterr().err and _tree(home) == {}
    monkeypatch.setattr("sys.stdin", io.StringIO(portal.passwords["alice"] + "\n"))
    assert cli.main(["--config", str(config), "credentials", "--password-stdin"]) == 0
    out = capsys.readouterr().out
    assert "wrote ~/.pgpass (mode 0600)" in out and portal.passwords["alice"] not in out
    assert cli.main(["--config", str(config), "credentials", "--check"]) == 0
    assert portal.passwords["alice"] not in capsys.readouterr().out
    # A node without the services: said plainly, nothing written.
    bare = tmp_path / "bare.toml"
    bare.write_text("")
    monkeypatch.setattr("sys.stdin", io.StringIO("x\n"))
    assert cli.main(["--config", str(bare), "credentials", "--password-stdin"]) == 1
    assert "nothing to set up" in capsys.readouterr().err


# ---------------------------------------------------------------- a real job
@pytest.mark.docker
def test_a_real_job_sees_the_services_and_the_extra_hosts(make_labqd: Any, users: dict[str, Any]) -> None:
    """One container on the real engine: its environment and /etc/hosts as the job itself reads them."""
    d = make_labqd(extra_config="""
[experiments]
study_db_host = "db.lab.test"
study_db_ca_file = "/etc/labq/ca/study-db-ca.crt"
mlflow_tracking_uri = "https://portal.lab.test/mlflow"
mlflow_ca_file = "/etc/labq/ca/portal-ca.crt"
[experiments.extra_hosts]
"portal.lab.test" = "192.0.2.10"
""")
    res = d.labq("submit", "--gpus", "0", "--", "sh", "-c", "env; cat /etc/hosts", user="alice",
                 cwd=users["alice"].pw_dir)
    assert res.returncode == 0, res.stderr
    job = d.wait_state(int(res.stdout.strip()), ("succeeded", "failed"))
    assert job["state"] == "succeeded", job
    out = d.labq("logs", str(job["id"]), user="alice").stdout
    home = users["alice"].pw_dir
    assert "LABKIT_STUDY_DB=postgresql://alice@db.lab.test:5432/alice?sslmode=verify-full" in out.splitlines()
    assert f"PGPASSFILE={home}/.pgpass" in out.splitlines()
    assert "MLFLOW_TRACKING_URI=https://portal.lab.test/mlflow" in out.splitlines()
    assert f"MLFLOW_TRACKING_SERVER_CERT_PATH={home}/.mlflow/labkit-ca.crt" in out.splitlines()
    assert any(line.split() == ["192.0.2.10", "portal.lab.test"] for line in out.splitlines()), out
    shown = d.labq("show", str(job["id"]), "--json", user="alice").stdout
    assert "LABKIT_STUDY_DB" not in shown  # the job's record holds only what was submitted
