"""labq: the command-line client. Imports are lazy so that ``labq --help`` answers quickly."""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False  # not imported from typing: that import alone costs ~10 ms of start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Command = Callable[[Any, argparse.Namespace, dict[str, Any]], int]

# Exit codes (documented in docs/job-queue.md).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # bad arguments or a request the daemon refused as invalid
EXIT_NOT_FOUND = 3
EXIT_PERMISSION = 4
EXIT_CONFLICT = 5
EXIT_UNREACHABLE = 6
EXIT_LIMIT = 7  # a per-user limit (open connections, pending jobs) was reached; nothing was queued

_CODE_EXIT = {
    "invalid_request": EXIT_USAGE,
    "unsupported_version": EXIT_USAGE,
    "not_found": EXIT_NOT_FOUND,
    "permission_denied": EXIT_PERMISSION,
    "conflict": EXIT_CONFLICT,
    "limit_exceeded": EXIT_LIMIT,
}


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _config_value(explicit_config: str | None, key: str) -> str | None:
    """One string setting of config.toml, read without loading (or validating) the whole config."""
    import os
    import tomllib

    path = explicit_config or os.environ.get("LABQ_CONFIG") or "/etc/labq/config.toml"
    try:
        with open(path, "rb") as fh:  # noqa: PTH123 - keep imports minimal for CLI start-up
            value = tomllib.load(fh).get(key)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def _parser(default_image: str = "the node's default_image") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labq", description="Submit and manage GPU jobs on this node.")
    p.add_argument("--socket", help="daemon socket (default: $LABQ_SOCKET, the config's socket, "
                                    "/run/labq/labq.sock)")
    p.add_argument("--config", help="config file to read the socket path from")
    p.add_argument("--host", help="run this command on another node's labq, over ssh")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    s = sub.add_parser("submit", help="queue a container run and print its job id",
                       usage="labq submit --gpus N [options] -- CMD [ARGS...]")
    s.add_argument("--gpus", type=int, required=True, help="number of GPUs (0 for CPU-only)")
    s.add_argument("--image", help=f"container image (default: {default_image})")
    s.add_argument("--name", help="job name (default: the program name)")
    s.add_argument("--time", help="time limit, e.g. 30m, 4h, 1h30m, 2d (needed to be backfilled)")
    s.add_argument("--cpus", type=float, help="CPUs to reserve")
    s.add_argument("--mem", help="memory to reserve and limit, e.g. 16g")
    s.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable")
    s.add_argument("--mount", action="append", default=[], metavar="NAME", help="mount from the allow-list")
    s.add_argument("--after", type=int, metavar="ID", help="start only after job ID succeeded")
    s.add_argument("--priority", type=int, default=0, help="priority (> 0 for admins only)")
    s.add_argument("--array", metavar="A-B[%N]", help="job array, e.g. 0-15%%4")
    s.add_argument("--hold", action="store_true", help="submit held (start after `labq release`)")
    s.add_argument("--host-network", action="store_true", help="use the host network (if policy allows)")
    s.add_argument("--notify", metavar="EVENTS",
                   help="tell me on: comma list of started,finished,failed; 'all' or 'none' "
                        "(default: the node's setting)")
    s.add_argument("--json", action="store_true")
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")

    ls = sub.add_parser("ls", help="list pending and running jobs (an array's waiting tasks on one line)")
    ls.add_argument("--user", "-u")
    ls.add_argument("--array", "-r", action="store_true",
                    help="one line per array task (squeue -r); default: 17_[5-9999] per array and state")
    ls.add_argument("--all-nodes", action="store_true",
                    help="list the jobs of every node ($LABQ_NODES or cluster_nodes in the config), over ssh")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="show one job")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    logs = sub.add_parser("logs", help="print a job's output")
    logs.add_argument("id", type=int)
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--json", action="store_true", help="print {id, state, output} (no --follow)")
    for name, text in (("cancel", "cancel jobs"), ("hold", "hold pending jobs"),
                       ("release", "release held jobs")):
        c = sub.add_parser(name, help=text)
        c.add_argument("ids", type=int, nargs="+", metavar="ID")
    g = sub.add_parser("gpus", help="show each GPU: free, its job, or a foreign process")
    g.add_argument("--json", action="store_true")
    h = sub.add_parser("history", help="list finished jobs")
    h.add_argument("--user", "-u")
    h.add_argument("--limit", "-n", type=int, default=50)
    h.add_argument("--json", action="store_true")
    cr = sub.add_parser("credentials", help="once: store your LDAP login for the study database and MLflow "
                                            "(files only you can read)")
    cr.add_argument("--check", action="store_true", help="say what is set up (no secret shown)")
    cr.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    cr.add_argument("--no-check", action="store_true", help="write without asking the portal first")
    return p


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if "-h" in raw or "--help" in raw:
        config = next((raw[i + 1] for i, a in enumerate(raw[:-1]) if a == "--config"), None)
        args = _parser(_config_value(config, "default_image") or "the node's default_image").parse_args(raw)
    else:
        args = _parser().parse_args(raw)
    if args.host:
        from .remote import run_on, strip_host

        return run_on(args.host, strip_host(raw)[1])
    try:
        if args.cmd == "credentials":
            return _credentials(args)
        return _run(args)
    except CliError as exc:
        from .display import safe

        print(f"labq: {safe(exc)}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from .client import Client, DaemonUnreachable, RequestFailed, socket_path

    if not args.socket and scheduler(args.config) == "slurm":
        return _run_slurm(args)
    if args.cmd == "ls" and args.all_nodes:
        import os

        from .remote import cluster_nodes, ls_all_nodes

        nodes = cluster_nodes(args.config or os.environ.get("LABQ_CONFIG") or "/etc/labq/config.toml")
        if not nodes:
            raise CliError("all-nodes: no nodes known (set LABQ_NODES or cluster_nodes in the config)",
                           EXIT_USAGE)
        return ls_all_nodes(nodes, args.user, args.json)

    path = socket_path(args.socket, args.config)
    try:
        request = _build_request(args)
        client = Client(path)
        try:
            return _COMMANDS[args.cmd](client, args, request)
        finally:
            client.close()
    except DaemonUnreachable as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from exc
    except RequestFailed as exc:
        raise CliError(exc.message, _CODE_EXIT.get(exc.code, EXIT_ERROR)) from exc


def _credentials(args: argparse.Namespace) -> int:
    """``labq credentials``: needs no daemon, only the node's config (job_queue/credentials.py)."""
    from .config import ConfigError, load_config
    from .credentials import main as credentials

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_ERROR) from exc
    return credentials(cfg.experiments, check=args.check, password_stdin=args.password_stdin,
                       no_check=args.no_check)


