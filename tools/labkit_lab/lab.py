"""The local lab (front-end: tools/labctl.py): real systemd hosts in Docker containers on a private
network, a caching apt proxy on this machine, the node image and the lab's service images.

Everything the lab downloads comes from ``LABKIT_DEBIAN_MIRROR`` (default: the first Debian mirror in this
machine's own apt sources), so the same code works behind a proxy or with a local mirror.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from labkit_lab.common import (
    PACKAGE,
    PROXY_PORT,
    REPO,
    SUITE,
    bootstrap_rootfs,
    host_debian_mirror,
    recipe_digest,
    ssh_keypair,
)

CACHE = Path(os.environ.get("LABKIT_CACHE", "/var/cache/labkit"))
IMAGE_REPO = "labkit/node"
IMAGE_ALIAS = f"{IMAGE_REPO}:debian12"
NETWORK = os.environ.get("LABKIT_LAB_NETWORK", "labkit-lab")
SUBNET = os.environ.get("LABKIT_LAB_SUBNET", "172.30.57.0/24")
ACNG_DIR = CACHE / "apt-cacher-ng"
LAB_LABEL = "labkit.lab"

# The flags that let a container boot systemd in this sandbox (never --privileged: it fails here).
SYSTEMD_RUN_FLAGS: dict[str, Any] = {
    "cgroupns": "host",
    "volumes": {"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
    "tmpfs": {"/run": "", "/run/lock": "", "/tmp": ""},
    # SYS_NICE: Slurm's task/affinity pins a job's tasks to its CPUs.
    "cap_add": ["SYS_ADMIN", "SYS_NICE"],
    "security_opt": ["seccomp=unconfined"],
    "stop_signal": "SIGRTMIN+3",
}


@dataclass(frozen=True)
class LabHost:
    """One host of the local lab."""

    name: str
    address: str
    groups: tuple[str, ...]
    # Runs its own Docker engine (GPU nodes; the monitoring server's containers): that needs NET_ADMIN
    # and a real directory for /var/lib/docker (overlay on overlay fails; the engine uses vfs).
    runs_docker: bool = False

    @property
    def shares_scratch(self) -> bool:
        """GPU nodes see one scratch directory (/srv/scratch), as the lab's NFS scratch export would give
        them: kernel NFS is not available in these containers, a bind mount of one directory is."""
        return "gpu_nodes" in self.groups

    def spec(self, image: str) -> str:
        """A digest of everything the container is created from; a change means: recreate it."""
        parts = [image, self.address, self.groups, self.runs_docker, SYSTEMD_RUN_FLAGS,
                 str(SHARED_SCRATCH) if self.shares_scratch else ""]
        text = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def lab_hosts() -> list[LabHost]:
    """The lab's hosts: an infra host and two GPU nodes (without GPUs), as in inventory/example."""
    prefix = SUBNET.rsplit(".", 1)[0]
    infra = ("ldap_servers", "nfs_servers", "mail_relays", "monitoring_servers")
    return [
        LabHost("infra01", f"{prefix}.10", infra, runs_docker=True),
        LabHost("gpu01", f"{prefix}.21", ("gpu_nodes",), runs_docker=True),
        LabHost("gpu02", f"{prefix}.22", ("gpu_nodes",), runs_docker=True),
    ]


def gateway() -> str:
    return SUBNET.rsplit(".", 1)[0] + ".1"


def dynamic_range() -> str:
    """The upper half of the lab subnet, where Docker picks addresses for molecule's instances; the lab's
    hosts have fixed ones below it, so a host stopped by a test (its address released) gets it back on
    start even while molecule scenarios create instances beside the lab."""
    return SUBNET.rsplit(".", 1)[0] + ".128/25"


def apt_proxy_url() -> str:
    """What lab hosts put in their apt proxy setting."""
    return f"http://{gateway()}:{PROXY_PORT}"


def log(msg: str) -> None:
    print(f"labctl: {msg}", flush=True)


