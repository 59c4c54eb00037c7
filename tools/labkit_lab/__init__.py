"""labkit_lab: the machinery behind labkit's local test environments, shared by two front-ends.

- ``tools/labctl.py`` (module :mod:`labkit_lab.lab`): the local lab, real systemd hosts in Docker
  containers on a private network, with a caching apt proxy (``make lab``).
- ``tools/nfsvm.py`` (module :mod:`labkit_lab.nfs_vm`): two QEMU VMs with real kernel NFS
  (``make test-nfs-vm``).

Both build their machines from one image recipe (``image/``, a flavour per front-end), set this machine
up with one script (``host-setup.sh``) and share :mod:`labkit_lab.common` (paths, the Debian mirror, the
apt proxy's port, SSH keys).
"""
