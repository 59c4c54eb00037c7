"""Docker backend (docker SDK): build, create, start, adopt, stop and remove job containers; events.

All containers carry the labels ``labq.job``, ``labq.user`` and ``labq.instance`` and are named
``labq-<id>-<user>``, or ``labq-<id>-<user>-<instance>`` when that name belongs to another queue's container
(one left over from a queue database that was reset, or a second labqd on the same engine). Docker refuses
a second container with the same name, which is what makes starts exactly-once: both names are fixed for a
job, and a restarted labqd re-adopts its containers by label before it starts anything again.

A container may be made ahead of its start (``prepare``, see prepare.py). Each container carries
``labq.config``, a digest of everything it was created with (command, user, mounts, environment
with the GPUs, device requests); a created-but-never-started container of the job is only ever
started when that digest is the job's as it starts now, otherwise it is removed (never forced, so a
started container is never removed that way) and the container created again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from .config import Config
from .experiments import job_env
from .models import Job

log = logging.getLogger("labqd.runtime")

LABEL_JOB = "labq.job"
LABEL_USER = "labq.user"
LABEL_INSTANCE = "labq.instance"
LABEL_CONFIG = "labq.config"


_ALIGN = 4096  # bytes of followed output compared with Docker's log before its rest is appended


class RuntimeError_(Exception):
    """A Docker operation for a job failed (message is shown to the user)."""


def container_name(job: Job, instance: str = "") -> str:
    """The job's container name; with ``instance``: the name used when the short one is taken."""
    base = f"labq-{job.id}-{job.spec.user}"
    return f"{base}-{instance[:8]}" if instance else base


def working_dir(home: str, cwd: str) -> str:
    """The caller's cwd if it lies under their home directory, otherwise their home."""
    h = os.path.normpath(home)
    c = os.path.normpath(cwd)
    if c == h or c.startswith(h.rstrip("/") + "/"):
        return c
    return h


def job_environment(job: Job, cfg: Config | None = None) -> dict[str, str]:
    """The container's environment: the lab's experiment settings (``cfg.experiments``; a job's own
    ``--env`` may replace them), the job's ``--env``, then labq's own variables."""
    s = job.spec
    gpus = ",".join(job.assigned_gpus)
    env = job_env(cfg.experiments, s.user, s.home) if cfg is not None else {}
    env.update(s.env)
    env.update({
        "HOME": s.home,
        "USER": s.user,
        "LABQ_JOB_ID": str(job.id),
        "LABQ_JOB_NAME": s.name,
        "LABQ_USER": s.user,
        "LABQ_GPUS": gpus,
        "LABQ_NUM_GPUS": str(len(job.assigned_gpus)),
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": gpus,
        # Explicit, so an image default such as NVIDIA_VISIBLE_DEVICES=all cannot widen access.
        "NVIDIA_VISIBLE_DEVICES": gpus or "void",
    })
    if s.array_index is not None:
        env["LABQ_ARRAY_INDEX"] = str(s.array_index)
        env["LABQ_ARRAY_JOB_ID"] = str(s.array_id)
    if s.time_limit is not None:
        env["LABQ_TIME_LIMIT"] = str(s.time_limit)
    return env


HOST_CONFIG_KEYS = frozenset({"group_add", "mounts", "security_opt", "cap_drop", "privileged", "network_mode",
                              "nano_cpus", "mem_limit", "device_requests", "extra_hosts"})


