#!/usr/bin/env python3
"""Plays the portal's backends in tests: one HTTP server per NAME=PORT on 127.0.0.1, each answering every
GET with JSON {"backend": NAME, "path": ..., "headers": {...}} (the headers as received, in order).
Standard library only.

    echo_backend.py mlflow=5000 optuna=8080 grafana=3000
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def handler_for(name: str) -> type[BaseHTTPRequestHandler]:
    class Echo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(
                {"backend": name, "path": self.path, "headers": [[k, v] for k, v in self.headers.items()]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"{name}: {format % args}\n")

    return Echo


def main() -> None:
    servers = []
    for arg in sys.argv[1:]:
        name, port = arg.split("=", 1)
        servers.append(ThreadingHTTPServer(("127.0.0.1", int(port)), handler_for(name)))
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
