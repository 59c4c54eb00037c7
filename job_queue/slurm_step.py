"""The batch step of a labq job on Slurm: ask this node's labqd to run the job's container, and wait.

``sbatch`` (job_queue/slurm_client.py) runs ``python -m job_queue.slurm_step SPEC`` as the job's owner
inside the job's cgroup. This program sends ``slurm_run`` (the Slurm job id and the container's spec) to
labqd over its Unix socket; labqd checks with Slurm and the kernel that this process is that job's step
(job_queue/slurm_runner.py), runs the container under the job's cgroup and answers when it has ended.
The step exits with the container's exit code, so Slurm records the job's result.

- SIGTERM/SIGINT (``scancel``, the time limit, preemption): the handler only sets a flag; the loop
  then asks labqd to stop the container (SIGTERM, ``kill_grace``, SIGKILL) and keeps waiting for its end.
- labqd restarts (or is killed) while the job runs: the connection breaks; the step connects again and
  repeats its request; the new labqd re-adopts the running container (never starts a second one).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from types import FrameType

RECONNECT_ENV = "LABQ_STEP_RECONNECT_S"
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 6


class _Flags:
    stop = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _Flags.stop = True


def _socket_path() -> str:
    from .client import socket_path

    return socket_path(None, None)


class _Lost(Exception):
    """The connection to labqd broke before its answer."""


def _attempt(path: str, request: bytes) -> dict[str, object]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise _Lost(str(exc)) from exc
    with sock:
        sock.sendall(request)
        sock.settimeout(0.5)
        buf = b""
        asked_stop = False
        while True:
            if _Flags.stop and not asked_stop:
                asked_stop = True
                try:
                    sock.sendall(b"stop\n")
                except OSError as exc:
                    raise _Lost(str(exc)) from exc
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise _Lost(str(exc)) from exc
            if not chunk:
                raise _Lost("labqd closed the connection")
            buf += chunk
            if b"\n" in buf:
                reply = json.loads(buf.split(b"\n", 1)[0])
                if not isinstance(reply, dict):
                    raise _Lost("labqd sent a malformed answer")
                return reply


def memory_limit(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """This process's memory limit from its cgroup (v1 ``memory.limit_in_bytes``, v2 ``memory.max``),
    or None when it has none."""
    from pathlib import Path

    limits = []
    for line in (Path(proc_root) / "self" / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = Path(cgroup_root), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(cgroup_root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), 0, -1):  # this cgroup and its parents (the step's, the job's)
            try:
                text = (base.joinpath(*parts[:depth]) / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:
                limits.append(int(text))
    return min(limits) if limits else None


def reraise_oom() -> None:
    """Let Slurm record the container's OOM kill as the job's (OUT_OF_MEMORY): Slurm watches the step's
    own processes for OOM events, not a container under it, so the step uses memory up to the job's limit
    and is OOM-killed there, as a shell re-raises a child's signal. Only under a limit smaller than half
    the machine's memory (never a node-wide OOM); else it returns and the step exits 137."""
    limit = memory_limit()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if limit is None or limit > total // 2:
        return
    chunks = []
    chunk = 16 << 20
    for _ in range(limit // chunk + 64):  # past the limit: the kernel kills this process first
        block = bytearray(chunk)
        for i in range(0, chunk, 4096):
            block[i] = 1
        chunks.append(block)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m job_queue.slurm_step SPEC (run by labq's sbatch script)", file=sys.stderr)
        return 2
    from .slurm_client import decode_spec

    job_id = os.environ.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        print("labq step: SLURM_JOB_ID is not set: this runs only as a Slurm batch step", file=sys.stderr)
        return 2
    try:
        spec = decode_spec(args[0])
    except ValueError as exc:
        print(f"labq step: bad job spec: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    request = json.dumps({"v": 1, "op": "slurm_run", "job": int(job_id), "spec": spec}).encode() + b"\n"
    path = _socket_path()
    patience = float(os.environ.get(RECONNECT_ENV, "600"))
    deadline = time.monotonic() + patience
    while True:
        try:
            reply = _attempt(path, request)
        except _Lost as exc:
            if time.monotonic() > deadline:
                print(f"labq step: cannot reach labqd at {path} for {patience:g} s ({exc})", file=sys.stderr)
                return EXIT_UNREACHABLE
            time.sleep(1.0)
            continue
        if not reply.get("ok"):
            err = reply.get("error")
            message = err.get("message") if isinstance(err, dict) else err
            print(f"labq step: labqd refused job {job_id}: {message}", file=sys.stderr)
            return EXIT_REFUSED
        result = reply.get("result")
        if not isinstance(result, dict):
            return EXIT_REFUSED
        code = result.get("exit_code")
        if result.get("oom_killed"):
            print(f"labq step: job {job_id}'s container was killed for using more memory than it asked for",
                  file=sys.stderr)
            reraise_oom()
        return int(code) if isinstance(code, int) else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
