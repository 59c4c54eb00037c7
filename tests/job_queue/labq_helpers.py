"""Helpers and fixtures for the labq tests: a tiny local busybox image, real Unix users, a real labqd.

A uniquely named module (several test directories have a conftest.py): tests import from here,
conftest.py registers the fixtures.
"""

from __future__ import annotations

import contextlib
import grp
import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TEST_IMAGE = "labq-test-busybox:1"
APPLETS = ("sh", "true", "false", "sleep", "echo", "id", "cat", "touch", "ls", "env", "pwd", "stat",
           "kill", "head", "seq", "dd", "yes", "mkdir", "rm", "grep", "wc", "tr", "trap")
USERS = ("alice", "bob", "carol")
MEMBER_GROUP = "labqtest-members"  # alice's supplementary group, to check group propagation
ADMIN_GROUP = "labqtest-admins"  # carol's group: the test daemons' admin_group


def docker_client() -> Any:
    import docker

    return docker.from_env(timeout=60)


def _docker_ok() -> bool:
    try:
        docker_client().ping()
    except Exception:
        return False
    return True


def import_busybox_image(tag: str, applets: tuple[str, ...], extra_dirs: tuple[str, ...] = ()) -> None:
    """`docker import` an image of the host's static busybox with these applets (no registry needed)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", *extra_dirs):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
    subprocess.run(["docker", "import", "-c", "ENV PATH=/bin", "-", tag], input=buf.getvalue(),
                   check=True, capture_output=True)


@pytest.fixture(scope="session")
def test_image() -> str:
    """Build (once per machine) a busybox-only image from the host's static busybox."""
    import docker.errors

    client = docker_client()
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.get(TEST_IMAGE)
        return TEST_IMAGE
    if not Path(shutil.which("busybox") or "/bin/busybox").exists():
        pytest.fail("busybox-static is needed to build the test image (apt-get install busybox-static)")
    import_busybox_image(TEST_IMAGE, APPLETS, extra_dirs=("etc",))
    return TEST_IMAGE


@pytest.fixture(scope="session")
def users() -> dict[str, pwd.struct_passwd]:
    """Real Unix users alice, bob and carol (created if missing); alice is in an extra group,
    carol in the admin group."""
    if os.geteuid() != 0:
        pytest.skip("creating test users needs root")
    for group in (MEMBER_GROUP, ADMIN_GROUP):
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", group], check=True)
    for name in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    subprocess.run(["usermod", "-a", "-G", MEMBER_GROUP, "alice"], check=True)
    subprocess.run(["usermod", "-a", "-G", ADMIN_GROUP, "carol"], check=True)
    return {name: pwd.getpwnam(name) for name in USERS}


