"""Serving a registry over HTTP until SIGTERM or SIGINT: the main loop every labkit exporter shares."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from prometheus_client import CollectorRegistry, start_http_server


def serve_until_signalled(registry: CollectorRegistry, port: int, address: str, log: logging.Logger) -> int:
    """Serves ``registry`` on ``address:port`` until SIGTERM/SIGINT (the handler only sets a flag)."""
    server, thread = start_http_server(port, addr=address, registry=registry)
    log.info("listening on %s:%d", address, port)

    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
    return 0
