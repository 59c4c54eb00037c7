"""make gpu-check: every GPU-facing part of labkit against the real NVIDIA device (docs/gpu-check.md).

Prints a table ``check | result | evidence``: PASS, FAIL or SKIP (with what this machine lacks). Exits 1
only when a check FAILs; on a machine without an NVIDIA GPU and driver it says so and exits 0.

``--recording FILE`` runs the same checks against recorded NVML and nvidia-smi answers (recorded_nvml.py):
that is how CI tests this program. Only the NVML library, nvidia-smi, the PCI scan and the driver's version
file come from the recording; /proc, the processes, labqd, the exporter's collector, Ansible and Docker
are real in both modes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _p in (REPO, REPO / "monitoring" / "exporters", REPO / "tests" / "job_queue", HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
NOT_AVAILABLE_MIN = 2**63  # NVML's "not available" is 2^64-1: no real figure comes near 2^63
MiB = 2**20
# Tolerances against nvidia-smi: it rounds to whole MiB; a GPU metrics exporter samples every 30 s.
PROC_MEM_TOL = 2 * MiB
GPU_MEM_TOL_MIB = 256
UTIL_TOL = 15  # percentage points
DCGM_URL = "http://127.0.0.1:9400/metrics"
HOLDER_MIB = 64
CONTAINER_TOOLKIT_BINARIES = ("nvidia-container-runtime-hook", "nvidia-container-cli", "nvidia-ctk")
DRIVER_TASKS = (
    "Ask nvidia-smi for the GPUs and the driver",
    "Check nvidia-smi sees every GPU on the driver branch",
)


@dataclass(frozen=True)
class Row:
    check: str
    result: str
    evidence: str


class NoGpu(Exception):
    """This machine has no usable NVIDIA GPU and driver: nothing is checked."""


# ------------------------------------------------------------------------------------- the machine
@dataclass
class Machine:
    """The device side: real (pynvml, nvidia-smi, sysfs, /proc/driver) or from a recording."""

    nvml: Any
    pci_devices: Path
    driver_version_file: Path
    env: dict[str, str]  # for nvidia-smi, Ansible and labqd (a recording's nvidia-smi and pynvml)
    holder_cmd: list[str]  # python arguments: a process on GPU 0 until its stdin closes; prints "ready"
    recorded: bool = False
    holder_pid_sink: Callable[[int | None], None] = lambda pid: None  # the recording learns the holder

    def smi(self, *args: str) -> str:
        try:
            res = subprocess.run(
                ["nvidia-smi", *args], capture_output=True, text=True, timeout=60, env=self.env
            )
        except FileNotFoundError as exc:
            raise CheckError("nvidia-smi is not installed") from exc
        if res.returncode != 0:
            raise CheckError(
                f"nvidia-smi {' '.join(args)} exited {res.returncode}: "
                f"{(res.stderr or res.stdout).strip()[:300]}"
            )
        return res.stdout

    def smi_csv(self, *args: str) -> list[list[str]]:
        return [[f.strip() for f in line.split(",")] for line in self.smi(*args).splitlines() if line.strip()]


class CheckError(Exception):
    """A check found something wrong (FAIL, with this message as evidence)."""


CUDA_HOLDER = r"""
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
def ok(ret, what):
    if ret != 0:
        print(f"CUDA {what} failed: {ret}", flush=True)
        sys.exit(1)
dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
ok(cuda.cuInit(0), "cuInit")
ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ok(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
ok(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(sys.argv[1]) << 20)), "cuMemAlloc")
print("ready", flush=True)
sys.stdin.read()
"""
IDLE_HOLDER = "import sys; print('ready', flush=True); sys.stdin.read()"


def real_machine() -> Machine:
    try:
        import pynvml
    except ImportError as exc:
        if shutil.which("nvidia-smi") is None:
            raise NoGpu("no NVIDIA driver here (no nvidia-smi) and no nvidia-ml-py") from exc
        raise CheckError("nvidia-ml-py (pynvml) is not installed in this venv (make venv)") from exc
    smi = shutil.which("nvidia-smi")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        if smi is None:
            raise NoGpu(f"no NVIDIA driver here (NVML: {exc}; no nvidia-smi)") from exc
        raise CheckError(f"nvidia-smi is installed but NVML does not start: {exc}") from exc
    if pynvml.nvmlDeviceGetCount() == 0:
        raise NoGpu("the NVIDIA driver is loaded but NVML sees no GPU")
    return Machine(
        nvml=pynvml,
        pci_devices=Path("/sys/bus/pci/devices"),
        driver_version_file=Path("/proc/driver/nvidia/version"),
        env=dict(os.environ),
        holder_cmd=["-I", "-S", "-c", CUDA_HOLDER, str(HOLDER_MIB)],
    )


def recorded_machine(recording: Path, work: Path) -> Machine:
    from recorded_nvml import HOLDER_PID_ENV, RECORDING_ENV, RecordedNvml, write_smi_replay, write_sysfs

    data = json.loads(recording.read_text())
    env = dict(os.environ)
    env[RECORDING_ENV] = str(recording.resolve())
    env["PATH"] = f"{write_smi_replay(work / 'bin').parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE / "recorded_pynvml"), str(REPO)])
    version = work / "driver_version"
    version.write_text(data["driver_version_file"])
    machine = Machine(
        nvml=RecordedNvml(recording),
        pci_devices=write_sysfs(data, work),
        driver_version_file=version,
        env=env,
        recorded=True,
        holder_cmd=["-I", "-S", "-c", IDLE_HOLDER],
    )

    def learn(pid: int | None) -> None:
        machine.nvml = RecordedNvml(recording, pid)
        if pid is None:
            env.pop(HOLDER_PID_ENV, None)
        else:
            env[HOLDER_PID_ENV] = str(pid)

    machine.holder_pid_sink = learn
    return machine


# ------------------------------------------------------------------------------------- the foreign process
@dataclass
class Holder:
    pid: int
    user: str
    proc: subprocess.Popen[str]


def _holder_starts() -> list[tuple[str, str, int | None, int | None]]:
    """(interpreter, user, uid, gid) to try: as `nobody` with the system's python3 when we are root (the
    owner then differs from the checker's), else as ourselves."""
    me = pwd.getpwuid(os.getuid()).pw_name
    starts: list[tuple[str, str, int | None, int | None]] = []
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() == 0 and system_python:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam("nobody")
            starts.append((system_python, pw.pw_name, pw.pw_uid, pw.pw_gid))
    return [*starts, (os.path.realpath(sys.executable), me, None, None)]


def _start_holder(m: Machine, gpu_uuid: str) -> tuple[subprocess.Popen[str], str]:
    """The running holder and its user; tries `nobody` first (as root), then ourselves."""
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": gpu_uuid, "PATH": "/usr/bin:/bin"}
    why = []
    for python, user, uid, gid in _holder_starts():
        try:
            proc = subprocess.Popen(
                [python, *m.holder_cmd],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd="/",
                user=uid,
                group=gid,
                extra_groups=[] if uid is not None else None,
            )
        except PermissionError as exc:
            why.append(f"as {user}: {exc}")
            continue
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line == "ready":
            return proc, user
        proc.kill()
        proc.wait()
        why.append(f"as {user}: {line or f'exit {proc.returncode}'}")
    raise CheckError(f"the CUDA process did not start ({'; '.join(why)})")


@contextlib.contextmanager
def foreign_process(m: Machine, gpu_uuid: str) -> Iterator[Holder]:
    proc, user = _start_holder(m, gpu_uuid)
    try:
        m.holder_pid_sink(proc.pid)
        yield Holder(pid=proc.pid, user=user, proc=proc)
    finally:
        m.holder_pid_sink(None)
        if proc.stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def smi_compute_apps(m: Machine) -> dict[int, tuple[str, int | None]]:
    """pid -> (GPU uuid, used MiB or None for [N/A]) as nvidia-smi reports them."""
    out: dict[int, tuple[str, int | None]] = {}
    for pid, uuid, used in m.smi_csv(
        "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"
    ):
        out[int(pid)] = (uuid, int(used) if used.isdigit() else None)
    return out


