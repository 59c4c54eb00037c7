"""labqd's side of labq on Slurm: run one Slurm job's container inside that job, for its batch step.

The batch step (job_queue/slurm_step.py) asks ``slurm_run`` with its Slurm job id and the container's
spec. Before anything is created, labqd checks that

- the calling process (its pid from ``SO_PEERCRED``) sits in that job's cgroup (``/proc/PID/cgroup``
  names ``job_<id>``): only the job's own step can ask, no other process of the same user, no other user;
- Slurm (``scontrol show job -d``) says the job is running, on this node, and belongs to the caller's uid;
- the job holds exactly the GPUs the spec asks for, on this node (Slurm's ``IDX`` list).

Anything else is refused, and logged with the caller's pid and uid. The GPUs never come from the request:
Slurm's indices are mapped to this node's GPUs (device files in gres.conf order; with NVML, the device's
minor number gives its UUID). The container gets the job's step cgroup as its cgroup parent (Docker's
``cgroup_parent``), so Slurm's memory and device limits, accounting, ``scancel``, time limit and
preemption apply to its processes. Its user, groups, home, mounts and environment are as for a labq
job, plus ``SLURM_JOB_ID``. When it ends its exit code is the step's answer; an OOM kill is reported too.

No container ever runs twice: its name is fixed per Slurm job, an existing one is adopted (after a labqd
restart the step asks again), and the result of a finished job is kept in ``state_dir/slurm/ID.json`` and
answered again instead of starting anew.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config
from .identity import Caller
from .metrics import Metrics
from .models import Job, JobSpec, JobState
from .protocol import ErrorCode, ProtocolError, Submit, invalid
from .runtime import DockerRuntime, container_options, job_environment, working_dir
from .slurm import SlurmError, SlurmJob, labq_state, parse_time, show_job

log = logging.getLogger("labqd")

LABEL_SLURM_JOB = "labkit.slurm-job"
OOM_MARK = "labq:oom_killed"
_HOST_KEYS = frozenset({"group_add", "mounts", "security_opt", "cap_drop", "privileged", "network_mode",
                        "nano_cpus", "mem_limit", "device_requests", "devices", "cgroup_parent",
                        "extra_hosts"})


def container_name(job_id: int, user: str) -> str:
    return f"labq-slurm-{job_id}-{user}"


def job_cgroup(cgroup_text: str, job_id: int) -> str | None:
    """The cgroup a Slurm job's container goes under, from the step's ``/proc/PID/cgroup``: the path up
    to the step's directory (``.../job_ID/step_batch``), or None if the process is not in job ID.

    cgroup v2 has one ``0::/path`` line; v1 one line per hierarchy (the ``freezer`` or ``memory`` line
    is taken: Slurm's proctrack and memory limits live there).
    """
    lines = [ln.split(":", 2) for ln in cgroup_text.splitlines() if ln.count(":") >= 2]
    paths = [p for _, ctl, p in lines if ctl == ""]
    paths += [p for _, ctl, p in lines if "memory" in ctl.split(",") or "freezer" in ctl.split(",")]
    want = f"job_{job_id}"
    for path in paths:
        parts = path.split("/")
        if want in parts:
            i = parts.index(want)
            step = i + 1 < len(parts) and parts[i + 1].startswith("step_")
            keep = parts[: i + 2] if step else parts[: i + 1]
            return "/".join(keep)
    return None


def refuse(caller: Caller, job_id: int, why: str) -> ProtocolError:
    log.warning("slurm_run refused: pid %d uid %d (%s) for Slurm job %d: %s", caller.pid, caller.uid,
                caller.user, job_id, why)
    return ProtocolError(ErrorCode.PERMISSION, f"job: {why}")


def slurm_container_options(job: Job, sj: SlurmJob, cfg: Config, node: str, parent: str,
                            devices: list[str]) -> dict[str, Any]:
    """A Slurm job's container settings in docker SDK terms (pure): a labq job's (runtime.container_options:
    user, mounts, environment with the lab's experiment settings, extra hosts), plus Slurm's variables, under
    the job's cgroup, with Slurm's memory limit and, with fake GPUs, the job's device files."""
    opts = container_options(job, cfg)
    opts["name"] = container_name(job.id, job.spec.user)
    opts["labels"][LABEL_SLURM_JOB] = str(job.id)
    env = job_environment(job, cfg)
    env.update({"SLURM_JOB_ID": str(sj.id), "SLURM_JOB_GPUS": ",".join(map(str, sj.gpu_indices)),
                "SLURM_JOB_NODELIST": node, "SLURM_JOB_USER": sj.user})
    if job.spec.array_index is not None:
        env.update({"SLURM_ARRAY_TASK_ID": str(job.spec.array_index),
                    "SLURM_ARRAY_JOB_ID": str(job.spec.array_id)})
    opts["environment"] = env
    opts["cgroup_parent"] = parent
    opts.pop("mem_limit", None)  # Slurm's limit (the job's cgroup) is the one: its OOM is Slurm's
    if cfg.fake_gpus:
        opts.pop("device_requests", None)
        opts["devices"] = [f"{d}:{d}:rwm" for d in devices]
    return opts


class GpuMap:
    """Slurm's GPU index on this node -> (labq GPU id, device file)."""

    def __init__(self, cfg: Config, nvml: Any = None) -> None:
        self.cfg = cfg
        self._nvml = nvml

    def devices(self) -> list[str]:
        if self.cfg.slurm_gpu_devices:
            return list(self.cfg.slurm_gpu_devices)
        found = [p.name for p in Path("/dev").glob("nvidia[0-9]*")]
        return [f"/dev/{n}" for n in sorted(found, key=lambda n: int(n[6:]))]

    def resolve(self, indices: list[int]) -> list[tuple[str, str]]:
        devices = self.devices()
        out = []
        for idx in indices:
            if idx >= len(devices):
                raise ProtocolError(ErrorCode.INTERNAL, f"gpus: Slurm index {idx} is not one of this node's "
                                    f"{len(devices)} GPU devices (slurm_gpu_devices)")
            dev = devices[idx]
            if self.cfg.fake_gpus:
                ids = self.cfg.gpus or ()
                out.append((ids[idx] if idx < len(ids) else dev, dev))
            else:
                out.append((self._uuid(dev), dev))
        return out

    def _uuid(self, device: str) -> str:
        m = re.fullmatch(r"/dev/nvidia(\d+)", device)
        if m is None:
            raise ProtocolError(ErrorCode.INTERNAL, f"gpus: {device} is not an NVIDIA device file")
        nv = self._nvml
        if nv is None:
            import pynvml

            nv = self._nvml = pynvml
            nv.nvmlInit()
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            if nv.nvmlDeviceGetMinorNumber(h) == int(m.group(1)):
                uuid = nv.nvmlDeviceGetUUID(h)
                return uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        raise ProtocolError(ErrorCode.INTERNAL, f"gpus: no NVML device has minor number {m.group(1)}")


class SlurmRunner:
    def __init__(self, cfg: Config, node: str, runtime: DockerRuntime | None = None,
                 lookup: Callable[[int, str], SlurmJob] = show_job, proc_root: str = "/proc",
                 gpu_map: GpuMap | None = None, cgroup_root: str = "/sys/fs/cgroup",
                 metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.cgroup_root = cgroup_root
        self.node = node
        self.runtime = runtime or DockerRuntime(cfg, "slurm")
        self.lookup = lookup
        self.proc_root = proc_root
        self.gpu_map = gpu_map or GpuMap(cfg)
        self._active: set[int] = set()
        self._lock = threading.Lock()
        self.done_dir = Path(cfg.state_dir) / "slurm"

    # ---------------------------------------------------------------- checks
    def verify(self, caller: Caller, job_id: int, spec: Submit) -> tuple[SlurmJob, str]:
        try:
            text = (Path(self.proc_root) / str(caller.pid) / "cgroup").read_text()
        except OSError as exc:
            raise refuse(caller, job_id, f"cannot read the cgroup of pid {caller.pid}: {exc}") from exc
        parent = job_cgroup(text, job_id)
        if parent is None:
            raise refuse(caller, job_id, f"the calling process (pid {caller.pid}) is not a process of "
                         f"Slurm job {job_id}")
        try:
            job = self.lookup(job_id, self.node)
        except SlurmError as exc:
            raise refuse(caller, job_id, f"Slurm does not know job {job_id} ({exc})") from exc
        if job.uid != caller.uid:
            raise refuse(caller, job_id, f"Slurm job {job_id} belongs to {job.user}, not {caller.user}")
        if job.state not in ("RUNNING", "CONFIGURING", "COMPLETING"):
            raise refuse(caller, job_id, f"Slurm job {job_id} is {job.state}, not running")
        if self.node not in job.nodes:
            raise refuse(caller, job_id, f"Slurm job {job_id} runs on {','.join(job.nodes) or 'no node'}, "
                         f"not on {self.node}")
        if spec.gpus != len(job.gpu_indices):
            raise refuse(caller, job_id, f"the request asks for {spec.gpus} GPUs but Slurm job {job_id} "
                         f"holds {len(job.gpu_indices)} on {self.node}")
        return job, parent

    def _policy(self, caller: Caller, r: Submit) -> str:
        cfg = self.cfg
        for m in r.mounts:
            if m not in cfg.mounts:
                raise invalid(f"mounts: '{m}' is not on the allow-list of {self.node}")
        if r.host_network and not cfg.allow_host_network:
            raise invalid("host_network: not allowed by lab policy on this node")
        home = os.path.normpath(caller.home)
        if home == "/" or not home.startswith("/"):
            raise ProtocolError(ErrorCode.PERMISSION, f"home: the home directory of {caller.user} "
                                f"('{caller.home}') cannot be mounted")
        if not Path(home).is_dir():
            raise invalid(f"home: {home} does not exist on {self.node}")
        img = r.image or cfg.default_image
        if cfg.allowed_images and not any(fnmatch.fnmatchcase(img, p) for p in cfg.allowed_images):
            raise invalid(f"image: '{img}' is not allowed on this node")
        if not self.runtime.image_exists(img):
            raise invalid(f"image: unknown image '{img}' (not present on {self.node})")
        return img

    # ---------------------------------------------------------------- the run
    def run(self, caller: Caller, job_id: int, spec: Submit, conn: socket.socket) -> dict[str, Any]:
        slurm_job, parent = self.verify(caller, job_id, spec)
        done = self._done(job_id)
        if done is not None:
            log.info("Slurm job %d: already ran here; answering its recorded result", job_id)
            return done
        with self._lock:
            if job_id in self._active:
                raise ProtocolError(ErrorCode.CONFLICT, f"job: Slurm job {job_id}'s container is already "
                                    "followed by another request")
            self._active.add(job_id)
        try:
            return self._run(caller, slurm_job, spec, parent, conn)
        except ProtocolError:
            raise
        except Exception as exc:  # Docker refused (bad command, image without a shell): say it plainly
            from .exits import explain_start_error

            text = str(getattr(exc, "explanation", None) or exc)
            why = explain_start_error(text) or text[:400]
            log.warning("Slurm job %d: its container did not start: %s", job_id, why)
            raise ProtocolError(ErrorCode.INVALID, f"container: {why}") from exc
        finally:
            with self._lock:
                self._active.discard(job_id)

    def _run(self, caller: Caller, sj: SlurmJob, spec: Submit, parent: str,
             conn: socket.socket) -> dict[str, Any]:
        from .service import _default_name, log_path

        image = self._policy(caller, spec)
        gpus = self.gpu_map.resolve(list(sj.gpu_indices))
        js = JobSpec(user=caller.user, uid=caller.uid, gid=caller.gid, groups=list(caller.groups),
                     home=caller.home, cwd=working_dir(caller.home, spec.cwd), image=image,
                     command=list(spec.command), gpus=spec.gpus,
                     name=spec.name or _default_name(spec.command),
                     time_limit=spec.time_limit, cpus=spec.cpus, mem=None, env=dict(spec.env),
                     mounts=list(spec.mounts), host_network=spec.host_network)
        task, array = sj.raw.get("ArrayTaskId", ""), sj.raw.get("ArrayJobId", "")
        if task.isdigit() and array.isdigit():  # LABQ_ARRAY_INDEX as on the per-node queue
            js.array_index, js.array_id = int(task), int(array)
        job = Job(id=sj.id, spec=js, state=JobState.RUNNING, submit_time=0.0,
                  assigned_gpus=[g for g, _ in gpus])
        job.submit_time = parse_time(sj.raw.get("SubmitTime", "")) or time.time()
        cid, adopted = self._create_or_adopt(job, sj, parent, [d for _, d in gpus])
        if self.metrics is not None and not adopted:
            self.metrics.job_started(job, time.time())
        log.info("Slurm job %d (%s): container %s %s under %s with GPUs %s", sj.id, caller.user, cid[:12],
                 "adopted" if adopted else "started", parent, ",".join(job.assigned_gpus) or "none")
        path = log_path(self.cfg, sj.id, slurm=True)
        writer = threading.Thread(target=self._write_logs, args=(cid, path, caller.uid, caller.gid),
                                  daemon=True, name=f"slurm-log-{sj.id}")
        writer.start()
        waiter = threading.Thread(target=self._wait, args=(cid,), daemon=True, name=f"slurm-wait-{sj.id}")
        waiter.start()
        self._watch(cid, conn, waiter)
        writer.join(timeout=30)
        info = self.runtime.inspect(cid)
        exit_code = info.exit_code if info is not None else None
        oom = bool(info.oom_killed) if info is not None else False
        if exit_code == 137 and not oom:
            oom = self._oom_in(parent)
        if oom:
            self._mark_oom(sj.id)
        result = {"exit_code": exit_code, "oom_killed": oom, "container": cid}
        self._count(job, exit_code, oom)
        self._record(sj.id, result)
        try:
            self.runtime.remove(cid)
        except Exception:
            log.exception("Slurm job %d: removing container %s failed", sj.id, cid[:12])
        log.info("Slurm job %d: container ended with exit code %s%s", sj.id, exit_code,
                 " (OOM killed)" if oom else "")
        return result

    def _create_or_adopt(self, job: Job, sj: SlurmJob, parent: str, devices: list[str]) -> tuple[str, bool]:
        client = self.runtime.client
        name = container_name(job.id, job.spec.user)
        existing = self.runtime.inspect(name)
        if existing is not None:
            labels = client.api.inspect_container(name)["Config"]["Labels"] or {}
            if labels.get(LABEL_SLURM_JOB) != str(job.id):
                raise ProtocolError(ErrorCode.CONFLICT, f"job: a container named {name} exists and is not "
                                    f"Slurm job {job.id}'s")
            if existing.status == "created":
                client.api.start(existing.id)
            return existing.id, True
        opts = slurm_container_options(job, sj, self.cfg, self.node, parent, devices)
        self._allow_mknod(parent)
        host = {k: opts.pop(k) for k in list(opts) if k in _HOST_KEYS}
        created = client.api.create_container(host_config=client.api.create_host_config(**host), **opts)
        cid = str(created["Id"])
        client.api.start(cid)
        return cid, False

    def _allow_mknod(self, parent: str) -> None:
        """cgroup v1 only: let the job's cgroup grant ``mknod`` (never read or write) on the node's GPUs.

        Slurm denies the GPUs a job does not hold with ``rwm`` in its devices cgroup (job and step).
        runc always gives a container ``c *:* m`` (mknod of any device; the container has no
        CAP_MKNOD to use it), and the kernel refuses that in a cgroup whose parent denies ``m`` on
        any device, so no container could start under the job. Taking ``m`` off those denials keeps
        every GPU the job does not hold closed for reading and writing, and lets the container start.
        """
        root = Path(self.cgroup_root) / "devices"
        if not root.is_dir():
            return  # cgroup v2: devices are eBPF programs, nothing to adjust
        rules = []
        for dev in self.gpu_map.devices():
            try:
                rdev = Path(dev).stat().st_rdev
            except OSError:
                continue
            rules.append(f"c {os.major(rdev)}:{os.minor(rdev)} m")
        parts = parent.strip("/").split("/")
        start = next((i for i, p in enumerate(parts) if p.startswith("job_")), len(parts))
        for depth in range(start + 1, len(parts) + 1):
            allow = root.joinpath(*parts[:depth], "devices.allow")
            for rule in rules:
                allow.write_text(rule)

    def _write_logs(self, cid: str, path: str, uid: int, gid: int) -> None:
        try:
            self.runtime.write_logs(cid, path, uid, gid, True)
        except Exception:
            log.exception("container %s: writing its log failed", cid[:12])

    def _wait(self, cid: str) -> None:
        try:
            self.runtime.client.api.wait(cid, timeout=None)
        except Exception:
            log.exception("container %s: waiting for it failed", cid[:12])

    def _watch(self, cid: str, conn: socket.socket, waiter: threading.Thread) -> None:
        """Until the container ends: a line from the step ("stop") or its disconnect stops it."""
        stopping = False
        conn.settimeout(0.5)
        while waiter.is_alive():
            if stopping:
                waiter.join(0.5)
                continue
            try:
                data = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            stopping = True
            why = "asked to stop (scancel, time limit or preemption)" if data else "its batch step is gone"
            log.info("container %s: %s; stopping it (grace %g s)", cid[:12], why, self.cfg.kill_grace)
            threading.Thread(target=self._stop, args=(cid,), daemon=True).start()

    def _stop(self, cid: str) -> None:
        try:
            self.runtime.stop(cid, self.cfg.kill_grace)
        except Exception:
            log.exception("container %s: stop failed", cid[:12])

    def _oom_in(self, parent: str) -> bool:
        """Slurm's limit is on the job's cgroup: an OOM kill there shows in its memory counters."""
        root = Path(self.cgroup_root)
        job_dir = parent.rsplit("/", 1)[0] if "/step_" in parent else parent
        dirs = [job_dir.lstrip("/"), parent.lstrip("/")]
        for candidate in [root / d / "memory.events" for d in dirs] + [
                root / "memory" / d / "memory.oom_control" for d in dirs]:
            try:
                text = candidate.read_text()
            except OSError:
                continue
            m = re.search(r"oom_kill (\d+)", text)
            if m and int(m.group(1)) > 0:
                return True
        return False

    def _count(self, job: Job, exit_code: int | None, oom: bool) -> None:
        """labq_jobs_finished for a Slurm job: the outcome Slurm gives it (cancelled, timeout) when it
        stopped the job, else the container's exit."""
        if self.metrics is None:
            return
        state = JobState.SUCCEEDED if exit_code == 0 else JobState.FAILED
        if not oom and exit_code != 0:
            try:
                slurm_state = labq_state(self.lookup(job.id, self.node).state)
            except SlurmError:
                slurm_state = ""
            if slurm_state in ("cancelled", "timeout"):
                state = JobState(slurm_state)
        job.state, job.exit_code, job.oom_killed = state, exit_code, oom
        self.metrics.job_finished(job)

    # ---------------------------------------------------------------- containers without their job
    def start_sweeper(self, every: float = 60.0) -> None:
        def loop() -> None:
            while True:
                try:
                    self.sweep()
                except Exception:
                    log.exception("sweep of Slurm jobs' containers failed")
                time.sleep(every)

        threading.Thread(target=loop, daemon=True, name="slurm-sweep").start()

    def sweep(self) -> list[int]:
        """Stop and remove the containers of Slurm jobs that no longer run here (labqd was down when their
        step ended); a running job's container is left for its step to ask again. Their Slurm job ids."""
        swept: list[int] = []
        workers: list[threading.Thread] = []
        for c in self.runtime.client.api.containers(all=True, filters={"label": LABEL_SLURM_JOB}):
            job_id = int((c.get("Labels") or {}).get(LABEL_SLURM_JOB, "0") or 0)
            with self._lock:
                if not job_id or job_id in self._active:
                    continue
            try:
                sj = self.lookup(job_id, self.node)
                # COMPLETING: the job is ending (scancel, time limit): its container must go too.
                alive = sj.state in ("RUNNING", "CONFIGURING") and self.node in sj.nodes
            except SlurmError:
                alive = False
            if alive:
                continue
            cid = str(c["Id"])
            log.warning("container %s of Slurm job %d: its job no longer runs here; stopping and removing it",
                        cid[:12], job_id)
            worker = threading.Thread(target=self._retire, args=(job_id, cid), daemon=True)
            worker.start()  # each its own grace time, side by side
            workers.append(worker)
            swept.append(job_id)
        for worker in workers:
            worker.join()
        return swept

    def _retire(self, job_id: int, cid: str) -> None:
        self._stop(cid)
        info = self.runtime.inspect(cid)
        if self._done(job_id) is None and info is not None:
            self._record(job_id, {"exit_code": info.exit_code, "oom_killed": info.oom_killed,
                                  "container": cid})
        try:
            self.runtime.remove(cid)
        except Exception:
            log.exception("container %s: removing it failed", cid[:12])

    def _mark_oom(self, job_id: int) -> None:
        """Record the OOM kill on the Slurm job (``AdminComment``, which only admins may set), for
        ``labq show``/``history`` and ``sacct -o AdminComment``: Slurm itself watches the step's own
        processes for OOM events, and on cgroup v1 does not see those of a container under the step."""
        from .slurm import run

        try:
            run(["scontrol", "update", f"JobId={job_id}", f"AdminComment={OOM_MARK}"])
        except SlurmError as exc:
            log.warning("Slurm job %d: could not record its OOM kill in Slurm: %s", job_id, exc)

    # ---------------------------------------------------------------- results
    def _done(self, job_id: int) -> dict[str, Any] | None:
        try:
            data = json.loads((self.done_dir / f"{job_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _record(self, job_id: int, result: dict[str, Any]) -> None:
        self.done_dir.mkdir(mode=0o700, exist_ok=True)
        tmp = self.done_dir / f".{job_id}.json"
        tmp.write_text(json.dumps(result))
        tmp.replace(self.done_dir / f"{job_id}.json")
