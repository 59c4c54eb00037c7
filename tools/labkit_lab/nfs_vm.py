"""Two Debian 12 VMs under QEMU (software emulation) for labkit's real-NFS scenario (front-end:
tools/nfsvm.py; the scenario's checks and playbook: tests/nfs_vm).

Containers in this sandbox cannot mount NFS (no kernel NFS for them), so `make test-nfs-vm` boots two
small VMs with their own kernels: ``nfsvm-server`` (192.168.77.10) and ``nfsvm-client`` (192.168.77.20),
joined by a private link (QEMU ``-netdev socket`` on loopback). Each VM has a second NIC on user-mode
networking with ``restrict=on``: the host reaches its sshd through a loopback-only ``hostfwd``, and the VM
reaches nothing but the host's apt proxy (one ``guestfwd`` to 127.0.0.1:3142, see relay.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
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
    image_packages,
    recipe_digest,
    ssh_keypair,
)

SCENARIO = REPO / "tests" / "nfs_vm"  # converge.yml and inventory-vars.yml: the scenario's own files
STATE = REPO / ".lab" / "nfs-vm"
IMAGES = STATE / "images"
RUN = STATE / "run"
KEY = STATE / "admin_ed25519"
INVENTORY = STATE / "hosts.yml"
FACTS = RUN / "facts"  # Ansible's fact cache for these VMs: fresh VMs, fresh facts
PROXY = ("127.0.0.1", PROXY_PORT)
PRIVATE_NET = "192.168.77.0/24"
ADMIN = "labadmin"
SSH_WAIT_S = float(os.environ.get("LABKIT_NFS_VM_SSH_WAIT", "420"))
MEMORY_MB = int(os.environ.get("LABKIT_NFS_VM_MEMORY", "1024"))

@dataclass(frozen=True)
class VmSpec:
    """One VM: its name, its address on the private link, and its NICs' MAC suffix (image/customize.sh)."""

    name: str
    address: str
    mac_suffix: str
    groups: tuple[str, ...]


SERVER = VmSpec("nfsvm-server", "192.168.77.10", "10", ("nfs_servers",))
CLIENT = VmSpec("nfsvm-client", "192.168.77.20", "20", ("nfs_clients",))
VMS = (SERVER, CLIENT)


@dataclass
class RunningVm:
    """A booted VM as recorded in .lab/nfs-vm/run/<name>.json."""

    name: str
    address: str
    ssh_port: int
    pid: int
    serial_log: str

    @property
    def log_path(self) -> Path:
        return Path(self.serial_log)


def log(msg: str) -> None:
    print(f"nfsvm: {msg}", flush=True)


# --------------------------------------------------------------------------- image
def admin_key() -> Path:
    """The scenario's own admin key pair (outside git); its public half is baked into the image."""
    return ssh_keypair(KEY, f"{ADMIN}@nfs-vm")


def recipe_hash(mirror: str) -> str:
    return recipe_digest("vm", mirror, admin_key().with_suffix(".pub").read_text())


def require_tools() -> None:
    tools = ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        setup = "tools/labkit_lab/host-setup.sh nfs-vm"
        sys.exit(f"nfsvm: missing {', '.join(missing)}: run {setup} (make test-nfs-vm does)")


def proxy_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection(PROXY, timeout=2):
        return True
    return False


