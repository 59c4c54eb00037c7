"""Slurm for Prometheus: nodes, jobs, GPUs, fair share, daemon health and scheduler cycle times.

On every scrape the exporter runs Slurm's own client commands (a timeout each) and parses their
machine-readable output. ``scontrol ping`` and sacctmgr run first; the commands that ask slurmctld run
next, all at once, and only if a slurmctld is UP (otherwise Slurm's clients retry until the timeout, and
a scrape during an outage would take that long). A scrape takes at most two timeouts (a hanging
``scontrol ping``, then the rest); normally well under a second.

=========  =====================================================================================
sinfo      ``-h -N -O NodeList:|,...``: one line per node and partition (state, GPUs, reason)
squeue     ``-h -a -r -O UserName:|,...``: one line per active job (array tasks one by one)
sshare     ``-a -P -n``: fair share per account and user
sdiag      scheduler statistics (text; sdiag has no machine format in Slurm 22.05)
scontrol   ``ping``: is slurmctld (primary, backup) up
sacctmgr   ``-n -P show cluster``: does slurmdbd answer
=========  =====================================================================================

Delimited text rather than ``--json``: Debian's 22.05 build has ``--json`` for sinfo and squeue, but
its schema (openapi v0.0.38) changed in 23.02, and it serialises every field of every job, where the
exporter needs six. The reason fields come last because they are free text (a ``|`` in a drain reason
stays in the reason).

A command that fails, times out or prints what the parser does not understand yields
``labkit_slurm_command_up{command="..."} 0`` and no series of its own; the exporter never crashes on
Slurm's answers. ``labkit_slurm_controller_up`` and ``labkit_slurm_dbd_up`` are always present.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from labkit_exporters.serving import serve_until_signalled

LOG = logging.getLogger("labkit_slurm_exporter")

DEFAULT_PORT = 9849
DEFAULT_LISTEN_ADDRESS = "0.0.0.0"  # noqa: S104 - scraped by the monitoring server; see docs
DEFAULT_TIMEOUT = 4.0

# The exact command lines (tests/monitoring/data/slurm/record.sh records these; a test keeps them equal).
COMMANDS: Mapping[str, tuple[str, ...]] = {
    "sinfo": ("sinfo", "-h", "-N", "-O", "NodeList:|,Partition:|,StateLong:|,Gres:|,GresUsed:|,Reason:|"),
    "squeue": (
        "squeue",
        "-h",
        "-a",
        "-r",
        "-O",
        "UserName:|,Account:|,Partition:|,State:|,tres-alloc:|,Reason:|",
    ),
    "sdiag": ("sdiag",),
    "sshare": (
        "sshare",
        "-a",
        "-P",
        "-n",
        "-o",
        "Account,User,RawShares,NormShares,RawUsage,EffectvUsage,FairShare",
    ),
    "scontrol": ("scontrol", "ping"),
    "sacctmgr": ("sacctmgr", "-n", "-P", "show", "cluster", "format=Cluster"),
}

# Job states whose GPUs are held (tres-alloc is the allocation); for pending jobs it is the request.
_HOLDING_STATES = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING"})
# sinfo's StateLong appends flags: * not responding, ~ powered off, # powering up, % powering down,
# ! pending power down, $ maintenance, @ pending reboot, ^ rebooting, - planned by backfill.
_STATE_FLAGS = "*~#%!$@^-"
_GRES_GPU = re.compile(r"(?:^|,)gpu(?::([^:,(]+))?:(\d+)")
_TRES_GPU = re.compile(r"(?:^|,)gres/gpu(?::([^=,]+))?=(\d+)")
_PING = re.compile(r"^Slurmctld\((\w+)\) at (\S+) is (UP|DOWN)\b", re.MULTILINE)
_SDIAG_VALUE = re.compile(r"^\s*([A-Za-z][A-Za-z ()]*?):\s+(\d+)\s*$")


class ParseError(ValueError):
    """Slurm printed something the exporter does not understand."""


# --------------------------------------------------------------------------- running commands


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    stdout: str
    error: str  # why it failed ("" if ok)
    seconds: float


Runner = Callable[[Sequence[str], float], CommandResult]


def run_command(argv: Sequence[str], timeout: float) -> CommandResult:
    """Runs ``argv`` without a shell; a non-zero exit, a timeout or a missing binary is a failure."""
    start = time.monotonic()
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return CommandResult(False, "", f"timed out after {timeout:g} s", time.monotonic() - start)
    except OSError as exc:
        return CommandResult(False, "", str(exc), time.monotonic() - start)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        first = (done.stderr.strip() or done.stdout.strip()).splitlines()[:1]
        return CommandResult(False, done.stdout, f"exit {done.returncode}: {''.join(first)}", seconds)
    return CommandResult(True, done.stdout, "", seconds)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class NodeRow:
    node: str
    partitions: tuple[str, ...]
    state: str  # idle, mixed, allocated, down, drained, draining, ...
    responding: bool
    gpus: int
    gpus_allocated: int
    reason: str


@dataclass(frozen=True)
class JobRow:
    user: str
    account: str
    partition: str
    state: str  # lower case: pending, running, ...
    reason: str
    gpus: int  # allocated (holding states) or requested (pending)


@dataclass(frozen=True)
class ShareRow:
    account: str
    user: str
    values: Mapping[str, float]  # norm_shares, raw_usage, effective_usage, fairshare (those given)


@dataclass(frozen=True)
class Ping:
    role: str
    host: str
    up: bool


def _fields(line: str, count: int, command: str) -> list[str]:
    """Splits a ``-O 'A:|,B:|'`` line; the last field (free text) keeps any ``|`` it contains."""
    parts = line.split("|", count - 1)
    if len(parts) != count:
        raise ParseError(f"{command}: expected {count} fields in {line!r}")
    parts[-1] = parts[-1].removesuffix("|")
    return [p.strip() for p in parts]


def gres_gpus(text: str) -> int:
    """GPUs in a Gres / GresUsed field: ``gpu:2``, ``gpu:a100:2(S:0-1)``, ``gpu:1(IDX:0),gpu:v100:1``."""
    return sum(int(count) for _, count in _GRES_GPU.findall(text))


def tres_gpus(text: str) -> int:
    """GPUs in a TRES list ``cpu=1,...,gres/gpu=2`` (typed ``gres/gpu:a100=2`` only if no total is given)."""
    found = _TRES_GPU.findall(text)
    untyped = [int(n) for kind, n in found if not kind]
    return sum(untyped) if untyped else sum(int(n) for _, n in found)


def node_state(text: str) -> tuple[str, bool]:
    """``down*`` -> ("down", not responding); ``mixed+planned`` -> "mixed"."""
    raw = text.strip().lower()
    base = raw.split("+", 1)[0].rstrip(_STATE_FLAGS)
    if not base or not base.isalpha():
        raise ParseError(f"sinfo: node state {text!r}")
    return base, "*" not in raw


def parse_sinfo(stdout: str) -> list[NodeRow]:
    """One row per node (sinfo -N prints a node once per partition)."""
    nodes: dict[str, NodeRow] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        name, partition, state_text, gres, gres_used, reason = _fields(line, 6, "sinfo")
        if not name:
            raise ParseError(f"sinfo: no node name in {line!r}")
        state, responding = node_state(state_text)
        part = partition.rstrip("*")
        seen = nodes.get(name)
        partitions = (*seen.partitions, part) if seen else (part,)
        nodes[name] = NodeRow(
            node=name,
            partitions=partitions,
            state=state,
            responding=responding,
            gpus=gres_gpus(gres),
            gpus_allocated=gres_gpus(gres_used),
            reason="" if reason in ("none", "(null)") else reason,
        )
    return list(nodes.values())


def parse_squeue(stdout: str) -> list[JobRow]:
    jobs = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        user, account, partition, state, tres, reason = _fields(line, 6, "squeue")
        if not user or not state.isupper():
            raise ParseError(f"squeue: user or state missing in {line!r}")
        jobs.append(
            JobRow(
                user=user,
                account=account,
                partition=partition,
                state=state.lower(),
                reason=reason,
                gpus=tres_gpus(tres),
            )
        )
    return jobs


_SHARE_COLUMNS = ("raw_shares", "norm_shares", "raw_usage", "effective_usage", "fairshare")


def parse_sshare(stdout: str) -> list[ShareRow]:
    rows = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 7:
            raise ParseError(f"sshare: expected 7 fields in {line!r}")
        account, user = parts[0].strip(), parts[1].strip()
        values: dict[str, float] = {}
        for column, text in zip(_SHARE_COLUMNS, parts[2:], strict=True):
            text = text.strip()
            if not text or text == "parent":  # accounts have no FairShare; "parent" shares
                continue
            try:
                values[column] = float(text)
            except ValueError as exc:
                raise ParseError(f"sshare: {column} {text!r} in {line!r}") from exc
        rows.append(ShareRow(account=account, user=user, values=values))
    return rows


def parse_ping(stdout: str) -> list[Ping]:
    found = [Ping(role.lower(), host, state == "UP") for role, host, state in _PING.findall(stdout)]
    if not found:
        raise ParseError(f"scontrol ping: no 'Slurmctld(...) at ... is UP|DOWN' in {stdout[:200]!r}")
    return found


@dataclass(frozen=True)
class SchedulerStats:
    values: Mapping[tuple[str, str], int]  # (section, key) -> number, e.g. ("main", "Last cycle")

    def get(self, section: str, key: str) -> int | None:
        return self.values.get((section, key))


def parse_sdiag(stdout: str) -> SchedulerStats:
    section = "general"
    values: dict[tuple[str, str], int] = {}
    for line in stdout.splitlines():
        if line.startswith("Main schedule statistics"):
            section = "main"
            continue
        if line.startswith("Backfilling stats"):
            section = "backfill"
            continue
        if line.startswith("Remote Procedure Call"):
            break
        match = _SDIAG_VALUE.match(line)
        if match:
            values.setdefault((section, match.group(1)), int(match.group(2)))
    if ("main", "Last cycle") not in values:
        raise ParseError("sdiag: no 'Main schedule statistics' with a 'Last cycle'")
    return SchedulerStats(values)


# --------------------------------------------------------------------------- collector


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def node_metrics(nodes: Iterable[NodeRow]) -> list[Metric]:
    state = _gauge(
        "labkit_slurm_node_state", "1 for the node's Slurm state (flags removed).", ["node", "state"]
    )
    responding = _gauge(
        "labkit_slurm_node_responding", "1 if slurmctld hears the node's slurmd (no '*' flag).", ["node"]
    )
    reason = _gauge(
        "labkit_slurm_node_reason",
        "1 with the reason a node is down or drained (admin's text).",
        ["node", "reason"],
    )
    gpus = _gauge("labkit_slurm_node_gpus", "GPUs the node has in Slurm (Gres).", ["node"])
    allocated = _gauge("labkit_slurm_node_gpus_allocated", "GPUs of the node allocated to jobs.", ["node"])
    per_partition: Counter[tuple[str, str]] = Counter()
    for n in nodes:
        state.add_metric([n.node, n.state], 1)
        responding.add_metric([n.node], 1 if n.responding else 0)
        if n.reason:
            reason.add_metric([n.node, n.reason], 1)
        gpus.add_metric([n.node], n.gpus)
        allocated.add_metric([n.node], n.gpus_allocated)
        for p in n.partitions:
            per_partition[(p, n.state)] += 1
    partition = _gauge(
        "labkit_slurm_partition_nodes", "Nodes by partition and state.", ["partition", "state"]
    )
    for (p, s), count in sorted(per_partition.items()):
        partition.add_metric([p, s], count)
    return [state, responding, reason, gpus, allocated, partition]


def job_metrics(jobs: Iterable[JobRow]) -> list[Metric]:
    by_state: Counter[tuple[str, str, str, str]] = Counter()
    pending: Counter[tuple[str, str]] = Counter()
    pending_gpus: Counter[tuple[str, str]] = Counter()
    user_gpus: Counter[tuple[str, str]] = Counter()
    for j in jobs:
        by_state[(j.state, j.user, j.account, j.partition)] += 1
        if j.state == "pending":
            pending[(j.reason, j.partition)] += 1
            pending_gpus[(j.reason, j.partition)] += j.gpus
        elif j.state.upper() in _HOLDING_STATES:
            user_gpus[(j.user, j.account)] += j.gpus
    jobs_m = _gauge(
        "labkit_slurm_jobs",
        "Active jobs (array tasks counted one by one) by state, user, account, partition.",
        ["state", "user", "account", "partition"],
    )
    for state_key, count in sorted(by_state.items()):
        jobs_m.add_metric(list(state_key), count)
    pending_m = _gauge(
        "labkit_slurm_jobs_pending", "Pending jobs by reason and partition.", ["reason", "partition"]
    )
    pending_gpus_m = _gauge(
        "labkit_slurm_jobs_pending_gpus",
        "GPUs requested by pending jobs, by reason and partition.",
        ["reason", "partition"],
    )
    for key, count in sorted(pending.items()):
        pending_m.add_metric(list(key), count)
        pending_gpus_m.add_metric(list(key), pending_gpus[key])
    user_m = _gauge(
        "labkit_slurm_user_gpus_allocated", "GPUs allocated to a user's running jobs.", ["user", "account"]
    )
    for user_key, count in sorted(user_gpus.items()):
        user_m.add_metric(list(user_key), count)
    return [jobs_m, pending_m, pending_gpus_m, user_m]


_SHARE_HELP = {
    "raw_shares": "Shares given to the association (sshare RawShares).",
    "norm_shares": "Shares of the association normalised to the cluster (sshare NormShares).",
    "raw_usage": "Decayed usage of the association in TRES-billing seconds (sshare RawUsage).",
    "effective_usage": "Usage of the association relative to the cluster (sshare EffectvUsage).",
    "fairshare": "Fair-share factor of a user, 0 (over-served) to 1 (sshare FairShare).",
}


def share_metrics(rows: Iterable[ShareRow]) -> list[Metric]:
    families = {
        c: _gauge(f"labkit_slurm_share_{c}", _SHARE_HELP[c], ["account", "user"]) for c in _SHARE_COLUMNS
    }
    for row in rows:
        for column, value in row.values.items():
            families[column].add_metric([row.account, row.user], value)
    return list(families.values())


def sdiag_metrics(stats: SchedulerStats) -> list[Metric]:
    out: list[Metric] = []
    for stat, key in (("last", "Last cycle"), ("max", "Max cycle"), ("mean", "Mean cycle")):
        family = _gauge(
            f"labkit_slurm_scheduler_{stat}_cycle_seconds",
            f"{key} of the main and backfill schedulers since sdiag's statistics were reset (daily).",
            ["scheduler"],
        )
        for scheduler in ("main", "backfill"):
            micros = stats.get(scheduler, key)
            if micros is not None:
                family.add_metric([scheduler], micros / 1e6)
        out.append(family)
    for name, key, doc in (
        ("server_threads", "Server thread count", "slurmctld's active RPC threads."),
        ("agent_queue_size", "Agent queue size", "RPCs slurmctld still has to send to slurmd."),
        (
            "dbd_agent_queue_size",
            "DBD Agent queue size",
            "Messages slurmctld holds for slurmdbd (grows while it is down).",
        ),
    ):
        value = stats.get("general", key)
        if value is not None:
            out.append(GaugeMetricFamily(f"labkit_slurm_{name}", doc, value=value))
    return out


@dataclass
class _Outcome:
    result: CommandResult
    metrics: list[Metric]
    parsed: bool
    controller_up: bool = False  # scontrol only: a slurmctld said UP


# The commands that ask slurmctld: when `scontrol ping` says none is UP they would only wait for their
# timeout (Slurm's clients retry), so they are skipped and the scrape answers at once.
_NEEDS_SLURMCTLD = ("sinfo", "squeue", "sdiag", "sshare")


class SlurmCollector(Collector):
    """Runs the Slurm commands on every scrape (in parallel, each with ``timeout``) and reports."""

    def __init__(
        self, runner: Runner = run_command, timeout: float = DEFAULT_TIMEOUT, bin_dir: Path | None = None
    ) -> None:
        self._runner = runner
        self._timeout = timeout
        self._bin_dir = bin_dir
        self._failures = dict.fromkeys(COMMANDS, 0)
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []  # no describe-time scrape: registering must not run Slurm commands

    def _argv(self, name: str) -> list[str]:
        argv = list(COMMANDS[name])
        if self._bin_dir is not None:
            argv[0] = str(self._bin_dir / argv[0])
        return argv

    def _run(self, name: str) -> _Outcome:
        result = self._runner(self._argv(name), self._timeout)
        # `scontrol ping` exits 1 when a controller is DOWN, and says so: that answer is understood.
        if not result.ok and not (name == "scontrol" and _PING.search(result.stdout)):
            LOG.warning("%s failed: %s", name, result.error)
            return _Outcome(result, [], False)
        try:
            metrics = self._parse(name, result.stdout)
        except ParseError as exc:
            LOG.warning("%s: %s", name, exc)
            return _Outcome(result, [], False)
        up = name == "scontrol" and any(p.up for p in parse_ping(result.stdout))
        return _Outcome(result, metrics, True, controller_up=up)

    def _parse(self, name: str, stdout: str) -> list[Metric]:
        if name == "sinfo":
            return node_metrics(parse_sinfo(stdout))
        if name == "squeue":
            return job_metrics(parse_squeue(stdout))
        if name == "sshare":
            return share_metrics(parse_sshare(stdout))
        if name == "sdiag":
            return sdiag_metrics(parse_sdiag(stdout))
        if name == "scontrol":
            pings = parse_ping(stdout)
            family = _gauge(
                "labkit_slurm_controller_ping",
                "1 if `scontrol ping` says this slurmctld is UP.",
                ["role", "host"],
            )
            for p in pings:
                family.add_metric([p.role, p.host], 1 if p.up else 0)
            return [_controller_up(any(p.up for p in pings)), family]
        return []  # sacctmgr: answering is all that counts

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            outcomes = self._run_all()
            yield from self._report(outcomes)

    def _run_all(self) -> dict[str, _Outcome]:
        """`scontrol ping` and sacctmgr first; the rest only if a slurmctld is UP (else they just wait)."""
        outcomes: dict[str, _Outcome] = {}

        def work(name: str) -> None:
            try:
                outcomes[name] = self._run(name)
            except Exception:  # a bug must cost one command's series, not the scrape
                LOG.exception("unexpected error in %s", name)
                outcomes[name] = _Outcome(CommandResult(False, "", "internal error", 0.0), [], False)

        def start(names: Iterable[str]) -> list[threading.Thread]:
            threads = [threading.Thread(target=work, args=(name,), daemon=True) for name in names]
            for t in threads:
                t.start()
            return threads

        ping, dbd = start(("scontrol", "sacctmgr"))
        ping.join()
        if outcomes["scontrol"].parsed and not outcomes["scontrol"].controller_up:
            skipped = CommandResult(False, "", "skipped: no slurmctld is UP", 0.0)
            outcomes.update({name: _Outcome(skipped, [], False) for name in _NEEDS_SLURMCTLD})
            rest = []
        else:
            rest = start(_NEEDS_SLURMCTLD)
        for t in [dbd, *rest]:
            t.join()
        return outcomes

    def _report(self, outcomes: Mapping[str, _Outcome]) -> Iterator[Metric]:
        up = _gauge(
            "labkit_slurm_command_up",
            "1 if the Slurm command ran and its output was understood.",
            ["command"],
        )
        seconds = _gauge("labkit_slurm_command_duration_seconds", "How long the command took.", ["command"])
        failures = CounterMetricFamily(
            "labkit_slurm_command_failures",
            "Scrapes where the command failed, timed out or was not understood.",
            labels=["command"],
        )
        for name in COMMANDS:
            outcome = outcomes[name]
            if not outcome.parsed:
                self._failures[name] += 1
            up.add_metric([name], 1 if outcome.parsed else 0)
            seconds.add_metric([name], outcome.result.seconds)
            failures.add_metric([name], self._failures[name])
            yield from outcome.metrics
        if not outcomes["scontrol"].parsed:
            yield _controller_up(False)
        yield GaugeMetricFamily(
            "labkit_slurm_dbd_up",
            "1 if slurmdbd answers sacctmgr.",
            value=1 if outcomes["sacctmgr"].parsed else 0,
        )
        yield up
        yield seconds
        yield failures


def _controller_up(up: bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "labkit_slurm_controller_up",
        "1 if `scontrol ping` says a slurmctld (primary or backup) is UP.",
        value=1 if up else 0,
    )


# --------------------------------------------------------------------------- CLI


def build_registry(
    runner: Runner = run_command, timeout: float = DEFAULT_TIMEOUT, bin_dir: Path | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SlurmCollector(runner, timeout, bin_dir))
    return registry


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="labkit-slurm-exporter",
        description="Prometheus exporter: Slurm nodes, jobs, GPUs, fair share and daemon health.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s)")
    parser.add_argument(
        "--listen-address", default=DEFAULT_LISTEN_ADDRESS, help="address to bind (default %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds per Slurm command (default %(default)s)",
    )
    parser.add_argument(
        "--slurm-bin-dir", type=Path, default=None, help="directory of sinfo, squeue, ... (default: PATH)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if not 0 < args.timeout <= 60:
        parser.error(f"--timeout must be between 0 and 60 seconds, got {args.timeout}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = build_registry(run_command, args.timeout, args.slurm_bin_dir)
    return serve_until_signalled(registry, args.port, args.listen_address, LOG)


if __name__ == "__main__":
    sys.exit(main())
