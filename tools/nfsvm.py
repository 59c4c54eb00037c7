#!/usr/bin/env python3
"""nfsvm: two Debian 12 VMs under QEMU (software emulation) for labkit's real-NFS scenario.

Sub-commands (the pytest scenario in tests/nfs_vm/test_nfs_vm.py uses the same functions, from
labkit_lab.nfs_vm):

``image``    build (or reuse) the VM disk: debootstrap through the apt proxy, ``mkfs.ext4 -d`` (no loop
             device, no mount), qcow2; cached under ``.lab/nfs-vm/images/<recipe hash>/``.
``up``       boot both VMs on fresh copy-on-write overlays, wait for ssh, write ``.lab/nfs-vm/hosts.yml``.
``converge`` run tests/nfs_vm/converge.yml (the lab's playbooks/nfs.yml and a directory stand-in) on the
             running VMs.
``down``     power the VMs off (kill qemu after a grace period).
"""

from __future__ import annotations

import sys

from labkit_lab import nfs_vm
from labkit_lab.common import command_parser


def main(argv: list[str] | None = None) -> int:
    parser, sub = command_parser("nfsvm", __doc__, "build or reuse the VM image")
    sub.add_parser("up", help="boot both VMs and write .lab/nfs-vm/hosts.yml")
    sub.add_parser("converge", help="run converge.yml on the running VMs")
    sub.add_parser("down", help="power the VMs off")
    args = parser.parse_args(argv)
    if args.command == "image":
        print(nfs_vm.build_image(force=args.force))
    elif args.command == "up":
        nfs_vm.up()
    elif args.command == "converge":
        rc, _output = nfs_vm.run_playbook(echo=True)
        return rc
    elif args.command == "down":
        nfs_vm.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
