"""labkit-slurm-exporter on real Slurm 22.05 output (tests/monitoring/data/slurm, see its README)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import mon_helpers  # noqa: F401  (puts the exporter source on sys.path)
import pytest
import requests
from labkit_exporters import slurm
from mon_helpers import exporter_env, free_port, http_ok, running, wait_for
from mon_slurm import BINARIES, SCENARIOS, SLURM_DATA, replay_bin_dir, slurm_exporter
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def recorded(scenario: str, binary: str, part: str = "stdout") -> str:
    return (SLURM_DATA / scenario / f"{binary}.{part}").read_text()


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def names(found: Samples) -> set[str]:
    return {name for name, _ in found}


# --------------------------------------------------------------------------- the recordings


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_recordings_were_made_with_the_exporters_command_lines(scenario: str) -> None:
    assert set(BINARIES) == set(slurm.COMMANDS)
    for name, argv in slurm.COMMANDS.items():
        assert recorded(scenario, name, "argv").splitlines() == list(argv), f"{scenario}/{name}: record again"


def test_recordings_cover_up_and_down() -> None:
    assert {b: recorded("busy", b, "rc").strip() for b in BINARIES} == dict.fromkeys(BINARIES, "0")
    assert recorded("dbd-down", "sacctmgr", "rc").strip() != "0"
    assert recorded("dbd-down", "sinfo", "rc").strip() == "0"
    assert all(recorded("controller-down", b, "rc").strip() != "0" for b in BINARIES)


# --------------------------------------------------------------------------- parsing real output


def test_sinfo_one_row_per_node_with_state_gpus_and_reason() -> None:
    nodes = {n.node: n for n in slurm.parse_sinfo(recorded("busy", "sinfo"))}
    assert sorted(nodes) == ["slurmrec", "slurmrec2", "slurmrec3"]
    real = nodes["slurmrec"]
    assert (real.state, real.responding, real.gpus, real.gpus_allocated) == ("mixed", True, 2, 1)
    assert sorted(real.partitions) == ["gpu", "short"]  # "gpu*": the default mark is dropped
    assert real.reason == ""  # sinfo says "none"
    down = nodes["slurmrec2"]
    assert (down.state, down.responding, down.reason) == ("down", False, "Not responding")
    drained = nodes["slurmrec3"]
    assert (drained.state, drained.gpus, drained.gpus_allocated) == ("drained", 1, 0)
    assert drained.reason == "GPU XID 79 (fell off the bus)"


def test_squeue_jobs_states_reasons_and_gpus() -> None:
    jobs = slurm.parse_squeue(recorded("busy", "squeue"))
    lines = [line for line in recorded("busy", "squeue").splitlines() if line]
    assert len(jobs) == len(lines) == 9  # the array's three pending tasks one by one (-r)
    running = [j for j in jobs if j.state == "running"]
    assert [(j.user, j.account, j.gpus) for j in running] == [("alice", "vision", 1)]
    pending = {(j.user, j.reason, j.gpus) for j in jobs if j.state == "pending"}
    assert ("carol", "Resources", 0) in pending  # the CPU-only job
    assert ("bob", "JobHeldUser", 1) in pending and ("bob", "Dependency", 1) in pending
    assert sum(1 for j in jobs if j.user == "carol" and j.reason == "Priority") == 3


def test_sshare_accounts_and_users() -> None:
    rows = {(r.account, r.user): r.values for r in slurm.parse_sshare(recorded("busy", "sshare"))}
    assert rows[("vision", "alice")]["fairshare"] == 0.25
    assert rows[("vision", "alice")]["raw_usage"] == 236
    assert rows[("lab", "carol")]["fairshare"] == 0.75
    assert "fairshare" not in rows[("vision", "")]  # accounts have no fair-share factor
    assert rows[("vision", "")]["norm_shares"] == 0.5


def test_sdiag_cycle_times_in_microseconds() -> None:
    stats = slurm.parse_sdiag(recorded("busy", "sdiag"))
    assert stats.get("main", "Last cycle") == 157
    assert stats.get("backfill", "Last cycle") == 227
    assert stats.get("main", "Mean cycle") == 157
    assert stats.get("general", "DBD Agent queue size") == 0
    assert stats.get("general", "Server thread count") == 3


def test_scontrol_ping_up_and_down() -> None:
    assert slurm.parse_ping(recorded("busy", "scontrol")) == [slurm.Ping("primary", "slurmrec", True)]
    assert slurm.parse_ping(recorded("controller-down", "scontrol")) == [
        slurm.Ping("primary", "slurmrec", False)
    ]


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (slurm.parse_sinfo, "slurmrec|gpu*|mixed|gpu:2\n"),
        (slurm.parse_sinfo, "slurmrec|gpu|3|gpu:2|gpu:0|none|\n"),
        (slurm.parse_squeue, "alice|vision|gpu\n"),
        (slurm.parse_sshare, "vision|alice|1|x|0|0|0.5\n"),
        (slurm.parse_sdiag, "Server thread count: 3\n"),
        (slurm.parse_ping, "slurm_load_ctl_conf error\n"),
    ],
)
def test_output_it_does_not_understand_is_a_parse_error(parser: object, text: str) -> None:
    with pytest.raises(slurm.ParseError):
        parser(text)  # type: ignore[operator]


def test_gpu_counts_with_types_and_index_lists() -> None:
    # Formats of nodes with typed GPUs (not in the recording: its fake GPUs have no type).
    assert slurm.gres_gpus("gpu:a100:2(S:0-1),gpu:v100:1(S:0)") == 3
    assert slurm.gres_gpus("gpu:a100:1(IDX:0,2),shard:4") == 1
    assert slurm.tres_gpus("cpu=2,mem=8G,node=1,billing=2,gres/gpu=2,gres/gpu:a100=2") == 2
    assert slurm.tres_gpus("cpu=2,gres/gpu:a100=1,gres/gpu:v100=1") == 2
    assert slurm.node_state("mixed+planned") == ("mixed", True)
    assert slurm.node_state("idle~") == ("idle", True)


# --------------------------------------------------------------------------- the real exporter process


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Samples]:
    """Every scenario scraped twice from the exporter process reading the recordings."""
    out = {}
    for scenario in SCENARIOS:
        tmp = tmp_path_factory.mktemp(scenario)
        with slurm_exporter(replay_bin_dir(tmp / "bin", scenario), tmp / "exporter.log") as url:
            requests.get(url, timeout=20)
            out[scenario] = samples(requests.get(url, timeout=20).text)
    return out


def test_busy_cluster(scraped: dict[str, Samples]) -> None:
    s = scraped["busy"]
    assert value(s, "labkit_slurm_controller_up") == 1
    assert value(s, "labkit_slurm_dbd_up") == 1
    for name in BINARIES:
        assert value(s, "labkit_slurm_command_up", command=name) == 1, name
        assert value(s, "labkit_slurm_command_failures_total", command=name) == 0, name
    assert value(s, "labkit_slurm_node_state", node="slurmrec2", state="down") == 1
    assert value(s, "labkit_slurm_node_state", node="slurmrec3", state="drained") == 1
    assert value(s, "labkit_slurm_node_responding", node="slurmrec2") == 0
    assert value(s, "labkit_slurm_node_reason", node="slurmrec3", reason="GPU XID 79 (fell off the bus)") == 1
    assert value(s, "labkit_slurm_node_gpus", node="slurmrec") == 2
    assert value(s, "labkit_slurm_node_gpus_allocated", node="slurmrec") == 1
    assert value(s, "labkit_slurm_partition_nodes", partition="gpu", state="mixed") == 1
    assert value(s, "labkit_slurm_partition_nodes", partition="short", state="mixed") == 1
    assert value(s, "labkit_slurm_jobs", state="pending", user="carol", account="lab", partition="gpu") == 4
    assert (
        value(s, "labkit_slurm_jobs", state="running", user="alice", account="vision", partition="gpu") == 1
    )
    assert value(s, "labkit_slurm_jobs_pending", reason="Priority", partition="gpu") == 4
    assert value(s, "labkit_slurm_jobs_pending_gpus", reason="Resources", partition="gpu") == 0
    assert value(s, "labkit_slurm_user_gpus_allocated", user="alice", account="vision") == 1
    assert value(s, "labkit_slurm_share_fairshare", account="vision", user="bob") == 0.5
    assert value(s, "labkit_slurm_scheduler_last_cycle_seconds", scheduler="main") == pytest.approx(157e-6)
    assert value(s, "labkit_slurm_scheduler_mean_cycle_seconds", scheduler="backfill") == pytest.approx(
        227e-6
    )
    assert value(s, "labkit_slurm_controller_ping", role="primary", host="slurmrec") == 1


def test_slurmdbd_down(scraped: dict[str, Samples]) -> None:
    s = scraped["dbd-down"]
    assert value(s, "labkit_slurm_dbd_up") == 0
    assert value(s, "labkit_slurm_command_up", command="sacctmgr") == 0
    assert value(s, "labkit_slurm_command_failures_total", command="sacctmgr") >= 2  # once per scrape
    assert value(s, "labkit_slurm_controller_up") == 1
    assert value(s, "labkit_slurm_node_gpus", node="slurmrec") == 2


def test_controller_down_leaves_only_health_series(scraped: dict[str, Samples]) -> None:
    s = scraped["controller-down"]
    assert value(s, "labkit_slurm_controller_up") == 0
    assert value(s, "labkit_slurm_controller_ping", role="primary", host="slurmrec") == 0
    assert value(s, "labkit_slurm_dbd_up") == 0
    assert value(s, "labkit_slurm_command_up", command="scontrol") == 1  # it answered: DOWN
    for name in ("sinfo", "squeue", "sdiag", "sshare", "sacctmgr"):
        assert value(s, "labkit_slurm_command_up", command=name) == 0, name
    assert not {n for n in names(s) if n.startswith(("labkit_slurm_node_", "labkit_slurm_jobs"))}


def test_controller_down_skips_the_commands_that_would_wait_for_it(tmp_path: Path) -> None:
    """With no slurmctld UP, sinfo & co. would retry until their timeout: they are not run at all."""
    ran = tmp_path / "ran"
    waits = f"echo $(basename $0) >> {ran}; exec sleep 30\n"
    bin_dir = replay_bin_dir(
        tmp_path / "bin",
        "controller-down",
        override=dict.fromkeys(("sinfo", "squeue", "sdiag", "sshare"), waits),
    )
    with slurm_exporter(bin_dir, tmp_path / "exporter.log", timeout=3.0) as url:
        start = time.monotonic()
        s = samples(requests.get(url, timeout=20).text)
        assert time.monotonic() - start < 2
    assert not ran.exists()
    assert value(s, "labkit_slurm_controller_up") == 0
    assert value(s, "labkit_slurm_command_up", command="sinfo") == 0
    assert value(s, "labkit_slurm_command_duration_seconds", command="sinfo") == 0


def test_hanging_garbled_and_missing_commands_cost_only_their_series(tmp_path: Path) -> None:
    bin_dir = replay_bin_dir(
        tmp_path / "bin",
        "busy",
        override={"sdiag": "exec sleep 30\n", "squeue": "echo 'not|squeue'\n", "sshare": "exit 0\n"},
    )
    (bin_dir / "sacctmgr").unlink()
    with slurm_exporter(bin_dir, tmp_path / "exporter.log", timeout=1.0) as url:
        start = time.monotonic()
        s = samples(requests.get(url, timeout=20).text)
        assert time.monotonic() - start < 5  # commands run at once, each cut at its timeout
        s = samples(requests.get(url, timeout=20).text)
    assert value(s, "labkit_slurm_command_up", command="sdiag") == 0
    assert value(s, "labkit_slurm_command_duration_seconds", command="sdiag") == pytest.approx(1, abs=0.5)
    assert value(s, "labkit_slurm_command_up", command="squeue") == 0
    assert value(s, "labkit_slurm_command_up", command="sacctmgr") == 0
    assert value(s, "labkit_slurm_dbd_up") == 0
    assert value(s, "labkit_slurm_command_failures_total", command="sdiag") >= 2
    assert "labkit_slurm_jobs" not in names(s) and "labkit_slurm_scheduler_last_cycle_seconds" not in names(s)
    assert value(s, "labkit_slurm_command_up", command="sshare") == 1  # empty answer: no associations
    assert value(s, "labkit_slurm_node_gpus", node="slurmrec") == 2
    assert value(s, "labkit_slurm_controller_up") == 1
    assert "Traceback" not in (tmp_path / "exporter.log").read_text()


def test_bad_timeout_is_refused_by_name() -> None:
    with pytest.raises(SystemExit):
        slurm.parse_args(["--timeout", "0"])


def test_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "labkit_exporters.slurm",
        "--listen-address",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    cmd += ["--slurm-bin-dir", str(replay_bin_dir(tmp_path / "bin", "busy"))]
    with running(cmd, tmp_path / "exporter.log", env=exporter_env()) as proc:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/metrics"), timeout=30, what="slurm exporter")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert "Traceback" not in (tmp_path / "exporter.log").read_text()
