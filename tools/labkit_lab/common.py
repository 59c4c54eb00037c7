"""What the lab and the NFS VMs share: the repository's paths, the Debian suite and mirror, the apt
proxy's port and the admin SSH keys."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(__file__).resolve().parent
SUITE = "bookworm"
# apt-cacher-ng on this machine (lab.ensure_proxy): the lab's hosts reach it on the lab network's
# gateway, the NFS VMs on 127.0.0.1 through QEMU's guestfwd (relay.py).
PROXY_PORT = int(os.environ.get("LABKIT_APT_PROXY_PORT", "3142"))


def host_debian_mirror() -> str:
    """The first Debian mirror in this machine's apt sources (deb822 or one-line format)."""
    env = os.environ.get("LABKIT_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    candidates: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")):
        candidates += re.findall(r"^URIs:\s*(\S+)", path.read_text(), flags=re.M)
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        candidates += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", legacy.read_text(), flags=re.M)
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    sys.exit("labkit_lab: no Debian mirror found in /etc/apt; set LABKIT_DEBIAN_MIRROR")


def ssh_keypair(key: Path, comment: str) -> Path:
    """An ed25519 key pair without a passphrase at `key` (made once, outside git); returns `key`."""
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)]
        subprocess.run(keygen, check=True)
    return key
