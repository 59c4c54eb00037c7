#!/usr/bin/env bash
# What `make test-nfs-vm` needs on this machine beyond `make host` (tools/labkit_lab/host-setup.sh): QEMU and the
# tools that build the VM disk. Installed on demand (not in requirements/apt-host.txt: CI does not run the
# scenario). Quick when all is there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

wanted=(qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client iproute2)
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then echo "nfs-vm host-setup: need root to install: ${missing[*]}" >&2; exit 1; fi
  echo "nfs-vm host-setup: installing ${missing[*]}"
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if ((policy_added)); then rm -f /usr/sbin/policy-rc.d; fi
fi
# debootstrap and mkfs.ext4 -d need root (device nodes and file owners in the VM's rootfs).
if [ "$(id -u)" != 0 ]; then echo "nfs-vm host-setup: the VM image is built as root" >&2; exit 1; fi
