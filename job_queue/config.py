"""Node configuration for labqd/labq, read from a TOML file (default ``/etc/labq/config.toml``)."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .experiments import Experiments, ExperimentsConfigError, parse_experiments
from .notify import NotifyConfig, NotifyConfigError, parse_notify

DEFAULT_CONFIG_PATH = "/etc/labq/config.toml"
DEFAULT_SOCKET = "/run/labq/labq.sock"
CONFIG_ENV = "LABQ_CONFIG"
SOCKET_ENV = "LABQ_SOCKET"

_MOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ConfigError(ValueError):
    """The configuration file is missing a value or has a wrong one."""


@dataclass(frozen=True)
class MountSpec:
    """An admin-approved bind mount that jobs may ask for by name (``--mount NAME``)."""

    name: str
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class Config:
    gpus: tuple[str, ...] | None = ()
    """Fake GPU ids (no device requests are made), or None to read the inventory from NVML."""
    admin_group: str = "labq-admin"
    max_gpus_per_user: int = 0
    """0 means no limit."""
    mounts: dict[str, MountSpec] = field(default_factory=dict)
    default_image: str = "ubuntu:24.04"
    allowed_images: tuple[str, ...] = ()
    """Glob patterns; empty means any image present on the node."""
    allow_host_network: bool = False
    state_dir: str = "/var/lib/labq"
    socket_path: str = DEFAULT_SOCKET
    log_dir: str = "/var/lib/labq/logs"
    kill_grace: float = 30.0
    max_command_bytes: int = 64 * 1024
    max_request_bytes: int = 1024 * 1024
    node_cpus: float = 0.0
    """CPUs jobs may reserve in total; 0 means os.cpu_count()."""
    node_mem_bytes: int = 0
    """Memory jobs may reserve in total; 0 means physical memory."""
    metrics_port: int = 9848
    """Prometheus /metrics port (0 disables)."""
    metrics_address: str = "0.0.0.0"  # noqa: S104 - scraped by the lab's Prometheus server
    foreign_refresh_s: float = 30.0
    """How often NVML is re-read for foreign processes while a GPU is blocked by one."""
    max_connections_per_user: int = 32
    """Open socket connections one uid may hold; more are refused (``limit_exceeded``)."""
    max_connections: int = 1024
    """Open socket connections in total (also kept below the descriptor limit less ``reserved_fds``)."""
    reserved_fds: int = 256
    """File descriptors never given to connections: labqd's own Docker, SQLite and log files."""
    request_timeout_s: float = 10.0
    """A request that has begun must be complete (its newline read) within this time."""
    idle_timeout_s: float = 300.0
    """A connection with no request in progress is closed after this time."""
    max_pending_per_user: int = 50000
    """Pending and held jobs one user may have; a submit past it is refused whole (0: no limit)."""
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    """The ``[notify]`` table (job notifications; see job_queue/notify.py)."""
    scheduler: str = "labq"
    """``labq`` (this node's own queue) or ``slurm`` (the lab's Slurm; see job_queue/slurm_client.py)."""
    slurm_node_name: str = ""
    """This node's Slurm NodeName (slurmd -N); empty: the short host name."""
    slurm_gpu_devices: tuple[str, ...] = ()
    """The node's GPU device files in Slurm's index order (gres.conf); with NVML, their minor numbers
    name the GPUs; with fake GPUs, the files are passed into the container."""
    experiments: Experiments = field(default_factory=Experiments)
    """``[experiments]``: study database, MLflow, extra hosts for jobs (job_queue/experiments.py)."""

    @property
    def db_path(self) -> str:
        return str(Path(self.state_dir) / "labq.db")

    @property
    def fake_gpus(self) -> bool:
        return self.gpus is not None

    def effective_cpus(self) -> float:
        return self.node_cpus or float(os.cpu_count() or 1)

    def effective_mem(self) -> int:
        if self.node_mem_bytes:
            return self.node_mem_bytes
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    if key not in data:
        return default
    value = data[key]
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise ConfigError(f"config: '{key}' has the wrong type")
    if not isinstance(value, kind):
        raise ConfigError(f"config: '{key}' has the wrong type")
    return value


def _parse_mount(name: str, spec: Any) -> MountSpec:
    if not _MOUNT_NAME.fullmatch(name):
        raise ConfigError(f"config: invalid mount name '{name}'")
    if not isinstance(spec, str):
        raise ConfigError(f"config: mount '{name}' must be a string 'SOURCE:TARGET[:ro|rw]'")
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("rw")
    if len(parts) != 3 or parts[2] not in ("ro", "rw"):
        raise ConfigError(f"config: mount '{name}' must be 'SOURCE:TARGET[:ro|rw]'")
    source, target, mode = parts
    if not (source.startswith("/") and target.startswith("/")):
        raise ConfigError(f"config: mount '{name}' needs absolute paths")
    if os.path.normpath(source) == "/" or os.path.normpath(target) == "/":
        raise ConfigError(f"config: mount '{name}' may not use '/'")
    return MountSpec(name=name, source=source, target=target, read_only=mode == "ro")


KNOWN_KEYS = {
    "gpus", "admin_group", "max_gpus_per_user", "mounts", "default_image", "allowed_images",
    "allow_host_network", "state_dir", "socket", "log_dir", "kill_grace", "max_command_bytes",
    "max_request_bytes", "node_cpus", "node_mem_bytes", "foreign_refresh_s", "metrics_port",
    "metrics_address", "notify", "cluster_nodes", "max_connections_per_user", "max_connections",
    "reserved_fds", "request_timeout_s", "idle_timeout_s", "max_pending_per_user", "scheduler",
    "slurm_node_name", "slurm_gpu_devices", "experiments",
}
SCHEDULERS = ("labq", "slurm")