def scheduler(explicit_config: str | None) -> str:
    """The config's ``scheduler``: ``labq`` unless it says ``slurm``."""
    return _config_value(explicit_config, "scheduler") or "labq"


def _run_slurm(args: argparse.Namespace) -> int:
    """scheduler = "slurm": the same commands, answered by Slurm (job_queue/slurm_client.py)."""
    from .client import RequestFailed
    from .config import ConfigError, load_config
    from .slurm import SlurmUnreachable
    from .slurm_client import SlurmClient

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_ERROR) from exc
    try:
        request = _build_request(args)
        if args.cmd == "logs":
            return _slurm_logs(cfg, args)
        if args.cmd == "ls" and getattr(args, "all_nodes", False):
            args.all_nodes = False  # Slurm's queue is the whole lab's
        return _COMMANDS[args.cmd](SlurmClient(cfg), args, request)
    except SlurmUnreachable as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from exc
    except RequestFailed as exc:
        raise CliError(exc.message, _CODE_EXIT.get(exc.code, EXIT_ERROR)) from exc


def _slurm_logs(cfg: Any, args: argparse.Namespace) -> int:
    """A Slurm job's output is on the node that ran it: read through that node's labqd."""
    from .client import Client, DaemonUnreachable, RequestFailed
    from .slurm_client import SlurmClient, local_node

    job = SlurmClient(cfg).call("show", id=args.id)
    node = (job.get("node") or "").split(",")[0]
    if not node:
        raise CliError(f"logs: job {args.id} has not started yet (no output)", EXIT_CONFLICT)
    if node != local_node(cfg):
        from .remote import run_on

        flags = [f for f, on in (("--follow", args.follow), ("--json", args.json)) if on]
        argv = ["logs", str(args.id), *flags]
        return run_on(node, argv)
    try:
        client = Client(cfg.socket_path)
    except DaemonUnreachable as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from exc
    try:
        return cmd_logs(_SlurmLogs(client), args, {})
    except RequestFailed as exc:
        raise CliError(exc.message, _CODE_EXIT.get(exc.code, EXIT_ERROR)) from exc
    finally:
        client.close()