# ------------------------------------------------------------------------------------- checks
def check_discovery(m: Machine) -> Row:
    """labq's NvmlInventory against nvidia-smi: UUIDs, names, memory; no 'not available' leaked."""
    from job_queue.gpus import NvmlInventory

    name = "labq NVML discovery"
    snap = NvmlInventory(nvml=m.nvml).snapshot(())
    smi = m.smi_csv("--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits")
    seen = [(str(g.index), g.id, g.name) for g in snap]
    want = [(r[0], r[1], r[2]) for r in smi]
    if seen != want:
        raise CheckError(f"labq sees {seen}, nvidia-smi {want}")
    problems = []
    for g, row in zip(snap, smi, strict=True):
        if g.memory_total is None or g.memory_total >= NOT_AVAILABLE_MIN:
            problems.append(f"GPU {g.index}: memory_total {g.memory_total}")
        elif abs(g.memory_total / MiB - int(row[3])) > 1:
            problems.append(f"GPU {g.index}: {g.memory_total // MiB} MiB, nvidia-smi {row[3]} MiB")
        problems += [
            f"GPU {g.index} pid {p.pid}: memory {p.memory_bytes} (NVML's 'not available')"
            for p in g.foreign
            if p.memory_bytes is not None and p.memory_bytes >= NOT_AVAILABLE_MIN
        ]
    if problems:
        raise CheckError("; ".join(problems))
    unknown = sum(p.memory_bytes is None for g in snap for p in g.foreign)
    gpus = ", ".join(
        f"{g.index}: {g.name} {g.id} {g.memory_total // MiB if g.memory_total else '?'} MiB" for g in snap
    )
    return Row(
        name,
        PASS,
        f"{len(snap)} GPUs as nvidia-smi lists them ({gpus}); "
        f"{unknown} process(es) with memory not available, shown without a figure",
    )


def _pid_namespace_differs(snap_pids: list[int], proc: Path = Path("/proc")) -> bool:
    return bool(snap_pids) and not any((proc / str(p)).exists() for p in snap_pids)


def check_foreign_inventory(m: Machine, holder: Holder, apps: dict[int, tuple[str, int | None]]) -> Row:
    from job_queue.gpus import NvmlInventory

    name = "labq sees a foreign process"
    snap = NvmlInventory(nvml=m.nvml).snapshot(())
    for g in snap:
        for p in g.foreign:
            if p.pid != holder.pid:
                continue
            if p.user != holder.user:
                raise CheckError(
                    f"pid {p.pid} on GPU {g.index}: labq says user {p.user}, it runs as {holder.user}"
                )
            smi_uuid, smi_mib = apps.get(p.pid, ("", None))
            if smi_uuid and smi_uuid != g.id:
                raise CheckError(f"pid {p.pid}: labq puts it on {g.id}, nvidia-smi on {smi_uuid}")
            if smi_mib is not None and (
                p.memory_bytes is None or abs(p.memory_bytes - smi_mib * MiB) > PROC_MEM_TOL
            ):
                raise CheckError(f"pid {p.pid}: labq {p.memory_bytes} bytes, nvidia-smi {smi_mib} MiB")
            return Row(name, PASS, f"GPU {g.index}: {p.describe()} (nvidia-smi: {smi_mib} MiB on {smi_uuid})")
    pids = [p.pid for g in snap for p in g.foreign]
    if _pid_namespace_differs(pids):
        return Row(
            name,
            SKIP,
            f"NVML reports pids {pids}, none in this pid namespace (in a container?): run on the host",
        )
    raise CheckError(
        f"the CUDA process (pid {holder.pid} of {holder.user}) is not among labq's foreign processes {pids}"
    )


