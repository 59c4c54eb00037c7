"""End-to-end checks of mail_relay in the local lab: a node's mail to root reaches the "university
smarthost" (a test SMTP sink on this machine's lab gateway address, a real SMTP exchange) through
infra01, addressed to the admins; infra01 refuses to relay for a client outside the cluster; a node
accepts no mail from the network at all."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import smtplib
import threading
import time
import uuid
from pathlib import Path

import pytest
from lab_helpers import REPO

pytestmark = [pytest.mark.lab, pytest.mark.slow]

GATEWAY = "172.30.57.1"  # this machine on the lab network (inventory/lab/group_vars/all/mail.yml)
SINK_PORT = 2525
_spec = importlib.util.spec_from_file_location(
    "smtp_sink", REPO / "roles" / "mail_relay" / "molecule" / "default" / "smtp_sink.py"
)
assert _spec and _spec.loader
smtp_sink = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smtp_sink)


@pytest.fixture
def sink(tmp_path):
    """The smarthost: a test SMTP sink on the lab gateway, stopped after the test (or 5 minutes)."""
    loop = asyncio.new_event_loop()
    started = asyncio.Event()
    spool = tmp_path / "spool"
    task = loop.create_task(smtp_sink.serve(GATEWAY, SINK_PORT, spool, 300, started))
    thread = threading.Thread(target=loop.run_until_complete, args=(task,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not started.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.is_set(), "the SMTP sink did not start"
    yield spool
    loop.call_soon_threadsafe(task.cancel)
    thread.join(timeout=10)


def arrived(spool: Path, token: str, timeout: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [json.loads(p.read_text()) for p in sorted(spool.glob("*.json"))]
        found = [m for m in found if token in m["data"]]
        if found:
            return found
        time.sleep(1)
    return []


def test_mail_to_root_on_a_node_reaches_the_admins_through_the_smarthost(second_run, host_exec, sink):
    token = f"labkit-mail-{uuid.uuid4().hex[:12]}"
    sent = subprocess_run(host_exec, "gpu01", f"echo 'disk almost full' | mail -s {token} root")
    assert sent.returncode == 0, sent.stderr
    # Mail from earlier runs may wait in the queues (no sink then): push it now.
    host_exec("gpu01", "postqueue", "-f")
    host_exec("infra01", "postqueue", "-f")
    messages = arrived(sink, token)
    assert messages, "the message never reached the smarthost"
    assert messages[0]["to"] == ["admins@lab.test"]
    assert messages[0]["from"] == "root@gpu01.lab.test"
    assert "by infra01.lab.test" in messages[0]["data"]  # it went through infra01


def test_cron_output_reaches_the_admins(second_run, host_exec, sink):
    token = f"labkit-cron-{uuid.uuid4().hex[:12]}"
    job = f"printf 'To: cron\\nSubject: Cron <root@gpu02> {token}\\n\\noutput\\n' | /usr/sbin/sendmail -t"
    assert subprocess_run(host_exec, "gpu02", job).returncode == 0
    host_exec("infra01", "postqueue", "-f")
    messages = arrived(sink, token)
    assert messages and messages[0]["to"] == ["admins@lab.test"]


def test_relay_is_refused_for_a_client_outside_the_cluster(second_run, lab):
    # This machine (the lab gateway) is not one of the cluster's hosts: infra01 must not relay for it.
    with smtplib.SMTP(lab["infra01"]["address"], 25, timeout=20) as smtp:
        smtp.ehlo("stranger.test")
        smtp.mail("spammer@stranger.test")
        code, message = smtp.rcpt("victim@elsewhere.test")
    assert code == 554 and b"Relay access denied" in message


def test_a_node_takes_no_mail_from_the_network(second_run, lab):
    with pytest.raises(OSError):
        smtplib.SMTP(lab["gpu01"]["address"], 25, timeout=10)


def subprocess_run(host_exec, host: str, script: str):
    return host_exec(host, "sh", "-c", script)