def _notify(data: dict[str, Any]) -> NotifyConfig:
    try:
        return parse_notify(data.get("notify", {}))
    except NotifyConfigError as exc:
        raise ConfigError(str(exc)) from exc


def _experiments(data: dict[str, Any]) -> Experiments:
    try:
        return parse_experiments(data.get("experiments", {}))
    except ExperimentsConfigError as exc:
        raise ConfigError(str(exc)) from exc


def parse_config(data: dict[str, Any]) -> Config:
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"config: unknown key '{unknown[0]}'")
    raw_gpus = data.get("gpus", "nvml")
    gpus: tuple[str, ...] | None
    if raw_gpus == "nvml":
        gpus = None
    elif isinstance(raw_gpus, list) and all(isinstance(g, str) and g for g in raw_gpus):
        if len(set(raw_gpus)) != len(raw_gpus):
            raise ConfigError("config: 'gpus' has duplicate ids")
        gpus = tuple(raw_gpus)
    else:
        raise ConfigError("config: 'gpus' must be \"nvml\" or a list of fake GPU ids")
    raw_mounts = _get(data, "mounts", dict, {})
    mounts = {name: _parse_mount(name, spec) for name, spec in raw_mounts.items()}
    nodes = _get(data, "cluster_nodes", list, [])
    if not all(isinstance(n, str) and n for n in nodes):
        raise ConfigError("config: 'cluster_nodes' must be a list of host names")
    allowed = _get(data, "allowed_images", list, [])
    if not all(isinstance(a, str) for a in allowed):
        raise ConfigError("config: 'allowed_images' must be a list of strings")
    scheduler = _get(data, "scheduler", str, Config.scheduler)
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"config: 'scheduler' must be one of {', '.join(SCHEDULERS)} (not '{scheduler}')")
    devices = _get(data, "slurm_gpu_devices", list, [])
    if not all(isinstance(d, str) and d.startswith("/dev/") for d in devices):
        raise ConfigError("config: 'slurm_gpu_devices' must be a list of device files under /dev/")
    cfg = Config(
        gpus=gpus,
        scheduler=scheduler,
        slurm_node_name=_get(data, "slurm_node_name", str, ""),
        slurm_gpu_devices=tuple(devices),
        admin_group=_get(data, "admin_group", str, Config.admin_group),
        max_gpus_per_user=_get(data, "max_gpus_per_user", int, 0),
        mounts=mounts,
        default_image=_get(data, "default_image", str, Config.default_image),
        allowed_images=tuple(allowed),
        allow_host_network=_get(data, "allow_host_network", bool, False),
        state_dir=_get(data, "state_dir", str, Config.state_dir),
        socket_path=_get(data, "socket", str, DEFAULT_SOCKET),
        log_dir=_get(data, "log_dir", str, Config.log_dir),
        kill_grace=float(_get(data, "kill_grace", (int, float), Config.kill_grace)),
        max_command_bytes=_get(data, "max_command_bytes", int, Config.max_command_bytes),
        max_request_bytes=_get(data, "max_request_bytes", int, Config.max_request_bytes),
        node_cpus=float(_get(data, "node_cpus", (int, float), 0.0)),
        node_mem_bytes=_get(data, "node_mem_bytes", int, 0),
        foreign_refresh_s=float(_get(data, "foreign_refresh_s", (int, float), 30.0)),
        metrics_port=_get(data, "metrics_port", int, 9848),
        metrics_address=_get(data, "metrics_address", str, Config.metrics_address),
        notify=_notify(data),
        experiments=_experiments(data),
        max_connections_per_user=_get(data, "max_connections_per_user", int, Config.max_connections_per_user),
        max_connections=_get(data, "max_connections", int, Config.max_connections),
        reserved_fds=_get(data, "reserved_fds", int, Config.reserved_fds),
        request_timeout_s=float(_get(data, "request_timeout_s", (int, float), Config.request_timeout_s)),
        idle_timeout_s=float(_get(data, "idle_timeout_s", (int, float), Config.idle_timeout_s)),
        max_pending_per_user=_get(data, "max_pending_per_user", int, Config.max_pending_per_user),
    )
    if not 0 <= cfg.metrics_port <= 65535:
        raise ConfigError("config: 'metrics_port' must be a port number (0 disables metrics)")
    if cfg.max_gpus_per_user < 0 or cfg.kill_grace < 0 or cfg.max_command_bytes <= 0:
        raise ConfigError("config: numeric values must not be negative")
    for key in ("max_connections_per_user", "max_connections"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config: '{key}' must be at least 1")
    if cfg.reserved_fds < 16:
        raise ConfigError("config: 'reserved_fds' must be at least 16")
    for key in ("request_timeout_s", "idle_timeout_s"):
        if not 0 < getattr(cfg, key) <= 86400:
            raise ConfigError(f"config: '{key}' must be more than 0 and at most 86400 seconds")
    if cfg.max_pending_per_user < 0:
        raise ConfigError("config: 'max_pending_per_user' must not be negative (0: no limit)")
    return cfg


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str | None = None) -> Config:
    p = Path(config_path(path))
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {p} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p}: {exc}") from exc
    return parse_config(data)