class _Logged(logging.Handler):
    """The exporter's log records during one scrape, for the evidence."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        self.lines.append(record.getMessage() + (f": {type(exc).__name__}: {exc}" if exc else ""))

    def text(self) -> str:
        return f"; the exporter logged: {' | '.join(self.lines)}" if self.lines else ""


def check_gpu_user_exporter(m: Machine, holder: Holder, apps: dict[int, tuple[str, int | None]]) -> Row:
    from labkit_exporters.gpu_users import NoContainers, build_registry
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    name = "GPU-user exporter series"
    registry, _ = build_registry(m.nvml, Path("/proc"), NoContainers())
    logged = _Logged()
    log = logging.getLogger("labkit_gpu_user_exporter")
    log.addHandler(logged)
    log.propagate = False
    try:
        scraped = generate_latest(registry).decode()
    finally:
        log.removeHandler(logged)
        log.propagate = True
    samples = [s for fam in text_string_to_metric_families(scraped) for s in fam.samples]

    def value(metric: str, **labels: str) -> float | None:
        for s in samples:
            if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
        return None

    errors = {s.labels["stage"]: s.value for s in samples if s.name == "labkit_gpu_exporter_errors_total"}
    if value("labkit_gpu_nvml_up") != 1:
        raise CheckError(
            f"labkit_gpu_nvml_up is {value('labkit_gpu_nvml_up')}, errors {errors}{logged.text()}"
        )
    uuid, smi_mib = apps.get(holder.pid, ("", None))
    if not uuid:
        raise CheckError(f"nvidia-smi does not list the CUDA process (pid {holder.pid})")
    owner = {"uuid": uuid, "user": holder.user, "labq_job": "", "container": ""}
    used = value("labkit_gpu_user_memory_used_bytes", **owner)
    count = value("labkit_gpu_user_processes", **owner)
    if used is None or not count:
        raise CheckError(f"no series for user {holder.user} on {uuid}; errors {errors}{logged.text()}")
    if smi_mib is not None and abs(used - smi_mib * MiB) > PROC_MEM_TOL * count:
        raise CheckError(f"{used:.0f} bytes for {holder.user}, nvidia-smi {smi_mib} MiB")
    if any(errors.values()):
        raise CheckError(f"errors while scraping: {errors}{logged.text()}")
    return Row(
        name,
        PASS,
        f"labkit_gpu_user_memory_used_bytes{{uuid={uuid},user={holder.user}}} "
        f"{used / MiB:.0f} MiB (nvidia-smi {smi_mib} MiB), processes {count:.0f}",
    )


def check_metrics_exporter(m: Machine, url: str) -> Row:
    """dcgm-exporter (or the nvidia_smi backend) of role dcgm_exporter against nvidia-smi --query-gpu."""
    from prometheus_client.parser import text_string_to_metric_families

    name = "GPU metrics exporter vs nvidia-smi"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return Row(
            name,
            SKIP,
            f"no GPU metrics exporter answers at {url} ({exc}): role dcgm_exporter "
            "(DCGM) is not deployed here",
        )
    mem: dict[str, float] = {}
    util: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            uuid = s.labels.get("UUID") or s.labels.get("uuid", "")
            if s.name == "DCGM_FI_DEV_FB_USED":
                mem[uuid] = s.value
            elif s.name == "nvidia_smi_memory_used_bytes":
                mem[uuid] = s.value / MiB
            elif s.name == "DCGM_FI_DEV_GPU_UTIL":
                util[uuid] = s.value
            elif s.name == "nvidia_smi_utilization_gpu_ratio":
                util[uuid] = s.value * 100
    smi = m.smi_csv("--query-gpu=uuid,memory.used,utilization.gpu", "--format=csv,noheader,nounits")
    problems, shown = [], []
    for uuid, used, gpu_util in smi:
        if uuid not in mem or uuid not in util:
            problems.append(f"{uuid}: no memory/utilisation series")
            continue
        if abs(mem[uuid] - int(used)) > max(GPU_MEM_TOL_MIB, 0.05 * int(used)):
            problems.append(f"{uuid}: memory {mem[uuid]:.0f} MiB, nvidia-smi {used} MiB")
        if gpu_util.isdigit() and abs(util[uuid] - int(gpu_util)) > UTIL_TOL:
            problems.append(f"{uuid}: utilisation {util[uuid]:.0f} %, nvidia-smi {gpu_util} %")
        shown.append(f"{uuid[:12]} {mem[uuid]:.0f}/{used} MiB {util[uuid]:.0f}/{gpu_util} %")
    if problems:
        raise CheckError("; ".join(problems))
    return Row(
        name,
        PASS,
        f"exporter/nvidia-smi within {GPU_MEM_TOL_MIB} MiB and {UTIL_TOL} points: " + ", ".join(shown),
    )


def _ansible_playbook() -> str | None:
    here = Path(sys.executable).parent / "ansible-playbook"
    return str(here) if here.exists() else shutil.which("ansible-playbook")


def driver_playbook(branch: int) -> list[dict[str, Any]]:
    """The role's own preflight (PCI scan) and its two nvidia-smi check tasks, copied from configure.yml;
    the check again with the next branch, which must fail."""
    import yaml

    configure = yaml.safe_load((REPO / "roles" / "nvidia_driver" / "tasks" / "configure.yml").read_text())
    tasks = {t["name"]: t for t in configure if t.get("name") in DRIVER_TASKS}
    missing = [n for n in DRIVER_TASKS if n not in tasks]
    if missing:
        raise CheckError(f"roles/nvidia_driver/tasks/configure.yml has no task {missing[0]!r}")
    wrong = {
        **tasks[DRIVER_TASKS[1]],
        "name": "wrong branch",
        "vars": {"nvidia_driver_branch": branch + 1},
        "ignore_errors": True,
    }
    return [
        {
            "name": "nvidia_driver health check",
            "hosts": "localhost",
            "gather_facts": True,
            "gather_subset": ["!all", "min"],
            "vars": {"nvidia_driver_branch": branch, "__nvidia_driver_reboot_needed": False},
            "tasks": [
                {
                    "name": "preflight",
                    "ansible.builtin.include_role": {
                        "name": "nvidia_driver",
                        "tasks_from": "preflight.yml",
                        "public": True,
                    },
                },
                tasks[DRIVER_TASKS[0]],
                tasks[DRIVER_TASKS[1]],
                wrong,
            ],
        }
    ]


def check_driver_role(m: Machine, work: Path) -> list[Row]:
    name = "nvidia_driver role check"
    playbook_bin = _ansible_playbook()
    if playbook_bin is None:
        return [Row(name, SKIP, "ansible-playbook is not installed (make venv)")]
    try:
        loaded = m.driver_version_file.read_text()
    except OSError as exc:
        raise CheckError(f"cannot read {m.driver_version_file}: {exc}") from exc
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d{3})\.([\d.]+)", loaded)
    if not found:
        raise CheckError(f"no driver version in {m.driver_version_file}: {loaded[:120]!r}")
    branch = int(found.group(1))
    import yaml

    book = work / "nvidia_driver_check.yml"
    book.write_text(yaml.safe_dump(driver_playbook(branch), sort_keys=False))
    env = {
        **m.env,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json",
        "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
    }
    res = subprocess.run(
        [
            playbook_bin,
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-e",
            f"_nvidia_driver_pci_devices={m.pci_devices}",
            str(book),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError as exc:
        raise CheckError(
            f"ansible-playbook exited {res.returncode}: {(res.stderr or res.stdout)[-400:]}"
        ) from exc
    # tasks of the included role are named "nvidia_driver : <name>"
    results = {
        t["task"]["name"].split(" : ", 1)[-1]: t["hosts"].get("localhost", {})
        for t in report["plays"][0]["tasks"]
    }
    scan = results.get("Look for NVIDIA GPUs on the PCI bus", {}).get("stdout_lines", [])
    smi = results.get(DRIVER_TASKS[0], {}).get("stdout_lines", [])
    check = results.get(DRIVER_TASKS[1], {})
    wrong = results.get("wrong branch", {})
    rows = []
    if check.get("failed") or check.get("skipped") or not check:
        what = "skipped" if check.get("skipped") else check.get("msg", f"not run; {res.stderr[-300:]}")
        rows.append(Row(name, FAIL, f"branch {branch}, PCI scan {scan}, nvidia-smi {smi}: {what}"))
    else:
        rows.append(
            Row(
                name,
                PASS,
                f"PCI scan finds {len(scan)} GPUs ({', '.join(scan)}), nvidia-smi lists "
                f"{len(smi)} on branch {branch} (loaded module {found.group(1)}.{found.group(2)})",
            )
        )
    if wrong.get("failed"):
        rows.append(
            Row(
                "nvidia_driver check rejects another branch",
                PASS,
                f"with branch {branch + 1} the role's check fails on this nvidia-smi",
            )
        )
    else:
        rows.append(
            Row(
                "nvidia_driver check rejects another branch",
                FAIL,
                f"with branch {branch + 1} the role's check did not fail: {wrong}",
            )
        )
    return rows


# ------------------------------------------------------------------------------------- Docker and labq
def docker_client() -> Any:
    from labq_helpers import docker_client as client

    return client()


def docker_engine() -> str | None:
    """None if a Docker engine answers, else why not."""
    try:
        docker_client().ping()
    except Exception as exc:
        return f"no Docker engine ({str(exc)[:120]})"
    return None


def container_toolkit() -> str | None:
    """None if the NVIDIA container toolkit is there, else why not."""
    try:
        runtimes = docker_client().info().get("Runtimes", {})
    except Exception:
        runtimes = {}
    if "nvidia" in runtimes or any(shutil.which(b) for b in CONTAINER_TOOLKIT_BINARIES):
        return None
    return (
        "no NVIDIA container toolkit (no nvidia runtime in Docker, no "
        + "/".join(CONTAINER_TOOLKIT_BINARIES)
        + ")"
    )


@contextlib.contextmanager
def labqd(m: Machine, image: str) -> Iterator[Any]:
    """A real labqd reading GPUs from NVML (the recorded one with --recording), on a socket of its own."""
    from labq_helpers import Labqd, _dispose

    root = Path(tempfile.mkdtemp(prefix="gpu-check-labqd-"))
    root.chmod(0o755)
    d = Labqd(root)
    d.config.write_text(
        f'gpus = "nvml"\ndefault_image = "{image}"\nstate_dir = "{root / "state"}"\n'
        f'socket = "{d.socket}"\nlog_dir = "{d.log_dir}"\nkill_grace = 2\nmetrics_port = 0\n'
    )
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(m.env)  # labqd inherits it: the recording's pynvml with --recording
    try:
        d.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield d
    finally:
        _dispose(d)


def check_labq_gpus(m: Machine, holder: Holder, image: str) -> Row:
    name = "labq gpus shows the foreign process"
    with labqd(m, image) as d:
        res = d.labq("gpus", "--json")
        text = d.labq("gpus")
    if res.returncode != 0:
        raise CheckError(f"labq gpus --json exited {res.returncode}: {res.stderr.strip()[:300]}")
    for g in json.loads(res.stdout):
        for p in g["foreign"]:
            if p["pid"] == holder.pid:
                if g["state"] != "foreign" or p["user"] != holder.user:
                    raise CheckError(
                        f"GPU {g['index']} state {g['state']}, pid {p['pid']} of {p['user']}: "
                        f"it runs as {holder.user}"
                    )
                line = next(
                    (ln for ln in text.stdout.splitlines() if f"pid {holder.pid} of {holder.user}" in ln), ""
                )
                if "BUSY outside labq" not in line:
                    raise CheckError(f"labq gpus prints {text.stdout.strip()!r}")
                return Row(name, PASS, f"`labq gpus`: {' '.join(line.split())}")
    raise CheckError(f"pid {holder.pid} not in `labq gpus --json`: {res.stdout.strip()[:400]}")


def _run_job(d: Any, gpus: int, command: list[str], image: str) -> tuple[dict[str, Any], str]:
    sub = d.labq("submit", "--gpus", str(gpus), "--image", image, "--json", "--", *command)
    if sub.returncode != 0:
        raise CheckError(f"labq submit --gpus {gpus} exited {sub.returncode}: {sub.stderr.strip()[:300]}")
    job_id = int(json.loads(sub.stdout)["ids"][0])
    from job_queue.models import FINAL_STATES

    job = d.wait_state(job_id, tuple(str(st.value) for st in FINAL_STATES), timeout=120)
    logs = d.labq("logs", str(job_id))
    return job, logs.stdout


LIST_DEVICES = "ls /dev | grep -E '^nvidia[0-9]+$' | sed 's/^/DEV /'; nvidia-smi -L; true"
UUID_LINE = re.compile(r"^GPU \d+: .*\(UUID: (GPU-[0-9a-f-]+)\)", re.MULTILINE)


def check_containers(m: Machine, image: str) -> list[Row]:
    rows = []
    with labqd(m, image) as d:
        job, out = _run_job(d, 1, ["sh", "-c", LIST_DEVICES], image)
        uuids = UUID_LINE.findall(out)
        devs = re.findall(r"^DEV (\S+)", out, re.MULTILINE)
        name = "labq job --gpus 1 sees exactly its GPU"
        if uuids == job["assigned_gpus"] and len(devs) == 1:
            rows.append(
                Row(
                    name,
                    PASS,
                    f"job {job['id']} got {uuids[0]}; in the container: nvidia-smi -L lists "
                    f"only it, /dev has {devs[0]}",
                )
            )
        else:
            rows.append(
                Row(
                    name,
                    FAIL,
                    f"job {job['id']} ({job['state']}) got {job['assigned_gpus']}; "
                    f"container sees {uuids}, /dev {devs}: {out.strip()[:300]}",
                )
            )
        job0, out0 = _run_job(d, 0, ["sh", "-c", LIST_DEVICES], image)
        name = "labq job --gpus 0 sees no GPU"
        if not UUID_LINE.findall(out0) and not re.findall(r"^DEV ", out0, re.MULTILINE):
            rows.append(
                Row(
                    name,
                    PASS,
                    f"job {job0['id']}: no GPU in nvidia-smi -L, no /dev/nvidiaN "
                    f"({' '.join(out0.split())[:120]})",
                )
            )
        else:
            rows.append(Row(name, FAIL, f"job {job0['id']} sees: {out0.strip()[:300]}"))
        _attempt(rows, "computation on the job's GPU", lambda: check_compute(d, image))
    return rows


COMPUTE = """
import sys
n = 64
try:
    import torch
    a = torch.arange(n * n, dtype=torch.float64, device="cuda").reshape(n, n) % 7
    print("RESULT torch", torch.cuda.get_device_name(0), float((a @ a.T).sum()))