def container_options(job: Job, cfg: Config, instance: str = "") -> dict[str, Any]:
    """Container settings in docker SDK terms (pure; unit-tested for the security options).

    Keys in HOST_CONFIG_KEYS go into the host config, the others to ``create_container``.
    """
    import docker.types

    s = job.spec
    mounts = [docker.types.Mount(target=s.home, source=s.home, type="bind", read_only=False)]
    for name in s.mounts:
        m = cfg.mounts.get(name)
        if m is None:
            raise RuntimeError_(f"mount '{name}' is no longer on the allow-list")
        mounts.append(docker.types.Mount(target=m.target, source=m.source, type="bind",
                                         read_only=m.read_only))
    opts: dict[str, Any] = {
        "image": s.image,
        "command": list(s.command),
        "name": container_name(job),
        "user": f"{s.uid}:{s.gid}",
        "group_add": [str(g) for g in s.groups if g != s.gid],
        "environment": job_environment(job, cfg),
        "labels": {LABEL_JOB: str(job.id), LABEL_USER: s.user, LABEL_INSTANCE: instance},
        "working_dir": working_dir(s.home, s.cwd),
        "mounts": mounts,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "privileged": False,
        "stdin_open": False,
        "tty": False,
    }
    if s.host_network and cfg.allow_host_network:
        opts["network_mode"] = "host"
    if cfg.experiments.extra_hosts:
        opts["extra_hosts"] = dict(sorted(cfg.experiments.extra_hosts.items()))
    if s.cpus is not None:
        opts["nano_cpus"] = int(s.cpus * 1e9)
    if s.mem is not None:
        opts["mem_limit"] = s.mem
    if not cfg.fake_gpus and job.assigned_gpus:
        opts["device_requests"] = [
            docker.types.DeviceRequest(driver="nvidia", device_ids=list(job.assigned_gpus),
                                       capabilities=[["gpu"]])
        ]
    opts["labels"][LABEL_CONFIG] = config_digest(opts)
    return opts


def config_digest(opts: dict[str, Any]) -> str:
    """A digest of the container settings other than its name and labels (``labq.config``)."""
    settings = {k: v for k, v in opts.items() if k not in ("name", "labels")}
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _being_removed(exc: Exception) -> bool:
    """A Docker error saying the container is gone or on its way out (a prepared one removed)."""
    import docker.errors

    return isinstance(exc, docker.errors.NotFound) or (
        isinstance(exc, docker.errors.APIError) and "marked for removal" in str(exc.explanation or exc))


def parse_docker_time(text: str | None) -> float | None:
    if not text or text.startswith("0001-"):
        return None
    t = text.rstrip("Z")
    if "." in t:
        head, frac = t.split(".", 1)
        t = f"{head}.{frac[:6]}"
    try:
        return datetime.fromisoformat(t + "+00:00").timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    job_id: int | None
    status: str  # created, running, exited, dead, paused, restarting, removing
    instance: str
    exit_code: int | None
    oom_killed: bool
    started_at: float | None
    finished_at: float | None
    config: str | None = None
    """Its ``labq.config`` label (None: made by a labqd that did not set it)."""

    @property
    def finished(self) -> bool:
        return self.status in ("exited", "dead")


def _info(attrs: dict[str, Any]) -> ContainerInfo:
    state = attrs.get("State", {})
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    job = labels.get(LABEL_JOB)
    return ContainerInfo(
        id=attrs["Id"],
        job_id=int(job) if job and job.isdigit() else None,
        status=state.get("Status", "unknown"),
        instance=labels.get(LABEL_INSTANCE, ""),
        exit_code=state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        started_at=parse_docker_time(state.get("StartedAt")),
        finished_at=parse_docker_time(state.get("FinishedAt")),
        config=labels.get(LABEL_CONFIG),
    )


class Runtime(Protocol):
    """What the daemon needs from a container backend (DockerRuntime; fakes in unit tests)."""

    def image_exists(self, image: str) -> bool: ...
    def inspect(self, container: str) -> ContainerInfo | None: ...
    def list_jobs(self) -> list[ContainerInfo]: ...
    def create_and_start(self, job: Job) -> str: ...
    def prepare(self, job: Job) -> str | None: ...
    def start_prepared(self, job: Job, cid: str) -> str: ...
    def start_created(self, cid: str) -> None: ...
    def matches(self, job: Job, info: ContainerInfo) -> bool: ...
    def discard(self, cid: str) -> None: ...
    def stop(self, cid: str, grace: float) -> None: ...
    def remove(self, cid: str) -> None: ...
    def write_logs(self, cid: str, path: str, uid: int, gid: int, follow: bool) -> None: ...
    def events(self) -> Iterator[ContainerEvent]: ...