def run_as(user: str, argv: list[str], cwd: str | None,
           env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``job_queue.cli.main(argv)`` in a forked child as ``user`` (real SO_PEERCRED identity)."""
    import threading

    import job_queue.cli
    import job_queue.client
    import job_queue.durations  # import before fork

    pw = pwd.getpwnam(user)
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.dup2(w_out, 1)
            os.dup2(w_err, 2)
            for fd in (r_out, r_err, w_out, w_err):
                os.close(fd)
            os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.chdir(cwd or pw.pw_dir)
            os.environ.update(env, HOME=pw.pw_dir, USER=user)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            try:
                code = job_queue.cli.main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w_out)
    os.close(w_err)
    chunks: dict[int, bytes] = {}

    def drain(fd: int) -> None:
        with os.fdopen(fd, "rb") as fh:
            chunks[fd] = fh.read()

    t = threading.Thread(target=drain, args=(r_err,))
    t.start()
    drain(r_out)
    t.join()
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(["labq", *argv], os.waitstatus_to_exitcode(status),
                                       chunks[r_out].decode(), chunks[r_err].decode())


def read_line(s: Any) -> bytes:
    """One reply line from labqd's socket (what came before the peer closed, if it closed first)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


class Labqd:
    """A real labqd process with its own state dir, socket and log dir."""

    def __init__(self, root: Path, extra_config: str = "", metrics_port: int = 0,
                 nofile: int | None = None) -> None:
        self.root = root
        self.nofile = nofile
        """Soft and hard RLIMIT_NOFILE of the daemon (None: inherited)."""
        self.socket = str(root / "run" / "labq.sock")
        self.log_dir = root / "logs"
        self.config = root / "config.toml"
        self.config.write_text(
            f"""
gpus = ["GPU-fake-0", "GPU-fake-1", "GPU-fake-2", "GPU-fake-3"]
admin_group = "labqtest-admins"
default_image = "{TEST_IMAGE}"
state_dir = "{root / 'state'}"
socket = "{self.socket}"
log_dir = "{self.log_dir}"
kill_grace = 2
metrics_port = {metrics_port}
{extra_config}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = root / "labqd.stderr"

    def start(self) -> None:
        """Start (or restart after kill9/terminate) this daemon; factories already start it once."""
        if self.proc is not None and self.proc.poll() is None:
            raise AssertionError("labqd is already running: stop it before starting it again")
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "job_queue.daemon", "--config", str(self.config), "--log-level", "DEBUG"],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=self._limit_fds,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"labqd exited: {self.stderr.read_text()[-3000:]}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(self.socket)
                return
            time.sleep(0.05)
        raise RuntimeError("labqd did not start listening")

    def _limit_fds(self) -> None:
        if self.nofile is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def labq(self, *args: str, user: str | None = None, cwd: str | None = None,
             check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the CLI: as root in a real subprocess, as ``user`` in a forked child that drops to
        the user's uid, gid and groups (the venv's interpreter may not be executable by them)."""
        env = {"LABQ_SOCKET": self.socket}
        if user is None:
            res = subprocess.run([PYTHON, "-m", "job_queue.cli", *args], cwd=cwd or str(REPO),
                                 env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                                 capture_output=True, text=True, timeout=60)
        else:
            res = run_as(user, list(args), cwd, env)
        if check and res.returncode != 0:
            raise AssertionError(f"labq {args} failed ({res.returncode}): {res.stderr}")
        return res

    def request(self, payload: bytes) -> dict[str, Any]:
        """Send raw bytes as one request line; return the decoded reply."""
        from job_queue.client import DaemonUnreachable, _connect

        try:  # waits while the listen backlog is full (a flood test)
            conn = _connect(self.socket, 30)
        except DaemonUnreachable as exc:
            raise ConnectionError(str(exc)) from exc
        with conn as s:
            s.sendall(payload + b"\n")
            data = read_line(s)
        reply: dict[str, Any] = json.loads(data)
        return reply

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return self.request(json.dumps({"v": 1, "op": op, **fields}).encode())

    def job(self, job_id: int) -> dict[str, Any]:
        reply = self.call("show", id=job_id)
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} stuck in {job['state']} ({job['reason']}), "
                                     f"wanted {states}")
            time.sleep(0.1)


def _remove_instance_containers(root: Path) -> None:
    db = root / "state" / "labq.db"
    if not db.exists():
        return
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
    finally:
        conn.close()
    if row is None:
        return
    api = docker_client().api
    # low-level listing: no per-container inspect that could race with a removal in progress
    for c in api.containers(all=True, filters={"label": f"labq.instance={row[0]}"}):
        with contextlib.suppress(Exception):
            api.remove_container(c["Id"], force=True)


def _new_labqd(extra_config: str = "", metrics_port: int = 0, nofile: int | None = None) -> Labqd:
    root = Path(tempfile.mkdtemp(prefix="labq-test-"))
    root.chmod(0o755)  # alice and bob must reach the socket
    d = Labqd(root, extra_config, metrics_port, nofile)
    d.start()
    return d


def _dispose(d: Labqd) -> None:
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()
    try:
        _remove_instance_containers(d.root)
    finally:
        if not os.environ.get("LABQ_TEST_KEEP"):  # set it to keep state, logs and labqd.stderr
            shutil.rmtree(d.root, ignore_errors=True)


@pytest.fixture
def make_labqd(test_image: str, users: dict[str, Any]) -> Iterator[Any]:
    """Factory: start a real labqd (extra TOML lines optional); cleaned up after the test."""
    started: list[Labqd] = []

    def make(extra_config: str = "", metrics_port: int = 0, nofile: int | None = None) -> Labqd:
        d = _new_labqd(extra_config, metrics_port, nofile)
        started.append(d)
        return d

    yield make
    for d in started:
        _dispose(d)


@pytest.fixture
def labqd(make_labqd: Any) -> Labqd:
    d: Labqd = make_labqd()
    return d


@pytest.fixture(scope="module")
def shared_labqd(test_image: str, users: dict[str, Any]) -> Iterator[Labqd]:
    """One daemon for a whole module (property-based tests send it many requests)."""
    d = _new_labqd()
    yield d
    _dispose(d)


class FakeBackend:
    """The daemon side of Service (wake, stops, images, GPUs) for tests without Docker."""

    def __init__(self) -> None:
        self.woken = 0
        self.stops: list[int] = []
        self.report: list[dict[str, Any]] = []

    def wake(self) -> None:
        self.woken += 1

    def request_stop(self, job_id: int) -> None:
        self.stops.append(job_id)

    def image_exists(self, image: str) -> bool:
        return image.startswith("ok")

    def gpu_ids(self) -> list[str]:
        return ["g0", "g1"]

    def gpu_report(self) -> list[dict[str, Any]]:
        return self.report

    def wait_log(self, job_id: int, timeout: float) -> None:
        pass
