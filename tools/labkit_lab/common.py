"""What the lab and the NFS VMs share: the repository's paths, the Debian suite and mirror, the apt
proxy's port, the admin SSH keys and the image recipe (a flavour for each)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- the image recipe
# One recipe (image/packages.txt, image/customize.sh) for both kinds of machine, told apart by a flavour:
# "container" (the lab's node image) or "vm" (the NFS scenario's QEMU disk).
RECIPE = PACKAGE / "image"
FLAVOURS = ("container", "vm")


def image_packages(flavour: str) -> list[str]:
    """The packages debootstrap adds for `flavour`: packages.txt's lines for both flavours and its own."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown image flavour {flavour!r} (one of {', '.join(FLAVOURS)})")
    packages = []
    for line in (RECIPE / "packages.txt").read_text().splitlines():
        name, *flavours = line.split("#")[0].split() or [""]
        if name and (not flavours or flavour in flavours):
            packages.append(name)
    return packages


def recipe_digest(flavour: str, *extra: str) -> str:
    """A hash of what a `flavour` image is built from (its packages, customize.sh, the suite, `extra`):
    the same digest means the same image, so a cached one is reused."""
    digest = hashlib.sha256()
    digest.update(json.dumps([flavour, SUITE, image_packages(flavour)]).encode())
    digest.update((RECIPE / "customize.sh").read_bytes())
    for part in extra:
        digest.update(part.encode())
    return digest.hexdigest()[:12]


def bootstrap_rootfs(flavour: str, rootfs: Path, mirror: str, *args: str, http_proxy: str = "") -> None:
    """debootstrap Debian (minbase and the flavour's packages) into `rootfs`, then customize.sh with
    `args` after the flavour's usual ones; downloads through `http_proxy` when one is given."""
    env = dict(os.environ, http_proxy=http_proxy) if http_proxy else None
    include = f"--include={','.join(image_packages(flavour))}"
    subprocess.run(
        ["debootstrap", "--variant=minbase", include, SUITE, str(rootfs), mirror],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    customize = RECIPE / "customize.sh"
    subprocess.run(["bash", str(customize), flavour, str(rootfs), mirror, SUITE, *args], check=True)


# --------------------------------------------------------------------------- front-ends
def command_parser(prog: str, doc: str | None, image_help: str) -> tuple[argparse.ArgumentParser, Any]:
    """A front-end's parser and its sub-commands, the first being `image [--force]` (both front-ends build
    or reuse an image of the recipe); the caller adds the others."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0] if doc else None)
    sub = parser.add_subparsers(dest="command", required=True)
    img = sub.add_parser("image", help=image_help)
    img.add_argument("--force", action="store_true", help="rebuild even if the recipe did not change")
    return parser, sub