class DockerRuntime:
    def __init__(self, cfg: Config, instance: str, client_factory: Callable[[], Any] | None = None) -> None:
        self.cfg = cfg
        self.instance = instance
        if client_factory is None:
            import docker

            # Ask for the API version once; later clients (one per thread) skip that round trip.
            version = docker.from_env(timeout=120).api.api_version

            def client_factory() -> Any:
                return docker.from_env(timeout=120, version=version)

        self._factory = client_factory
        self._local = threading.local()

    @property
    def client(self) -> Any:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._factory()
            self._local.client = c
        return c

    def image_exists(self, image: str) -> bool:
        import docker.errors

        try:
            self.client.images.get(image)
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code in (400, 404):
                return False
            raise
        return True

    def inspect(self, container: str) -> ContainerInfo | None:
        import docker.errors

        try:
            return _info(self.client.api.inspect_container(container))
        except docker.errors.NotFound:
            return None

    def list_jobs(self) -> list[ContainerInfo]:
        out = []
        labels = [LABEL_JOB, f"{LABEL_INSTANCE}={self.instance}"]
        for c in self.client.api.containers(all=True, filters={"label": labels}):
            info = self.inspect(c["Id"])
            if info is not None:
                out.append(info)
        return out

    def create_and_start(self, job: Job) -> str:
        """Create and start the job's container; never creates a second one for the same job."""
        import docker.errors

        names = (container_name(job), container_name(job, self.instance))
        for name in names:
            for _ in range(3):
                cid, started = self._create_or_adopt(job, name)
                if cid is None or started:
                    break  # not ours, or already started once: adopt, never start again
                try:
                    self.client.api.start(cid)
                except docker.errors.APIError as exc:
                    if not _being_removed(exc):
                        raise RuntimeError_(f"docker start failed: {exc.explanation or exc}") from exc
                    continue  # a prepared container removed meanwhile: make it again
                return cid
            else:
                raise RuntimeError_(f"container {name} keeps disappearing before its start")
            if cid is not None:
                return cid
            log.warning("job %d: container name %s is another queue's; trying the next", job.id, name)
        raise RuntimeError_(f"container names {' and '.join(names)} are taken by another queue's containers")

    def _create_or_adopt(self, job: Job, name: str) -> tuple[str | None, bool]:
        """(container id, already started) of the job's container ``name``; (None, False): not ours.

        A created-but-never-started container of the job made with other settings (prepared for
        other GPUs) is removed and the container created again.
        """
        for attempt in range(20):
            cid = self._create(job, name)
            if cid is not None:
                return cid, False
            existing = self.inspect(name)
            if existing is not None and (existing.job_id != job.id or existing.instance != self.instance):
                return None, False
            if existing is None or existing.status == "removing":
                time.sleep(0.02 * (attempt + 1))  # a prepared container being removed: its name frees
                continue
            if existing.status != "created":
                return existing.id, True
            if self.matches(job, existing):
                return existing.id, False
            log.info("job %d: container %s was prepared with other settings; making it again",
                     job.id, existing.id[:12])
            self.discard(existing.id)
        raise RuntimeError_(f"container name {name} stays taken by a container being removed")

    def _create(self, job: Job, name: str) -> str | None:
        """Create the job's container ``name``; None: the name is taken."""
        import docker.errors

        try:
            opts = container_options(job, self.cfg, self.instance) | {"name": name}
            api = self.client.api
            host = api.create_host_config(**{k: v for k, v in opts.items() if k in HOST_CONFIG_KEYS})
            args = {k: v for k, v in opts.items() if k not in HOST_CONFIG_KEYS}
            # The low-level call: the high-level one inspects the new container once more.
            created = api.create_container(**args, host_config=host, detach=True, use_config_proxy=False)
            return str(created["Id"])
        except docker.errors.ImageNotFound as exc:
            raise RuntimeError_(f"image '{job.spec.image}' not found on this node") from exc
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise RuntimeError_(f"docker create failed: {exc.explanation or exc}") from exc
        return None

    def matches(self, job: Job, info: ContainerInfo) -> bool:
        """Whether the container was made with the settings the job gets now (its GPUs included);
        one from a labqd that did not label them counts as matching (it never prepared ahead)."""
        return info.config is None or info.config == container_options(job, self.cfg, self.instance)[
            "labels"][LABEL_CONFIG]

    def prepare(self, job: Job) -> str | None:
        """Create the job's container (with ``job.assigned_gpus``) without starting it; None when its
        name is taken (a container of the job exists already, or another queue's)."""
        return self._create(job, container_name(job))

    def start_prepared(self, job: Job, cid: str) -> str:
        """Start the job's prepared container ``cid`` (made for the job as it starts now); if it is
        gone, create and start the job's container."""
        import docker.errors

        try:
            self.client.api.start(cid)
        except docker.errors.APIError as exc:
            if not _being_removed(exc):
                raise RuntimeError_(f"docker start failed: {exc.explanation or exc}") from exc
            return self.create_and_start(job)
        return cid

    def discard(self, cid: str) -> None:
        """Remove a container that was never started; a started one is left (no force)."""
        import docker.errors

        try:
            self.client.api.remove_container(cid, force=False)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            log.warning("container %s is not just created (started, or being removed); not removing it",
                        cid[:12])

    def start_created(self, cid: str) -> None:
        self.client.api.start(cid)

    def stop(self, cid: str, grace: float) -> None:
        """SIGTERM, wait ``grace`` seconds, then SIGKILL (docker stop)."""
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.stop(cid, timeout=max(0, round(grace)))

    def remove(self, cid: str) -> None:
        import docker.errors

        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(cid, force=True)

    def write_logs(self, cid: str, path: str, uid: int, gid: int, follow: bool) -> None:
        """(Re)write the container's whole output to ``path`` (owner-only).

        With ``follow`` the file is rewritten live until the container exits; without it the
        output is written to a temporary file and renamed, so a failure never empties a good file.
        """
        stream = self.client.api.logs(cid, stdout=True, stderr=True, stream=True, follow=follow)
        target = path if follow else f"{path}.tmp"
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, 0o600)
            for chunk in stream:
                os.write(fd, chunk)
            if follow:  # what was followed is in the file: its size and its last bytes
                written = os.lseek(fd, 0, os.SEEK_CUR)
                tail = os.pread(fd, _ALIGN, max(0, written - _ALIGN))
                os.write(fd, self._missed_by_follow(cid, written, tail))
        finally:
            os.close(fd)
        if not follow:
            Path(target).replace(path)

    def _missed_by_follow(self, cid: str, written: int, tail: bytes) -> bytes:
        """What a follow stream dropped at its end (Docker may close it before the last entries, and
        always before a last line without a newline): the bytes Docker holds after ``written``.

        One short ``tail=1`` request settles the usual case (nothing missing). Otherwise the whole log
        is read again and the rest is taken only if it lines up with what was written (a log Docker
        rotated away at its start does not, and is left as followed).
        """
        import docker.errors

        try:
            last = self.client.api.logs(cid, stdout=True, stderr=True, tail=1)
            if not last or tail.endswith(last):
                return b""
            pos, seen, rest = 0, b"", []
            for chunk in self.client.api.logs(cid, stdout=True, stderr=True, stream=True, follow=False):
                end = pos + len(chunk)
                if end > written - len(tail) and pos < written:
                    seen += chunk[max(0, written - len(tail) - pos):written - pos]
                if end > written:
                    rest.append(chunk[max(0, written - pos):])
                pos = end
        except docker.errors.NotFound:
            return b""
        except Exception as exc:  # dockerd restarting: the next follow rewrites the file anyway
            log.warning("container %s: could not check its log for output the stream missed: %s",
                        cid[:12], exc)
            return b""
        if seen != tail:
            log.warning("container %s: its log does not line up with the followed output; "
                        "the last %d bytes Docker holds were not added", cid[:12], max(0, pos - written))
            return b""
        return b"".join(rest)

    def events(self) -> Iterator[ContainerEvent]:
        """Subscribe now; the iterator yields the ``die`` and ``oom`` events of this queue's containers."""
        client = self._factory()
        labels = [LABEL_JOB, f"{LABEL_INSTANCE}={self.instance}"]
        stream = client.events(decode=True, filters={"type": "container", "event": ["die", "oom"],
                                                     "label": labels})
        return _container_events(stream)


@dataclass(frozen=True)
class ContainerEvent:
    kind: str  # "die" or "oom"
    cid: str
    job_id: int
    exit_code: int | None
    time: float | None


def _container_events(stream: Any) -> Iterator[ContainerEvent]:
    for ev in stream:
        attrs = (ev.get("Actor") or {}).get("Attributes") or {}
        job = attrs.get(LABEL_JOB, "")
        cid = ev.get("id") or (ev.get("Actor") or {}).get("ID")
        code = attrs.get("exitCode", "")
        nano = ev.get("timeNano")
        if cid and job.isdigit():
            yield ContainerEvent(kind=ev.get("Action") or ev.get("status") or "", cid=cid, job_id=int(job),
                                 exit_code=int(code) if code.lstrip("-").isdigit() else None,
                                 time=nano / 1e9 if isinstance(nano, int) else None)
