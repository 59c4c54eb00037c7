"""``labq --host NODE ...`` and ``labq ls --all-nodes``: other nodes' labqd over SSH.

No new network service: the CLI runs ``ssh NODE labq ARGS`` with the caller's own SSH identity (the
lab's LDAP accounts and keys), so the remote labqd sees the same user through ``SO_PEERCRED`` there.
The node list for ``--all-nodes`` is ``$LABQ_NODES`` (comma-separated) or ``cluster_nodes`` in
config.toml. ``$LABQ_SSH`` replaces the ``ssh`` command (e.g. ``ssh -F ~/.ssh/lab_config``).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
from typing import Any

from .display import id_and_name, safe

NODES_ENV = "LABQ_NODES"
SSH_ENV = "LABQ_SSH"
EXIT_UNREACHABLE = 6
_SSH_UNREACHABLE = 255


def ssh_argv(host: str) -> list[str]:
    base = shlex.split(os.environ.get(SSH_ENV, "ssh"))
    # accept-new: the first contact with a node records its key; a changed key is refused.
    return [*base, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", host]


def remote_command(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["labq", *argv])


def run_on(host: str, argv: list[str]) -> int:
    """Run ``labq ARGV`` on HOST with this terminal's stdin/stdout/stderr; its exit code."""
    rc = subprocess.run([*ssh_argv(host), remote_command(argv)], check=False).returncode
    if rc == _SSH_UNREACHABLE:
        print(f"labq: host: cannot reach labq on {host} over ssh", file=sys.stderr)
        return EXIT_UNREACHABLE
    return rc


def strip_host(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``--host NODE`` / ``--host=NODE`` (before the command) off the argument list."""
    out: list[str] = []
    host: str | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        if host is None and a == "--host" and i + 1 < len(argv):
            host = argv[i + 1]
            i += 2
            continue
        if host is None and a.startswith("--host="):
            host = a.split("=", 1)[1]
            i += 1
            continue
        out.append(a)
        i += 1
    return host, out


def cluster_nodes(config_path: str) -> list[str]:
    env = os.environ.get(NODES_ENV, "")
    if env.strip():
        return [n.strip() for n in env.split(",") if n.strip()]
    try:
        import tomllib

        with open(config_path, "rb") as fh:  # noqa: PTH123 - keep imports minimal for CLI start-up
            value = tomllib.load(fh).get("cluster_nodes", [])
    except (OSError, ValueError):
        return []
    return [n for n in value if isinstance(n, str) and n] if isinstance(value, list) else []


def _is_local(node: str) -> bool:
    name = socket.gethostname()
    return node in ("localhost", name, name.split(".")[0])


def ls_all_nodes(nodes: list[str], user: str | None, as_json: bool) -> int:
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    extra = ["-u", user] if user else []

    def ask(node: str) -> None:
        if _is_local(node):
            argv = [sys.executable, "-m", "job_queue.cli", "ls", "--json", *extra]
        else:
            argv = [*ssh_argv(node), remote_command(["ls", "--json", *extra])]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            errors[node] = "timed out"
            return
        if proc.returncode != 0:
            errors[node] = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            return
        try:
            results[node] = json.loads(proc.stdout)
        except ValueError:
            errors[node] = "unreadable answer"

    threads = [threading.Thread(target=ask, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if as_json:
        print(json.dumps({"jobs": {n: results[n] for n in nodes if n in results}, "errors": errors},
                         indent=2, sort_keys=True))
    else:
        rows = [("NODE", "ID", "USER", "STATE", "GPUS", "NAME", "REASON")]
        for n in nodes:
            for j in results.get(n, []):
                job_id, name = id_and_name(j)
                rows.append((safe(n), job_id, safe(j["user"]), safe(j["state"]).upper(), str(j["gpus"]), name,
                             safe(j.get("reason") or "")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    for node, err in sorted(errors.items()):
        print(f"labq: {safe(node)}: {safe(err)}", file=sys.stderr)
    return EXIT_UNREACHABLE if errors else 0