except ImportError:
    try:
        import cupy
    except ImportError:
        print("RESULT none: neither torch nor cupy in the image")
        sys.exit(3)
    a = (cupy.arange(n * n, dtype=cupy.float64).reshape(n, n) % 7)
    print("RESULT cupy", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), float((a @ a.T).sum()))
"""


def expected_compute(n: int = 64) -> float:
    a = [[(i * n + j) % 7 for j in range(n)] for i in range(n)]
    return float(sum(sum(x * y for x, y in zip(a[i], a[k], strict=True)) for i in range(n) for k in range(n)))


def check_compute(d: Any, image: str) -> Row:
    name = "computation on the job's GPU"
    job, out = _run_job(d, 1, ["python3", "-c", COMPUTE], image)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT")), "")
    if not line:
        return Row(
            name,
            SKIP,
            f"image {image} has no python3 ({' '.join(out.split())[:120]}); pass "
            "--image with PyTorch or CuPy",
        )
    if line.startswith("RESULT none"):
        return Row(name, SKIP, f"image {image}: {line[12:]}; pass --image with PyTorch or CuPy")
    got = float(line.rsplit(" ", 1)[1])
    if got != expected_compute():
        raise CheckError(f"job {job['id']}: {line}, expected {expected_compute()}")
    return Row(name, PASS, f"job {job['id']} on {job['assigned_gpus']}: {line[7:]} (= CPU result)")


def pick_image(wanted: str | None) -> str | None:
    """The image for container jobs: --image, else the first local one of the toolkit role's check image,
    labq's default and the lab's node image (glibc is needed for the nvidia-smi the toolkit mounts)."""
    import yaml

    defaults = yaml.safe_load(
        (REPO / "roles" / "nvidia_container_toolkit" / "defaults" / "main.yml").read_text()
    )
    candidates = (
        [wanted]
        if wanted
        else [defaults["nvidia_container_toolkit_check_image"], "ubuntu:24.04", "labkit/node:debian12"]
    )
    client = docker_client()
    for image in candidates:
        with contextlib.suppress(Exception):
            client.images.get(image)
            return image
    return None


# ------------------------------------------------------------------------------------- driver
@dataclass
class Options:
    recording: Path | None = None
    dcgm_url: str = DCGM_URL
    image: str | None = None
    docker: bool = True
    rows: list[Row] = field(default_factory=list)


def _attempt(rows: list[Row], name: str, fn: Callable[[], Row | list[Row]]) -> None:
    try:
        out = fn()
    except CheckError as exc:
        rows.append(Row(name, FAIL, str(exc)))
        return
    except Exception as exc:  # a crash in a check is a failure of what it checks, with its evidence
        rows.append(Row(name, FAIL, f"{type(exc).__name__}: {exc}"))
        return
    rows.extend(out if isinstance(out, list) else [out])


def run_checks(opts: Options, work: Path) -> list[Row]:
    rows: list[Row] = []
    try:
        m = recorded_machine(opts.recording, work) if opts.recording else real_machine()
    except CheckError as exc:
        return [Row("NVIDIA driver and NVML", FAIL, str(exc))]
    _attempt(rows, "labq NVML discovery", lambda: check_discovery(m))
    _attempt(rows, "GPU metrics exporter vs nvidia-smi", lambda: check_metrics_exporter(m, opts.dcgm_url))
    _attempt(rows, "nvidia_driver role check", lambda: check_driver_role(m, work))
    docker_missing = "not asked to use Docker (--no-docker)" if not opts.docker else docker_engine()
    image = None if docker_missing else pick_image(opts.image)
    foreign_names = (
        "labq sees a foreign process",
        "GPU-user exporter series",
        "labq gpus shows the foreign process",
    )
    try:
        first_uuid = m.smi_csv("--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits")[
            0
        ][1]
        with foreign_process(m, first_uuid) as holder:
            apps = smi_compute_apps(m)
            _attempt(rows, foreign_names[0], lambda: check_foreign_inventory(m, holder, apps))
            _attempt(rows, foreign_names[1], lambda: check_gpu_user_exporter(m, holder, apps))
            if docker_missing:
                rows.append(Row(foreign_names[2], SKIP, f"{docker_missing}: labqd needs one"))
            else:
                _attempt(rows, foreign_names[2], lambda: check_labq_gpus(m, holder, image or "ubuntu:24.04"))
    except CheckError as exc:
        # no foreign process to look for: the first check fails with the reason, the others cannot run
        rows.append(Row(foreign_names[0], FAIL, str(exc)))
        rows += [Row(n, SKIP, "no foreign CUDA process (see above)") for n in foreign_names[1:]]
    container_names = (
        "labq job --gpus 1 sees exactly its GPU",
        "labq job --gpus 0 sees no GPU",
        "computation on the job's GPU",
    )
    missing = docker_missing or container_toolkit()
    if not missing and image is None:
        missing = "no image with glibc present (pass --image, e.g. the toolkit role's check image)"
    if missing:
        rows += [Row(n, SKIP, missing) for n in container_names]
    else:
        assert image is not None
        _attempt(rows, container_names[0], lambda: check_containers(m, image))
    return rows


def render(rows: list[Row]) -> str:
    head = ("check", "result", "evidence")
    w0 = max(len(head[0]), *(len(r.check) for r in rows))
    lines = [f"{head[0]:<{w0}} | {head[1]:<6} | {head[2]}", f"{'-' * w0}-|--------|{'-' * 40}"]
    lines += [f"{r.check:<{w0}} | {r.result:<6} | {r.evidence}" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--recording", type=Path, help="run against recorded NVML/nvidia-smi answers (CI)")
    p.add_argument(
        "--dcgm-url", default=DCGM_URL, help="GPU metrics exporter to compare (default %(default)s)"
    )
    p.add_argument(
        "--image", help="image for the container jobs (needs glibc; PyTorch or CuPy for the computation)"
    )
    p.add_argument("--no-docker", action="store_true", help="skip what needs a Docker engine")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(
        recording=args.recording, dcgm_url=args.dcgm_url, image=args.image, docker=not args.no_docker
    )
    # SIGTERM (a time limit) ends the run through the finally blocks: the CUDA process and labqd go too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(124))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        try:
            rows = run_checks(opts, Path(work))
        except NoGpu as exc:
            print(f"gpu-check: {exc}. Nothing was checked (run it on a node with an NVIDIA GPU and driver).")
            return 0
    source = f"recording {opts.recording}" if opts.recording else "this machine's GPUs"
    print(f"gpu-check against {source}:\n{render(rows)}")
    failed = [r.check for r in rows if r.result == FAIL]
    print(
        f"\n{len(rows)} checks: {len(rows) - len(failed)} passed or skipped, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
