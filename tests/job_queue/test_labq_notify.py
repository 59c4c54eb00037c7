"""Job notifications: a real labqd sends Slack (webhook, DM by bot token) and mail on job events.

The Slack clients (slack-sdk) are pointed at a local HTTP receiver on 127.0.0.1 that answers like
Slack's API and records the real requests; mail goes to a small SMTP sink on 127.0.0.1. Nothing leaves
the machine. An unreachable or hanging receiver never delays the queue; failures are counted.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import socketserver
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from labq_helpers import Labqd

from job_queue.cli import CliError, parse_notify_events
from job_queue.config import ConfigError, parse_config
from job_queue.protocol import ProtocolError, decode_request

# --------------------------------------------------------------------------- local receivers


class SlackReceiver:
    """Answers /webhook like an incoming webhook and /api/<method> like Slack's Web API."""

    def __init__(self, known_emails: dict[str, str]) -> None:
        self.requests: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                ctype = self.headers.get("Content-Type", "")
                if "json" in ctype:
                    data = json.loads(body) if body else {}
                else:
                    data = dict(urllib.parse.parse_qsl(body))
                path = self.path.split("?")[0]
                if "?" in self.path:
                    data.update(urllib.parse.parse_qsl(self.path.split("?", 1)[1]))
                receiver.requests.append(
                    {"path": path, "auth": self.headers.get("Authorization", ""), "data": data}
                )
                if path == "/webhook":
                    self._reply(200, "ok", "text/plain")
                elif path == "/api/users.lookupByEmail":
                    uid = known_emails.get(data.get("email", ""))
                    self._reply(200, json.dumps({"ok": True, "user": {"id": uid}} if uid else
                                                {"ok": False, "error": "users_not_found"}))
                elif path == "/api/chat.postMessage":
                    self._reply(200, json.dumps({"ok": True, "channel": "D0001", "ts": "1.000"}))
                else:
                    self._reply(404, json.dumps({"ok": False, "error": "unknown_method"}))

            do_GET = do_POST

            def _reply(self, code: int, text: str, ctype: str = "application/json") -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpSink:
    """Just enough SMTP to take messages (no auth, no TLS), on loopback."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 sink ESMTP\r\n")
                rcpt: list[str] = []
                sender = ""
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    cmd = line.decode(errors="replace").strip()
                    verb = cmd.split(" ", 1)[0].upper().rstrip(":")
                    if verb in ("EHLO", "HELO"):
                        self.wfile.write(b"250 sink\r\n")
                    elif cmd.upper().startswith("MAIL FROM:"):
                        sender = cmd[10:].strip(" <>").split(">")[0]
                        self.wfile.write(b"250 ok\r\n")
                    elif cmd.upper().startswith("RCPT TO:"):
                        rcpt.append(cmd[8:].strip(" <>").split(">")[0])
                        self.wfile.write(b"250 ok\r\n")
                    elif verb == "DATA":
                        self.wfile.write(b"354 go ahead\r\n")
                        data = b""
                        while True:
                            chunk = self.rfile.readline()
                            if chunk in (b".\r\n", b".\n", b""):
                                break
                            data += chunk[1:] if chunk.startswith(b"..") else chunk
                        sink.messages.append({"from": sender, "to": rcpt, "msg": message_from_bytes(data)})
                        rcpt = []
                        self.wfile.write(b"250 queued\r\n")
                    elif verb == "QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"250 ok\r\n")

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a notification")
        time.sleep(0.1)


@pytest.fixture
def slack() -> Iterator[SlackReceiver]:
    r = SlackReceiver({"alice@lab.test": "U0ALICE"})
    yield r
    r.close()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    s = SmtpSink()
    yield s
    s.close()


def notify_config(tmp: Path, *, slack_port: int, smtp_port: int, channels: str, default_events: str,
                  timeout_s: float = 5) -> str:
    secrets = tmp / "secrets.toml"
    secrets.write_text(
        f'slack_token = "xoxb-test-not-a-real-token"\n'
        f'slack_webhook_url = "http://127.0.0.1:{slack_port}/webhook"\n'
    )
    secrets.chmod(0o600)
    return f"""
