"""A real headless Chromium (Debian's package) driven over the DevTools protocol, for the portal's tests.

The portal asks for HTTP Basic credentials; a person types them into the browser's login dialog, and the
browser then sends them with every request of that site. Here the dialog is answered through the
protocol's Fetch domain (``authRequired`` -> ``continueWithAuth``), so the page's own scripts (MLflow's and
Optuna's single-page apps) run exactly as in a person's browser. Credentials in the URL would not do:
Chromium refuses scripts' requests from such a page.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket  # websocket-client (requirements/dev.txt)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Browser:
    """One headless Chromium with one page; ``login`` answers the site's Basic-auth dialogs."""

    def __init__(self, trusted_cert: Path | None = None) -> None:
        exe = shutil.which("chromium")
        if exe is None:
            raise RuntimeError("chromium is not installed (requirements/apt-host.txt)")
        self._profile = tempfile.mkdtemp(prefix="labkit-chromium-")
        port = _free_port()
        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                f"--user-data-dir={self._profile}", "--remote-debugging-address=127.0.0.1",
                f"--remote-debugging-port={port}", "--window-size=1280,900", "about:blank"]
        if trusted_cert is not None:
            # The portal's lab CA is not in Chromium's store: trust exactly this server certificate's key.
            spki = subprocess.run(
                f"openssl x509 -in {trusted_cert} -noout -pubkey | openssl pkey -pubin -outform der "
                "| openssl dgst -sha256 -binary | base64", shell=True, capture_output=True, text=True,
                check=True).stdout.strip()
            args.insert(1, f"--ignore-certificate-errors-spki-list={spki}")
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
                    pages = [t for t in json.load(answer) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.3)
        self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30)
        self._id = 0
        self._credentials: tuple[str, str] | None = None
        self._answered: set[str] = set()  # URLs the login dialog was answered for
        self.auth_prompts = 0
        self._call("Page.enable")
        self._call("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])

    def _send(self, method: str, **params: Any) -> int:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        return self._id

    def _handle(self, event: dict[str, Any]) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Fetch.requestPaused":
            self._send("Fetch.continueRequest", requestId=params["requestId"])
        elif method == "Fetch.authRequired":
            self.auth_prompts += 1
            url = params.get("request", {}).get("url", "")
            if self._credentials is None or url in self._answered:
                # No login, or the portal refused it once for this page: cancel the dialog as a person
                # would (Chromium then shows the 401 page; answering again ends in ERR_TOO_MANY_RETRIES).
                response = {"response": "CancelAuth"}
            else:
                user, password = self._credentials
                self._answered.add(url)
                response = {"response": "ProvideCredentials", "username": user, "password": password}
            self._send("Fetch.continueWithAuth", requestId=params["requestId"],
                       authChallengeResponse=response)

    def _call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        want = self._send(method, **params)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv())
            if message.get("id") == want:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self._handle(message)
        raise TimeoutError(method)

    def pump(self, seconds: float) -> None:
        """Let the page run (answering its requests) for a while."""
        deadline = time.monotonic() + seconds
        self._ws.settimeout(0.5)
        try:
            while time.monotonic() < deadline:
                try:
                    self._handle(json.loads(self._ws.recv()))
                except websocket.WebSocketTimeoutException:
                    continue
        finally:
            self._ws.settimeout(30)

    def login(self, user: str | None, password: str | None = None) -> None:
        """What the login dialog will be answered with (None: the dialog is cancelled)."""
        self._credentials = None if user is None else (user, password or "")
        self._answered.clear()

    def open(self, url: str) -> None:
        self._call("Page.navigate", url=url)

    def text(self) -> str:
        result = self._call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                            returnByValue=True)
        return str(result["result"].get("value", ""))

    def wait_for_text(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            page = self.text()
            if needle in page or time.monotonic() > deadline:
                return page
            self.pump(1.0)

    def screenshot(self, path: Path) -> None:
        data = self._call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if hasattr(self, "_ws"):
            self._ws.close()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        shutil.rmtree(self._profile, ignore_errors=True)