class _SlurmLogs:
    """cmd_logs' ``logs`` call, sent as labqd's ``slurm_logs``."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def call(self, op: str, **fields: Any) -> Any:
        return self.client.call("slurm_logs" if op == "logs" else op, **fields)


def _build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The submit request, built as the protocol's own record (protocol.Submit, the one the service
    takes) and checked with its validators here, so a bad value is refused before it is sent."""
    if args.cmd != "submit":
        return {}
    from pathlib import Path

    from .durations import DurationError, SizeError, parse_duration, parse_size
    from .protocol import ProtocolError, Submit, validate_request, wire

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("submit: no command given (use: labq submit --gpus N -- CMD ARGS)", EXIT_USAGE)
    try:
        cwd = str(Path.cwd())
    except OSError:
        cwd = str(Path.home())
    try:
        time_limit = parse_duration(args.time) if args.time is not None else None
        mem = parse_size(args.mem) if args.mem is not None else None
    except (DurationError, SizeError) as exc:
        raise CliError(f"{'time' if isinstance(exc, DurationError) else 'mem'}: {exc}", EXIT_USAGE) from exc
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"env: '{item}' is not K=V", EXIT_USAGE)
        env[key] = value
    request = Submit(command=command, cwd=cwd, gpus=args.gpus, image=args.image, name=args.name,
                     time_limit=time_limit, cpus=args.cpus, mem=mem, env=env, mounts=list(args.mount),
                     after=args.after, priority=args.priority, array=args.array,
                     host_network=args.host_network, hold=args.hold,
                     notify=parse_notify_events(args.notify) if args.notify is not None else None)
    fields = wire("submit", request)
    try:
        validate_request(fields)
    except ProtocolError as exc:
        raise CliError(exc.message, EXIT_USAGE) from exc
    del fields["v"], fields["op"]
    return fields


def parse_notify_events(text: str) -> list[str]:
    events = ("started", "finished", "failed")
    if text == "all":
        return list(events)
    if text == "none":
        return []
    out = [e.strip() for e in text.split(",") if e.strip()]
    for e in out:
        if e not in events:
            raise CliError(f"notify: unknown event '{e}' (use {','.join(events)}, all or none)", EXIT_USAGE)
    return list(dict.fromkeys(out))


def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=True))


def cmd_submit(client: Any, args: argparse.Namespace, req: dict[str, Any]) -> int:
    res = client.call("submit", **req)
    if args.json:
        _print_json(res)
    elif res.get("array_id") is not None:
        ids = res["ids"]
        print(f"{ids[0]} (array of {len(ids)} jobs: {ids[0]}-{ids[-1]})")
    else:
        print(res["ids"][0])
    return EXIT_OK


def _elapsed(job: dict[str, Any], now: float) -> float:
    if job["state"] in ("running", "starting") and job.get("start_time"):
        return now - float(job["start_time"])
    if job.get("end_time") and job.get("start_time"):
        return float(job["end_time"]) - float(job["start_time"])
    return now - float(job["submit_time"])


