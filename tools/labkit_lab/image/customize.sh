#!/usr/bin/env bash
# Make a debootstrapped rootfs boot: usage customize.sh FLAVOUR ROOTFS MIRROR SUITE [PUBKEY]
#   container  a systemd container of the local lab (tools/labctl.py)
#   vm         a QEMU VM of the NFS scenario (tools/nfsvm.py); PUBKEY: the admin's ssh key. The VMs reach
#              nothing but the host's apt proxy (user-mode net with restrict=on and one guestfwd to it at
#              10.0.2.100:3142) and each other (a private link, 192.168.77.0/24). Per-VM settings come from
#              MAC addresses and the kernel command line (systemd.hostname=), so both VMs boot one image.
set -euo pipefail
flavour=$1 root=$2 mirror=$3 suite=$4
case $flavour in
  container) ;;
  vm) pubkey=$5 ;;
  *) echo "customize.sh: unknown flavour $flavour (container or vm)" >&2; exit 2 ;;
esac

mask() {
  for unit in "$@"; do ln -sf /dev/null "$root/etc/systemd/system/$unit"; done
}

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

if [ "$flavour" = container ]; then
  # Units that make no sense in a container (no consoles, no udev, no kernel modules, no swap).
  mask getty.target console-getty.service systemd-udevd.service systemd-udev-trigger.service \
       systemd-modules-load.service sys-kernel-config.mount sys-kernel-debug.mount \
       sys-kernel-tracing.mount systemd-remount-fs.service systemd-firstboot.service \
       dev-hugepages.mount swap.target
else
  # apt: always through the apt proxy the guestfwd reaches.
  echo 'Acquire::http::Proxy "http://10.0.2.100:3142";' > "$root/etc/apt/apt.conf.d/01labkit-proxy"

  # The disk is the whole virtio disk (no partition table).
  echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$root/etc/fstab"

  # Network (systemd-networkd, matched by the MAC addresses nfs_vm.py gives the NICs):
  # NIC 1 user-mode net (ssh from the host through hostfwd, apt through guestfwd), NIC 2 the private link.
  cat > "$root/etc/systemd/network/10-usernet.network" <<'NET'
[Match]
MACAddress=52:54:00:4e:00:10 52:54:00:4e:00:20

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
NET
  for last in 10 20; do
    cat > "$root/etc/systemd/network/20-private-$last.network" <<NET
[Match]
MACAddress=52:54:00:4e:01:$last

[Network]
Address=192.168.77.$last/24
LinkLocalAddressing=no
IPv6AcceptRA=no
NET
  done
  chroot "$root" systemctl enable -q systemd-networkd.service
  cat >> "$root/etc/hosts" <<'HOSTS'
192.168.77.10 nfsvm-server
192.168.77.20 nfsvm-client
HOSTS

  # The admin Ansible logs in as: key only, passwordless sudo. Its home is not under /home, which autofs
  # takes over on the client (role nfs_client refuses local accounts living there; common_admin_home_base).
  install -d -m 0755 "$root/var/local/admins"
  chroot "$root" useradd -m -d /var/local/admins/labadmin -s /bin/bash -U labadmin
  install -d -m 0700 -o 1000 -g 1000 "$root/var/local/admins/labadmin/.ssh"
  install -m 0600 -o 1000 -g 1000 "$pubkey" "$root/var/local/admins/labadmin/.ssh/authorized_keys"
  echo 'labadmin ALL=(ALL) NOPASSWD: ALL' > "$root/etc/sudoers.d/labadmin"
  chmod 0440 "$root/etc/sudoers.d/labadmin"
  printf 'PasswordAuthentication no\nUseDNS no\n' > "$root/etc/ssh/sshd_config.d/labkit.conf"

  # Timers that would take dpkg's lock in the middle of a converge, and work a test VM does not need.
  mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
       systemd-timesyncd.service
fi

# A fresh machine id on every (first) boot; an empty hostname file, so docker's hostname or the kernel
# command line's wins.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
: > "$root/etc/hostname"

# Keep the image small.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
# The package index is empty: date its directory in the past so `apt cache_valid_time` refreshes it.
mkdir -p "$root/var/lib/apt/lists/partial"
touch -d @0 "$root/var/lib/apt/lists"