[notify]
channels = {channels}
default_events = {default_events}
secrets_file = "{secrets}"
slack_api_url = "http://127.0.0.1:{slack_port}/api/"
mail_domain = "lab.test"
mail_from = "labq@gpu-test.lab.test"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
timeout_s = {timeout_s}
log_lines = 5
"""


def submit(d: Labqd, *args: str) -> int:
    res = d.labq("submit", "--json", *args, user="alice")
    assert res.returncode == 0, res.stderr
    return int(json.loads(res.stdout)["ids"][0])


# --------------------------------------------------------------------------- without Docker


def test_secrets_are_refused_in_the_config_and_bad_values_named() -> None:
    with pytest.raises(ConfigError, match=r"notify\.slack_token' is a secret"):
        parse_config({"gpus": ["g0"], "notify": {"slack_token": "xoxb-1"}})
    with pytest.raises(ConfigError, match=r"notify\.channels"):
        parse_config({"gpus": ["g0"], "notify": {"channels": ["pager"]}})
    with pytest.raises(ConfigError, match=r"notify\.mail_domain"):
        parse_config({"gpus": ["g0"], "notify": {"channels": ["mail"]}})
    with pytest.raises(ConfigError, match=r"notify\.timeout_s"):
        parse_config({"gpus": ["g0"], "notify": {"timeout_s": 0}})
    with pytest.raises(ConfigError, match=r"unknown key 'notify\.colour'"):
        parse_config({"gpus": ["g0"], "notify": {"colour": "red"}})
    cfg = parse_config({"gpus": ["g0"], "notify": {"channels": ["webhook"], "default_events": ["failed"]}})
    assert cfg.notify.enabled and cfg.notify.default_events == ("failed",)


def test_notify_option_and_protocol_field() -> None:
    assert parse_notify_events("all") == ["started", "finished", "failed"]
    assert parse_notify_events("none") == []
    assert parse_notify_events("failed,finished,failed") == ["failed", "finished"]
    with pytest.raises(CliError, match="notify: unknown event 'done'"):
        parse_notify_events("done")
    base = {"v": 1, "op": "submit", "gpus": 0, "command": ["true"], "cwd": "/"}
    req = decode_request(json.dumps({**base, "notify": ["failed"]}).encode())
    assert getattr(req.args, "notify", None) == ["failed"]
    with pytest.raises(ProtocolError, match="notify: unknown event 'paged'"):
        decode_request(json.dumps({**base, "notify": ["paged"]}).encode())
    with pytest.raises(ProtocolError, match="notify: must be a list"):
        decode_request(json.dumps({**base, "notify": "failed"}).encode())


def test_a_job_that_ends_before_it_is_recorded_running_still_gets_its_started_notice() -> None:
    # labqd may see a very short job's exit before its start is recorded (STARTING -> SUCCEEDED):
    # a job that asked for "started" is told both, in order; one that did not gets only the final notice.
    from job_queue.models import Job, JobSpec, JobState
    from job_queue.notify import Notifier

    cfg = parse_config({"gpus": ["g0"], "notify": {"channels": ["webhook"]}}).notify
    notifier = Notifier(cfg, lambda job_id: None, "gpu-test")  # not started: the queue is only filled
    spec = JobSpec(user="alice", uid=1000, gid=1000, groups=[], home="/h", cwd="/h", image="i",
                   command=["true"], notify=["started", "finished"])
    notifier.job_changed(Job(id=1, spec=spec, state=JobState.SUCCEEDED, submit_time=0.0), missed_start=True)
    notifier.job_changed(Job(id=2, spec=spec, state=JobState.SUCCEEDED, submit_time=0.0))
    quiet = dataclasses.replace(spec, notify=["finished"])
    notifier.job_changed(Job(id=3, spec=quiet, state=JobState.SUCCEEDED, submit_time=0.0), missed_start=True)
    queued = []
    while not notifier._queue.empty():
        queued.append(notifier._queue.get_nowait())
    assert queued == [(1, "started"), (1, "finished"), (2, "finished"), (3, "finished")]


# --------------------------------------------------------------------------- a real labqd

docker_only = pytest.mark.docker


@docker_only
def test_failed_job_notifies_webhook_dm_and_mail(make_labqd: Any, slack: SlackReceiver, smtp: SmtpSink,
                                                  tmp_path: Path) -> None:
    extra = notify_config(tmp_path, slack_port=slack.port, smtp_port=smtp.port,
                          channels='["webhook", "slack_dm", "mail"]', default_events='["failed"]')
    d = make_labqd(extra)
    # Docker copies stdout and stderr through separate pipes and logs each line as it arrives, so a
    # stderr line written right after stdout lines may be logged before them; the pause makes "boom"
    # the last line Docker records, as it is for a real job that fails after printing for a while.
    job_id = submit(d, "--gpus", "1", "--name", "fails", "--", "sh", "-c",
                    "for i in 1 2 3 4 5 6 7; do echo line$i; done; sleep 1; echo boom >&2; exit 3")
    assert d.wait_state(job_id, ("failed",))["exit_code"] == 3
    wait_for(lambda: slack.of("/webhook") and slack.of("/api/chat.postMessage") and smtp.messages)

    hook = slack.of("/webhook")[0]["data"]["text"]
    assert f"labq job {job_id} (fails) FAILED" in hook
    assert "exit code: 3" in hook and "OOM killed: no" in hook
    assert "boom" in hook and "line7" in hook and "line2" not in hook  # the last 5 lines only

    lookup = slack.of("/api/users.lookupByEmail")[0]
    assert lookup["data"]["email"] == "alice@lab.test"
    assert lookup["auth"] == "Bearer xoxb-test-not-a-real-token"
    post = slack.of("/api/chat.postMessage")[0]["data"]
    assert post["channel"] == "U0ALICE" and "FAILED" in post["text"] and "boom" in post["text"]

    mail = smtp.messages[0]
    assert mail["to"] == ["alice@lab.test"] and mail["from"] == "labq@gpu-test.lab.test"
    assert mail["msg"]["Subject"].startswith(f"labq job {job_id} (fails) FAILED")
    body = mail["msg"].get_payload()
    assert "exit code: 3" in body and "boom" in body

    # default_events = ["failed"]: a success tells nobody unless the job asked with --notify.
    ok = submit(d, "--gpus", "1", "--name", "quiet", "--", "true")
    d.wait_state(ok, ("succeeded",))
    loud = submit(d, "--gpus", "1", "--notify", "started,finished", "--name", "loud", "--", "true")
    d.wait_state(loud, ("succeeded",))
    silent = submit(d, "--gpus", "1", "--notify", "none", "--name", "silent", "--", "false")
    d.wait_state(silent, ("failed",))
    wait_for(lambda: len(slack.of("/webhook")) >= 3)
    time.sleep(2)  # anything else that was (wrongly) queued would have arrived by now
    texts = [r["data"]["text"] for r in slack.of("/webhook")]
    assert len(texts) == 3, texts
    assert f"labq job {loud} (loud) started" in texts[1]
    assert f"labq job {loud} (loud) finished" in texts[2]
    assert not any("quiet" in t or "silent" in t for t in texts)
    assert len(smtp.messages) == 3


@docker_only
def test_outage_never_blocks_the_queue_and_is_counted(make_labqd: Any, tmp_path: Path) -> None:
    # A "Slack" that accepts connections and never answers, and a mail port nobody listens on.
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)
    closed = free_port()
    extra = notify_config(tmp_path, slack_port=hang.getsockname()[1], smtp_port=closed,
                          channels='["webhook", "slack_dm", "mail"]',
                          default_events='["started", "finished"]', timeout_s=3)
    port = free_port()
    d = make_labqd(extra, metrics_port=port)
    try:
        t0 = time.monotonic()
        ids = [submit(d, "--gpus", "4", "--", "true") for _ in range(3)]
        for job_id in ids:
            d.wait_state(job_id, ("succeeded",), timeout=30)
        elapsed = time.monotonic() - t0
        # Three jobs one after another on all four GPUs; 6 notices x 3 channels would take minutes if
        # sending blocked the queue (each Slack call waits its 3 s timeout).
        assert elapsed < 15, elapsed

        def errors() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            out: dict[str, float] = {}
            for line in text.splitlines():
                if line.startswith("labq_notifications_total{") and 'outcome="error"' in line:
                    channel = line.split('channel="')[1].split('"')[0]
                    out[channel] = float(line.rsplit(" ", 1)[1])
            return out

        wait_for(lambda: errors().get("mail", 0) >= 1 and errors().get("webhook", 0) >= 1, timeout=60)
        assert "notification (started) failed" in d.stderr.read_text() or \
            "notification (finished) failed" in d.stderr.read_text()
        assert d.labq("ls").returncode == 0  # still answering
    finally:
        hang.close()


@docker_only
def test_outcomes_scheduler_passes_and_foreign_processes_are_exported(make_labqd: Any) -> None:
    """The metrics the notifications sit beside: outcomes by exit class, scheduler pass duration."""
    port = free_port()
    d = make_labqd(metrics_port=port)
    ok = submit(d, "--gpus", "1", "--", "true")
    bad = submit(d, "--gpus", "1", "--", "sh", "-c", "exit 3")
    sig = submit(d, "--gpus", "1", "--", "sh", "-c", "sleep 30 & kill -9 $!; wait $!")
    assert d.wait_state(ok, ("succeeded",))
    assert d.wait_state(bad, ("failed",))["exit_code"] == 3
    assert d.wait_state(sig, ("failed",))["exit_code"] == 137

    def sample(name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.split(" ")[0] == name:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    wait_for(lambda: sample('labq_jobs_finished_total{outcome="signal",user="alice"}') == 1, timeout=30)
    assert sample('labq_jobs_finished_total{outcome="succeeded",user="alice"}') == 1
    assert sample('labq_jobs_finished_total{outcome="failed",user="alice"}') == 1
    assert sample("labq_schedule_pass_seconds_count") >= 3
    assert sample("labq_foreign_gpu_processes") == 0
