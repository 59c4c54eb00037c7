#!/usr/bin/env bash
# Make a debootstrapped rootfs boot as a systemd container: usage customize.sh ROOTFS MIRROR SUITE
set -euo pipefail
root=$1 mirror=$2 suite=$3

# apt sources: the same mirror for main, updates and security (security lives beside /debian).
cat > "$root/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror}-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
rm -f "$root/etc/apt/sources.list"

# Smaller, faster package installs: no man pages or docs (copyright files are kept).
cat > "$root/etc/dpkg/dpkg.cfg.d/01-labkit-nodoc" <<'CFG'
path-exclude=/usr/share/man/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/locale/*
CFG

# Units that make no sense in a container (no consoles, no udev, no kernel modules, no swap).
for unit in getty.target console-getty.service systemd-udevd.service systemd-udev-trigger.service \
            systemd-modules-load.service sys-kernel-config.mount sys-kernel-debug.mount \
            sys-kernel-tracing.mount systemd-remount-fs.service systemd-firstboot.service \
            dev-hugepages.mount swap.target; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# A fresh machine id on every boot; an empty hostname file so docker's hostname wins.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
: > "$root/etc/hostname"

# Keep the image small.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
# The package index is empty: date its directory in the past so `apt cache_valid_time` refreshes it.
mkdir -p "$root/var/lib/apt/lists/partial"
touch -d @0 "$root/var/lib/apt/lists"
