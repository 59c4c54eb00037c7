#!/usr/bin/env bash
# Make a debootstrapped rootfs boot as a QEMU VM (tests/nfs_vm): usage customize.sh ROOTFS MIRROR SUITE PUBKEY
# The VMs reach nothing but the host's apt proxy (user-mode net with restrict=on and one guestfwd to it at
# 10.0.2.100:3142) and each other (a private link, 192.168.77.0/24). Per-VM settings come from MAC
# addresses and the kernel command line (systemd.hostname=), so both VMs boot one image.
set -euo pipefail
root=$1 mirror=$2 suite=$3 pubkey=$4

# apt: the mirror the lab uses, always through the apt proxy the guestfwd reaches.
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
echo 'Acquire::http::Proxy "http://10.0.2.100:3142";' > "$root/etc/apt/apt.conf.d/01labkit-proxy"
cat > "$root/etc/dpkg/dpkg.cfg.d/01-labkit-nodoc" <<'CFG'
path-exclude=/usr/share/man/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/locale/*
CFG

# The disk is the whole virtio disk (no partition table).
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$root/etc/fstab"

# Network (systemd-networkd, matched by the MAC addresses nfsvm.py gives the NICs):
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
: > "$root/etc/hostname"

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
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
            systemd-timesyncd.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# A fresh machine id on every first boot (each VM boots its own copy-on-write overlay).
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
mkdir -p "$root/var/lib/apt/lists/partial"
touch -d @0 "$root/var/lib/apt/lists"
