"""Who is calling: resolved from the kernel's SO_PEERCRED credentials, never from the request."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int
    user: str
    home: str
    groups: tuple[int, ...]
    is_admin: bool


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix stream socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def resolve_caller(pid: int, uid: int, gid: int, admin_group: str) -> Caller:
    """Look the uid up through NSS (so LDAP users and groups work) and decide admin rights."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError as exc:
        raise LookupError(f"uid {uid} has no passwd entry") from exc
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    admin = uid == 0
    if not admin and admin_group:
        try:
            admin_gid = grp.getgrnam(admin_group).gr_gid
        except KeyError:
            admin_gid = None
        admin = admin_gid is not None and admin_gid in groups
    return Caller(pid=pid, uid=uid, gid=pw.pw_gid, user=pw.pw_name, home=pw.pw_dir, groups=groups,
                  is_admin=admin)