def _table(jobs: list[dict[str, Any]], now: float, finished: bool = False) -> None:
    from .display import id_and_name, safe
    from .durations import format_duration

    nodes = any("node" in j for j in jobs)  # scheduler = slurm: where each job runs
    head = ("ID", "USER", "STATE", "GPUS", *(("NODE",) if nodes else ()), "RUN TIME" if finished else "TIME",
            "NAME", "EXIT" if finished else "REASON")
    rows = [head]
    for j in jobs:
        job_id, name = id_and_name(j)
        last = (str(j["exit_code"]) if j.get("exit_code") is not None else "-") if finished else (
            j.get("reason") or "")
        if finished and j.get("reason"):
            last = f"{last} {j['reason']}"
        where = (safe(j.get("node") or "-"),) if nodes else ()
        rows.append((job_id, safe(j["user"]), j["state"].upper(), str(j["gpus"]), *where,
                     format_duration(_elapsed(j, now)), name, safe(last)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    out = [" ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + " " + r[-1] for r in rows]
    sys.stdout.write("\n".join(line.rstrip() for line in out) + "\n")


def cmd_ls(client: Any, args: argparse.Namespace, req: dict[str, Any]) -> int:
    res = client.call("ls", user=args.user, **({"array_tasks": True} if args.array else {}))
    if args.json:
        _print_json(res["jobs"])
    else:
        _table(res["jobs"], res["now"])
    return EXIT_OK


def cmd_history(client: Any, args: argparse.Namespace, req: dict[str, Any]) -> int:
    res = client.call("history", user=args.user, limit=args.limit)
    if args.json:
        _print_json(res["jobs"])
    else:
        _table(res["jobs"], res["now"], finished=True)
    return EXIT_OK


def cmd_show(client: Any, args: argparse.Namespace, req: dict[str, Any]) -> int:
    import shlex
    import time

    from .display import safe
    from .durations import format_duration

    job = client.call("show", id=args.id)
    if args.json:
        _print_json(job)
        return EXIT_OK

    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    fields = [
        ("id", job["id"]), ("name", job["name"]), ("user", job["user"]), ("state", job["state"]),
        ("reason", job["reason"] or "-"), ("image", job["image"]),
        ("command", shlex.join(job["command"])), ("cwd", job["cwd"]),
        ("gpus", f"{job['gpus']} {','.join(job['assigned_gpus'])}".strip()),
        ("cpus", job["cpus"] or "-"), ("mem", job["mem"] or "-"),
        ("time limit", format_duration(job["time_limit"]) if job["time_limit"] else "-"),
        ("priority", job["priority"]), ("after", job["after"] or "-"),
        ("array", f"{job['array_id']}[{job['array_index']}]" if job["array_index"] is not None else "-"),
        ("mounts", ",".join(job["mounts"]) or "-"),
        ("submitted", when(job["submit_time"])), ("started", when(job["start_time"])),
        ("ended", when(job["end_time"])),
        ("run time", format_duration(_elapsed(job, job["now"])) if job["start_time"] else "-"),
        ("exit code", "-" if job["exit_code"] is None else job["exit_code"]),
        ("oom killed", "yes" if job["oom_killed"] else "no"), ("log", job["log"]),
    ]
    for key, value in fields:
        print(f"{key + ':':<12} {safe(value)}")
    return EXIT_OK


def cmd_logs(client: Any, args: argparse.Namespace, req: dict[str, Any]) -> int:
    import base64
    import time

    offset = 0
    out = sys.stdout.buffer
    if args.json:
        if args.follow:
            raise CliError("logs: --json and --follow cannot be combined", EXIT_USAGE)
        chunks = []
        while True:
            res = client.call("logs", id=args.id, offset=offset)
            chunks.append(base64.b64decode(res["data"]))
            offset = res["offset"]
            if res["eof"]:
                break
        _print_json({"id": args.id, "state": res["state"],
                     "output": b"".join(chunks).decode("utf-8", errors="replace")})
        return EXIT_OK
    while True:
        res = client.call("logs", id=args.id, offset=offset)
        data = base64.b64decode(res["data"])
        if data:
            out.write(data)
            out.flush()
        offset = res["offset"]
        if not res["eof"]:
            continue
        if not args.follow or res["state"] in ("succeeded", "failed", "cancelled", "timeout"):
            return EXIT_OK
        time.sleep(0.5)  # client-side follow; the daemon itself never polls


def _ids_command(op: str) -> Command:
    def run(client: Any, args: argparse.Namespace, req: dict[str, Any]) -> int:
        res = client.call(op, ids=args.ids)
        if op == "cancel":
            for item in res["jobs"]:
                print(f"{item['id']}: {item['result']}")
        else:
            for job_id in res["ids"]:
                print(f"{job_id}: {'held' if op == 'hold' else 'released'}")
        return EXIT_OK

    return run


def cmd_gpus(client: Any, args: argparse.Namespace, req: dict[str, Any]) -> int:
    from .display import safe

    res = client.call("gpus")
    if args.json:
        _print_json(res["gpus"])
        return EXIT_OK
    for g in res["gpus"]:
        if g["state"] == "job":
            what = f"job {g['job']} ({safe(g['user'])})"
        elif g["state"] == "foreign":
            procs = ", ".join(
                f"pid {p['pid']} of {safe(p['user'])}"
                + (f" {p['memory_bytes'] // 2**20} MiB" if p["memory_bytes"] is not None else "")
                for p in g["foreign"])
            what = f"BUSY outside labq: {procs}"
        else:
            what = "free"
        print(f"{g['index']:<3} {safe(g['id']):<40} {what}")
    return EXIT_OK


_COMMANDS: dict[str, Command] = {
    "submit": cmd_submit, "ls": cmd_ls, "show": cmd_show, "logs": cmd_logs, "gpus": cmd_gpus,
    "history": cmd_history, "cancel": _ids_command("cancel"), "hold": _ids_command("hold"),
    "release": _ids_command("release"),
}


if __name__ == "__main__":
    sys.exit(main())