def build_image(force: bool = False) -> Path:
    """Build (or reuse) the VM image; returns its directory (base.qcow2, vmlinuz, initrd.img)."""
    require_tools()
    mirror = host_debian_mirror()
    target = IMAGES / recipe_hash(mirror)
    if (target / "base.qcow2").exists() and not force:
        log(f"image {target.relative_to(REPO)} is up to date")
        return target
    if not proxy_up():
        sys.exit(f"nfsvm: no apt proxy on {PROXY[0]}:{PROXY[1]}: run `tools/labctl.py infra` first")
    IMAGES.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=IMAGES))
    rootfs = work / "rootfs"
    try:
        started = time.monotonic()
        log(f"debootstrap {SUITE} from {mirror} through the apt proxy (a few minutes the first time)")
        pubkey = admin_key().with_suffix(".pub")
        bootstrap_rootfs("vm", rootfs, mirror, str(pubkey), http_proxy=f"http://{PROXY[0]}:{PROXY[1]}")
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if len(kernels) != 1 or len(initrds) != 1:
            sys.exit(f"nfsvm: expected one kernel and one initrd in the image, found {kernels} {initrds}")
        shutil.copy2(kernels[0], work / "vmlinuz")
        shutil.copy2(initrds[0], work / "initrd.img")
        raw = work / "disk.raw"
        with raw.open("wb") as disk:
            disk.truncate(4 * 1024**3)
        log("mkfs.ext4 -d (the rootfs becomes the disk, no mount needed)")
        subprocess.run(["mkfs.ext4", "-q", "-L", "root", "-d", str(rootfs), str(raw)], check=True)
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "base.qcow2")], check=True)
        raw.unlink()
        shutil.rmtree(rootfs)
        (work / "recipe.json").write_text(
            json.dumps({"suite": SUITE, "mirror": mirror, "packages": image_packages("vm")}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
        for old in IMAGES.iterdir():  # images of older recipes: never used again
            if old != target and not old.name.startswith("build-"):
                shutil.rmtree(old)
        log(f"image {target.relative_to(REPO)} built in {time.monotonic() - started:.0f}s")
    finally:
        if work.exists():
            shutil.rmtree(work)
    return target


# --------------------------------------------------------------------------- VMs
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def listening(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return bool(out.strip())


def qemu_command(vm: VmSpec, image: Path, disk: Path, ssh_port: int, link: str, serial: Path) -> list[str]:
    relay = f"cmd:{sys.executable} {PACKAGE / 'relay.py'} {PROXY[0]} {PROXY[1]}"
    usernet = (
        f"user,id=wan,restrict=on,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,"
        f"guestfwd=tcp:10.0.2.100:3142-{relay}"
    )
    append = f"root=/dev/vda rw console=ttyS0 systemd.hostname={vm.name} net.ifnames=1"
    return [
        "qemu-system-x86_64",
        "-name", vm.name,
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(MEMORY_MB),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", f"file:{serial}",
        "-monitor", "none",
        "-kernel", str(image / "vmlinuz"),
        "-initrd", str(image / "initrd.img"),
        "-append", append,
        "-drive", f"file={disk},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-netdev", usernet,
        "-device", f"virtio-net-pci,netdev=wan,mac=52:54:00:4e:00:{vm.mac_suffix}",
        "-netdev", f"socket,id=lan,{link}",
        "-device", f"virtio-net-pci,netdev=lan,mac=52:54:00:4e:01:{vm.mac_suffix}",
        "-device", "virtio-rng-pci",
        "-pidfile", str(RUN / f"{vm.name}.pid"),
    ]  # fmt: skip


def start_vm(vm: VmSpec, image: Path, link: str) -> RunningVm:
    disk = RUN / f"{vm.name}.qcow2"
    disk.unlink(missing_ok=True)
    base = image / "base.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)], check=True
    )
    serial = RUN / f"{vm.name}.serial.log"
    ssh_port = free_port()
    stderr = (RUN / f"{vm.name}.qemu.log").open("w")
    proc = subprocess.Popen(
        qemu_command(vm, image, disk, ssh_port, link, serial),
        stdin=subprocess.DEVNULL,
        stdout=stderr,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # outlives `nfsvm.py up`; `down` (or the test's finalizer) stops it
    )
    running = RunningVm(vm.name, vm.address, ssh_port, proc.pid, str(serial))
    (RUN / f"{vm.name}.json").write_text(json.dumps(asdict(running)))
    log(f"{vm.name}: qemu pid {proc.pid}, ssh on 127.0.0.1:{ssh_port}, serial log {serial.relative_to(REPO)}")
    return running


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie child of ours counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def ssh_args(vm: RunningVm) -> list[str]:
    return [
        "ssh",
        "-p", str(vm.ssh_port),
        "-i", str(KEY),
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=10",
    ]  # fmt: skip


def vm_ssh(
    vm: RunningVm, command: str, user: str = ADMIN, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a shell command on a VM over a real ssh login (as labadmin; `sudo` for root)."""
    return subprocess.run(
        [*ssh_args(vm), f"{user}@127.0.0.1", command], capture_output=True, text=True, timeout=timeout
    )


def wait_for_ssh(vm: RunningVm, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not alive(vm.pid):
            qemu_log = tail(RUN / f"{vm.name}.qemu.log")
            sys.exit(f"nfsvm: {vm.name}: qemu exited\n{tail(vm.log_path)}\n{qemu_log}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            if vm_ssh(vm, "systemctl is-system-running --wait >/dev/null; true", timeout=90).returncode == 0:
                return
        time.sleep(5)
    sys.exit(f"nfsvm: {vm.name}: no ssh within {SSH_WAIT_S:.0f}s\n{tail(vm.log_path)}")


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    return f"--- last {lines} lines of {path}\n" + "\n".join(text[-lines:])


def write_inventory(vms: list[RunningVm]) -> Path:
    groups: dict[str, dict[str, Any]] = {}
    specs = {v.name: v for v in VMS}
    for vm in vms:
        for group in specs[vm.name].groups:
            groups.setdefault(group, {"hosts": {}})["hosts"][vm.name] = None
    inventory = {
        "all": {
            "hosts": {
                vm.name: {
                    "ansible_host": "127.0.0.1",
                    "ansible_port": vm.ssh_port,
                    "lab_address": vm.address,
                }
                for vm in vms
            },
            "children": groups,
            "vars": {
                **yaml.safe_load((SCENARIO / "inventory-vars.yml").read_text()),
                "ansible_user": ADMIN,
                "ansible_ssh_private_key_file": str(KEY),
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                "nfsvm_server_address": SERVER.address,
                "nfsvm_private_net": PRIVATE_NET,
            },
        }
    }
    header = "# Written by tools/nfsvm.py up; do not edit.\n---\n"
    INVENTORY.write_text(header + yaml.safe_dump(inventory, sort_keys=False))
    return INVENTORY


def up(image: Path | None = None) -> list[RunningVm]:
    """Boot both VMs on fresh overlays of the cached image, wait for ssh, write the inventory."""
    image = image or build_image()
    down(quiet=True)
    RUN.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(FACTS, ignore_errors=True)
    started = time.monotonic()
    link_port = free_port()
    server = start_vm(SERVER, image, f"listen=127.0.0.1:{link_port}")
    for _ in range(100):  # the client's `connect` needs the server's `listen` socket
        if listening(link_port) or not alive(server.pid):
            break
        time.sleep(0.1)
    client = start_vm(CLIENT, image, f"connect=127.0.0.1:{link_port}")
    vms = [server, client]
    try:
        deadline = time.monotonic() + SSH_WAIT_S
        for vm in vms:
            wait_for_ssh(vm, deadline)
            log(f"{vm.name}: ssh up after {time.monotonic() - started:.0f}s")
    except BaseException:
        down(quiet=True)
        raise
    path = write_inventory(vms)
    log(f"inventory written to {path.relative_to(REPO)}")
    return vms


def run_playbook(
    playbook: Path = SCENARIO / "converge.yml", timeout: float = 1800, echo: bool = False
) -> tuple[int, str]:
    """ansible-playbook on the VMs (the repository's ansible.cfg; facts cached per boot): rc and output,
    also printed line by line as it comes when `echo` (the CLI; pytest shows it with -s)."""
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_CACHE_PLUGIN_CONNECTION=str(FACTS),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    ansible = Path(sys.executable).parent / "ansible-playbook"
    argv = [str(ansible) if ansible.exists() else "ansible-playbook", "-i", str(INVENTORY), str(playbook)]
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    with subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                lines.append(f"nfsvm: ansible-playbook killed after {timeout:.0f}s\n")
                break
        rc = proc.wait()
    return rc, "".join(lines)


def running_vms() -> list[RunningVm]:
    vms = []
    for path in sorted(RUN.glob("*.json")) if RUN.exists() else []:
        with contextlib.suppress(ValueError, TypeError):
            vms.append(RunningVm(**json.loads(path.read_text())))
    return vms


def down(quiet: bool = False, grace: float = 60.0) -> None:
    """Power the VMs off (`poweroff` over ssh), kill any qemu still there after `grace` seconds."""
    vms = [vm for vm in running_vms() if alive(vm.pid)]
    for vm in vms:
        with contextlib.suppress(subprocess.TimeoutExpired):
            vm_ssh(vm, "sudo systemctl poweroff --no-block", timeout=20)
    deadline = time.monotonic() + grace
    while any(alive(vm.pid) for vm in vms) and time.monotonic() < deadline:
        time.sleep(1)
    for vm in vms:
        if alive(vm.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(vm.pid, signal.SIGKILL)
            if not quiet:
                log(f"{vm.name}: killed qemu (pid {vm.pid})")
        elif not quiet:
            log(f"{vm.name}: powered off")
    for vm in vms:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(vm.pid, os.WNOHANG)
    for path in running_vms():
        (RUN / f"{path.name}.json").unlink(missing_ok=True)
        (RUN / f"{path.name}.qcow2").unlink(missing_ok=True)
    INVENTORY.unlink(missing_ok=True)
