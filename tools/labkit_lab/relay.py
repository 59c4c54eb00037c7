#!/usr/bin/env python3
"""Relay one connection between stdin/stdout and a TCP address: QEMU's guestfwd runs this per connection.

Usage: relay.py HOST PORT. The NFS VMs reach the host's apt proxy only through it (user-mode net with
restrict=on: no other way out), so a VM can talk to nothing on this machine but 127.0.0.1:3142.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(host: str, port: int) -> None:
    sock = socket.create_connection((host, port), timeout=30)
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "guest")
    sel.register(sock, selectors.EVENT_READ, "proxy")
    while True:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(0, 65536)
                if data:
                    sock.sendall(data)
                else:  # the guest finished sending: tell the proxy, keep reading its answer
                    sel.unregister(0)
                    sock.shutdown(socket.SHUT_WR)
                continue
            data = sock.recv(65536)
            if not data:  # the proxy closed: so does the guest's connection (this process exits)
                sock.close()
                return
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