def docker_client() -> Any:
    import docker  # lazy: `labctl --help` must not need the engine

    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except Exception as exc:  # the SDK raises several types for "no engine"
        sys.exit(f"labctl: no Docker engine reachable ({exc}); start dockerd first (.ci/run does)")
    return client


# --------------------------------------------------------------------------- image
def image_tag() -> str:
    return f"{IMAGE_REPO}:debian12-{recipe_digest('container')}"


def build_image(force: bool = False) -> str:
    """Build (or reuse) the node image; returns its tag. Also tags it as IMAGE_ALIAS for molecule."""
    client = docker_client()
    tag = image_tag()
    if not force and client.images.list(name=tag):
        log(f"image {tag} is up to date")
        client.images.get(tag).tag(IMAGE_ALIAS)
        return tag
    mirror = host_debian_mirror()
    rootfs = CACHE / "rootfs-build"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {SUITE} from {mirror} (about a minute)")
    bootstrap_rootfs("container", rootfs, mirror)
    log(f"docker import -> {tag}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    changes = ['CMD ["/sbin/init"]', "ENV container=docker"]  # stop signal: set at run time
    cmd = ["docker", "import"] + [arg for c in changes for arg in ("--change", c)] + ["-", tag]
    subprocess.run(cmd, stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
    if tar.wait() != 0:
        sys.exit("labctl: tar of the rootfs failed")
    shutil.rmtree(rootfs)
    client.images.get(tag).tag(IMAGE_ALIAS)
    return tag


# --------------------------------------------------------------------------- service images
IMAGES_DIR = PACKAGE / "service-images"
ARCHIVE_DIR = REPO / ".lab" / "images"
SHARED_SCRATCH = REPO / ".lab" / "scratch"  # the GPU nodes' /srv/scratch (LabHost.shares_scratch)


def service_images() -> list[dict[str, str]]:
    images: list[dict[str, str]] = yaml.safe_load((IMAGES_DIR / "images.yml").read_text())
    return images


def archive_path(image: dict[str, str]) -> Path:
    """Where the lab keeps an image as a `docker save` archive (monitoring_server_image_archive_dir)."""
    return ARCHIVE_DIR / f"{image['image'].rsplit('/', 1)[-1]}-{image['tag']}.tar"


def build_service_images() -> None:
    """Build the lab's stand-ins for upstream service images and save each as an archive.

    An image is rebuilt when its Dockerfile or the node image changes (recorded in a label).
    """
    import docker

    client = docker_client()
    base = client.images.get(IMAGE_ALIAS)
    ARCHIVE_DIR.mkdir(parents=True, exist_ok=True)
    for image in service_images():
        ref = f"{image['image']}:{image['tag']}"
        dockerfile = IMAGES_DIR / image["name"] / "Dockerfile"
        recipe = hashlib.sha256(dockerfile.read_bytes() + base.id.encode()).hexdigest()[:16]
        try:
            current = client.images.get(ref).labels.get("labkit.recipe")
        except docker.errors.ImageNotFound:
            current = None
        archive = archive_path(image)
        if current != recipe:
            log(f"building {ref}")
            client.images.build(
                path=str(dockerfile.parent),
                tag=ref,
                buildargs={"BASE": IMAGE_ALIAS, "APT_PROXY": apt_proxy_url()},
                labels={"labkit.recipe": recipe},
                network_mode=NETWORK,
                rm=True,
                forcerm=True,
            )
            archive.unlink(missing_ok=True)
        if not archive.exists():
            log(f"saving {ref} to {archive.relative_to(REPO)}")
            partial = archive.with_suffix(".partial")
            with partial.open("wb") as out:
                for chunk in client.images.get(ref).save(named=True):
                    out.write(chunk)
            partial.rename(archive)


# --------------------------------------------------------------------------- infra
def ensure_network(client: Any) -> None:
    import docker

    try:
        network = client.networks.get(NETWORK)
    except docker.errors.NotFound:
        network = None
    if network is not None:
        pools = network.attrs.get("IPAM", {}).get("Config") or [{}]
        if pools[0].get("IPRange") == dynamic_range():
            return
        if network.attrs.get("Containers"):  # in use: keep it, say how to get the range
            log(f"network {NETWORK} has no dynamic range {dynamic_range()} yet: `make lab-down` renews it")
            return
        network.remove()
        log(f"network {NETWORK} recreated with the dynamic range {dynamic_range()}")
    pool = docker.types.IPAMPool(subnet=SUBNET, gateway=gateway(), iprange=dynamic_range())
    ipam = docker.types.IPAMConfig(pool_configs=[pool])
    client.networks.create(NETWORK, driver="bridge", ipam=ipam, labels={LAB_LABEL: "network"})
    log(f"network {NETWORK} ({SUBNET}, instances from {dynamic_range()}) created")


def proxy_running() -> bool:
    pid_file = ACNG_DIR / "pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (ValueError, ProcessLookupError):
        return False
    return True


def ensure_proxy() -> None:
    """apt-cacher-ng on loopback and the lab gateway only; the cache outlives the lab."""
    if proxy_running():
        return
    binary = shutil.which("apt-cacher-ng") or "/usr/sbin/apt-cacher-ng"
    if not Path(binary).exists():
        sys.exit("labctl: apt-cacher-ng is not installed (apt-get install apt-cacher-ng)")
    for sub in ("cache", "log", "conf"):
        (ACNG_DIR / sub).mkdir(parents=True, exist_ok=True)
    # Our own minimal config: no remapping to distribution mirror lists (those hosts may be unreachable
    # here); the proxy forwards exactly the URL a host asked for and caches it.
    (ACNG_DIR / "conf" / "acng.conf").write_text(
        f"CacheDir: {ACNG_DIR / 'cache'}\nLogDir: {ACNG_DIR / 'log'}\n"
        "SupportDir: /usr/lib/apt-cacher-ng\nExThreshold: 4\nPassThroughPattern: .*:443$\n"
    )
    subprocess.run(
        [
            binary,
            "-c",
            str(ACNG_DIR / "conf"),
            "ForeGround=0",
            f"BindAddress=127.0.0.1 {gateway()}",
            f"Port={PROXY_PORT}",
            f"PidFile={ACNG_DIR / 'pid'}",
            f"SocketPath={ACNG_DIR / 'socket'}",
        ],
        check=True,
    )
    for _ in range(50):
        if proxy_running():
            log(f"apt proxy listening on 127.0.0.1 and {gateway()} port {PROXY_PORT}")
            return
        time.sleep(0.1)
    sys.exit("labctl: apt-cacher-ng did not start; see " + str(ACNG_DIR / "log"))


def infra() -> None:
    client = docker_client()
    ensure_network(client)
    ensure_proxy()


# --------------------------------------------------------------------------- hosts
def container_name(host: LabHost) -> str:
    return f"labkit-{host.name}"


def start_host(client: Any, host: LabHost, image: str) -> Any:
    import docker

    name = container_name(host)
    spec = host.spec(image)
    docker_volume = f"labkit-{host.name}-docker"
    try:
        container = client.containers.get(name)
        if container.labels.get("labkit.spec", spec) == spec:  # hosts from before spec labels are kept
            if container.status != "running":
                container.start()
            return container
        log(f"{host.name} was made from another image or definition; recreating it")
        container.remove(force=True, v=True)
        with contextlib.suppress(docker.errors.NotFound):
            client.volumes.get(docker_volume).remove(force=True)
    except docker.errors.NotFound:
        pass
    flags = dict(SYSTEMD_RUN_FLAGS)
    volumes = dict(flags.pop("volumes"))
    if host.runs_docker:
        flags["cap_add"] = [*flags["cap_add"], "NET_ADMIN"]
        volumes[docker_volume] = {"bind": "/var/lib/docker", "mode": "rw"}
    if host.shares_scratch:
        SHARED_SCRATCH.mkdir(parents=True, exist_ok=True)
        SHARED_SCRATCH.chmod(0o1777)
        volumes[str(SHARED_SCRATCH)] = {"bind": "/srv/scratch", "mode": "rw"}
    container = client.containers.create(
        image,
        name=name,
        hostname=host.name,
        detach=True,
        labels={LAB_LABEL: "host", "labkit.host": host.name, "labkit.spec": spec},
        volumes=volumes,
        **flags,
    )
    client.networks.get(NETWORK).connect(container, ipv4_address=host.address, aliases=[host.name])
    with contextlib.suppress(docker.errors.APIError):
        client.networks.get("bridge").disconnect(container)
    container.start()
    log(f"{host.name} started at {host.address}")
    return container


def wait_for_systemd(container: Any, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    state = "unknown"
    while time.monotonic() < deadline:
        _code, out = container.exec_run(["systemctl", "is-system-running"])
        state = str(out.decode()).strip()
        if state in ("running", "degraded"):
            return state
        time.sleep(1)
    sys.exit(f"labctl: {container.name}: systemd did not finish booting (state {state})")


def admin_key() -> Path:
    """The lab admin's SSH key pair (made once, outside git); its public half goes into the inventory."""
    return ssh_keypair(REPO / ".lab" / "admin_ed25519", "labadmin@labkit-lab")


def write_inventory(hosts: list[LabHost]) -> Path:
    groups: dict[str, dict[str, Any]] = {}
    for host in hosts:
        for group in host.groups:
            groups.setdefault(group, {"hosts": {}})["hosts"][host.name] = None
    inventory = {
        "all": {
            "hosts": {
                h.name: {
                    "ansible_connection": "community.docker.docker",
                    "ansible_host": container_name(h),
                    "lab_address": h.address,
                }
                for h in hosts
            },
            "children": groups,
            "vars": {"lab_admin_pubkey": admin_key().with_suffix(".pub").read_text().strip()},
        }
    }
    path = REPO / "inventory" / "lab" / "hosts.yml"
    header = "# Written by `make lab` (tools/labctl.py); do not edit.\n---\n"
    path.write_text(header + yaml.safe_dump(inventory, sort_keys=False))
    return path


def up() -> None:
    image = build_image()
    infra()
    build_service_images()
    client = docker_client()
    hosts = lab_hosts()
    containers = [start_host(client, h, image) for h in hosts]
    for container in containers:
        state = wait_for_systemd(container)
        log(f"{container.name}: systemd {state}")
    path = write_inventory(hosts)
    log(f"inventory written to {path.relative_to(REPO)}")


def lab_containers(client: Any) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LAB_LABEL}=host"}))


def status(as_json: bool = False) -> None:
    client = docker_client()
    rows = []
    by_name = {container_name(h): h for h in lab_hosts()}
    for container in sorted(lab_containers(client), key=lambda c: c.name):
        host = by_name.get(container.name)
        rows.append(
            {
                "host": container.labels.get("labkit.host", container.name),
                "state": container.status,
                "address": host.address if host else "?",
                "groups": list(host.groups) if host else [],
                "services": running_services(container) if container.status == "running" else [],
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("The lab is not running. Start it with: make lab")
        return
    print(f"{'HOST':<9} {'STATE':<8} {'ADDRESS':<14} {'GROUPS':<55} SERVICES")
    for row in rows:
        print(
            f"{row['host']:<9} {row['state']:<8} {row['address']:<14} {','.join(row['groups']):<55} "
            f"{' '.join(row['services']) or '-'}"
        )
    print(
        "\nReach a host:  docker exec -it labkit-<host> bash   (or ansible -i inventory/lab <host> -m ping)"
        f"\nApt proxy:     {apt_proxy_url()} (apt-cacher-ng on this machine)"
        "\nRemove it all: make lab-down"
    )


# Services labkit's roles start; `status` lists those active on each host (rebuild-node.yml's health
# summary reads the same file).
WATCHED_SERVICES_FILE = PACKAGE / "watched-services.yml"


def watched_services() -> list[str]:
    services: list[str] = yaml.safe_load(WATCHED_SERVICES_FILE.read_text())["labkit_watched_services"]
    return services


def running_services(container: Any) -> list[str]:
    watched = watched_services()
    _, out = container.exec_run(["systemctl", "is-active", *watched])
    states = out.decode().split()
    return [svc for svc, state in zip(watched, states, strict=False) if state == "active"]


def slurm_cgroups(names: list[str], root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """The cgroups slurmd made for the given node names. The lab's hosts share this machine's cgroup tree
    (cgroupns=host), so a node's job cgroups sit at the root as ``slurm_<NodeName>`` (v1: under each
    controller, v2: at the top) and outlive its container. Deepest first, ready to be removed."""
    tops: list[Path] = []
    for name in names:
        tops += [root / f"slurm_{name}", *root.glob(f"*/slurm_{name}")]
    found: list[Path] = []
    for top in tops:
        if top.is_dir() and not top.is_symlink():
            found += [top, *(p for p in top.rglob("*") if p.is_dir())]
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def remove_slurm_cgroups(names: list[str]) -> None:
    """Remove what slurmd left of the given nodes' cgroups (a cgroup directory goes with rmdir once empty)."""
    left = []
    for path in slurm_cgroups(names):
        try:
            path.rmdir()
        except OSError:
            left.append(path)
    if left:
        log(f"could not remove {len(left)} Slurm cgroups (processes still in them?), e.g. {left[0]}")


JOB_IMAGE = "labkit-job:1"  # job_queue_default_image in inventory/lab


def job_image() -> None:
    """The lab's job image on every GPU node: the node image itself (Debian 12 with python3, coreutils,
    bash), loaded into the node's Docker as JOB_IMAGE, so a student's first `labq submit` finds it."""
    client = docker_client()
    tag = build_image()
    wanted = client.images.get(tag).id
    for host in lab_hosts():
        if not host.shares_scratch:  # the GPU nodes
            continue
        name = container_name(host)
        inspect = ["docker", "exec", name, "docker", "image", "inspect", "-f", "{{.Id}}", JOB_IMAGE]
        probe = subprocess.run(inspect, capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == wanted:
            log(f"{host.name}: job image {JOB_IMAGE} is up to date")
            continue
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "exec", "-i", name, "docker", "load", "-q"], stdin=save.stdout,
                              capture_output=True, text=True, timeout=900)
        save.wait(timeout=60)
        if load.returncode != 0:
            raise SystemExit(f"labctl: loading the job image into {host.name} failed: {load.stderr.strip()}")
        subprocess.run(["docker", "exec", name, "docker", "tag", tag, JOB_IMAGE], check=True)
        log(f"{host.name}: job image {JOB_IMAGE} loaded (the node image: Debian 12, python3)")


def down() -> None:
    client = docker_client()
    for container in lab_containers(client):
        container.remove(force=True, v=True)
        log(f"removed {container.name}")
    remove_slurm_cgroups([host.name for host in lab_hosts()])
    for volume in client.volumes.list(filters={"name": "labkit-"}):
        volume.remove(force=True)
    for network in client.networks.list(names=[NETWORK]):
        network.remove()
        log(f"removed network {NETWORK}")
    if proxy_running():
        os.kill(int((ACNG_DIR / "pid").read_text().strip()), 15)
        log("apt proxy stopped (its cache is kept)")
    inventory = REPO / "inventory" / "lab" / "hosts.yml"
    inventory.unlink(missing_ok=True)
    shutil.rmtree(SHARED_SCRATCH, ignore_errors=True)
