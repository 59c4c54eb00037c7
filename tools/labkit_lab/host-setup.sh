#!/usr/bin/env bash
# Prepare this machine (the controller / CI runner, Debian 12, as root): usage host-setup.sh [lab|nfs-vm]
#   lab     (default, `make host`) labkit's lab and tests: the apt packages in requirements/apt-host.txt and
#           a running Docker engine.
#   nfs-vm  (`make test-nfs-vm`, after `lab`) QEMU and the tools that build the VM disk. Installed on
#           demand (not in requirements/apt-host.txt: CI does not run the scenario); the VM image is
#           built as root.
# Quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive
mode=${1:-lab}
case $mode in
  lab) mapfile -t wanted < <(grep -vE '^[[:space:]]*(#|$)' requirements/apt-host.txt | awk '{print $1}') ;;
  nfs-vm) wanted=(qemu-system-x86 qemu-utils debootstrap e2fsprogs openssh-client iproute2) ;;
  *) echo "usage: $0 [lab|nfs-vm]" >&2; exit 2 ;;
esac
say() { echo "host-setup ($mode): $*"; }

missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then say "need root to install: ${missing[*]}" >&2; exit 1; fi
  say "installing ${missing[*]}"
  # Packages must not start their own services here: the lab starts what it needs, configured its way.
  policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if ((policy_added)); then rm -f /usr/sbin/policy-rc.d; fi
fi

if [ "$mode" = nfs-vm ]; then
  # debootstrap and mkfs.ext4 -d need root (device nodes and file owners in the VM's rootfs).
  if [ "$(id -u)" != 0 ]; then say "the VM image is built as root" >&2; exit 1; fi
  exit 0
fi

if ! docker info >/dev/null 2>&1; then
  say "starting dockerd"
  setsid dockerd >/var/log/labkit-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  if ! docker info >/dev/null 2>&1; then
    tail -20 /var/log/labkit-dockerd.log >&2
    say "dockerd did not start (log: /var/log/labkit-dockerd.log)" >&2
    exit 1
  fi
fi
