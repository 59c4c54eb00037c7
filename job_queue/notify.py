"""Job notifications: Slack (channel webhook, direct message by bot token) and e-mail.

labqd hands events to :class:`Notifier`, which only puts them on a bounded queue; one worker thread
sends them, each call with a timeout. A Slack or mail outage therefore never blocks or fails the
queue: failures are logged and counted (``labq_notifications_total{channel,outcome}``).

Settings come from the ``[notify]`` table of config.toml; secrets (the bot token, the webhook URL)
from a separate TOML file readable by root only (``secrets_file``), read by the daemon alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Job

log = logging.getLogger("labqd.notify")

EVENTS = ("started", "finished", "failed")
"""`finished`: the job succeeded; `failed`: it failed, hit its time limit or could not start."""
CHANNELS = ("webhook", "slack_dm", "mail")
SECRET_KEYS = frozenset({"slack_token", "slack_webhook_url", "smtp_password"})
_DEFAULT_SLACK_API = "https://slack.com/api/"


class NotifyConfigError(ValueError):
    """The [notify] table or the secrets file has a wrong value."""


@dataclass(frozen=True)
class NotifyConfig:
    default_events: tuple[str, ...] = ()
    """Events notified for jobs submitted without --notify."""
    channels: tuple[str, ...] = ()
    """Which of webhook, slack_dm, mail are used."""
    secrets_file: str = "/etc/labq/secrets.toml"
    slack_webhook_url: str = ""
    slack_token: str = ""
    slack_api_url: str = _DEFAULT_SLACK_API
    mail_domain: str = ""
    """Owner's address is ``user@mail_domain`` (the lab's LDAP `mail` convention)."""
    mail_from: str = "labq@localhost"
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_user: str = ""
    smtp_password: str = ""
    timeout_s: float = 10.0
    log_lines: int = 20
    queue_size: int = 1000

    @property
    def enabled(self) -> bool:
        return bool(self.channels)


_KNOWN = {
    "default_events", "channels", "secrets_file", "slack_api_url", "mail_domain",
    "mail_from", "smtp_host", "smtp_port", "smtp_user", "timeout_s", "log_lines", "queue_size",
}


def _str_list(data: dict[str, Any], key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v in allowed for v in value):
        raise NotifyConfigError(f"config: 'notify.{key}' must be a list of {', '.join(allowed)}")
    return tuple(value)


def parse_notify(data: Any) -> NotifyConfig:
    """Validate the ``[notify]`` table (secrets are not allowed in it: see ``load_secrets``)."""
    if not isinstance(data, dict):
        raise NotifyConfigError("config: 'notify' must be a table")
    secret = sorted(set(data) & SECRET_KEYS)
    if secret:
        raise NotifyConfigError(f"config: 'notify.{secret[0]}' is a secret: put it in the secrets file")
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise NotifyConfigError(f"config: unknown key 'notify.{unknown[0]}'")
    kinds: dict[str, type | tuple[type, ...]] = {
        "secrets_file": str, "slack_api_url": str, "mail_domain": str,
        "mail_from": str, "smtp_host": str, "smtp_port": int, "smtp_user": str,
        "timeout_s": (int, float), "log_lines": int, "queue_size": int,
    }
    values: dict[str, Any] = {}
    for key, kind in kinds.items():
        if key in data:
            v: Any = data[key]
            if isinstance(v, bool) or not isinstance(v, kind):
                raise NotifyConfigError(f"config: 'notify.{key}' has the wrong type")
            values[key] = float(data[key]) if key == "timeout_s" else data[key]
    cfg = NotifyConfig(default_events=_str_list(data, "default_events", EVENTS),
                       channels=_str_list(data, "channels", CHANNELS), **values)
    if not 0 < cfg.timeout_s <= 120:
        raise NotifyConfigError("config: 'notify.timeout_s' must be in (0, 120]")
    if not 0 < cfg.smtp_port < 65536:
        raise NotifyConfigError("config: 'notify.smtp_port' must be a port number")
    if not 0 <= cfg.log_lines <= 200 or cfg.queue_size < 1:
        raise NotifyConfigError("config: 'notify.log_lines' must be 0-200 and 'notify.queue_size' >= 1")
    if "mail" in cfg.channels and not cfg.mail_domain:
        raise NotifyConfigError("config: 'notify.mail_domain' is needed for the mail channel")
    return cfg


def load_secrets(cfg: NotifyConfig) -> NotifyConfig:
    """Add the secrets file's values (a missing file is fine: channels that need them fail counted)."""
    path = Path(cfg.secrets_file)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return cfg
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise NotifyConfigError(f"secrets file {path}: {exc}") from exc
    unknown = sorted(set(data) - SECRET_KEYS)
    if unknown:
        raise NotifyConfigError(f"secrets file {path}: unknown key '{unknown[0]}'")
    if not all(isinstance(v, str) for v in data.values()):
        raise NotifyConfigError(f"secrets file {path}: values must be strings")
    merged = {k: v for k, v in data.items() if v}
    return NotifyConfig(**{**cfg.__dict__, **merged})


def event_for(job: Job) -> str | None:
    from .models import JobState

    if job.state == JobState.RUNNING:
        return "started"
    if job.state == JobState.SUCCEEDED:
        return "finished"
    if job.state in (JobState.FAILED, JobState.TIMEOUT):
        return "failed"
    return None  # cancelled by a person: nobody needs telling


def tail_lines(path: str, n: int, max_bytes: int = 64 * 1024) -> list[str]:
    if n <= 0:
        return []
    try:
        with Path(path).open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-n:]


@dataclass
class Message:
    event: str
    job: dict[str, Any]
    subject: str
    text: str
    log_tail: list[str] = field(default_factory=list)


def build_message(event: str, job: Job, host: str, log_tail: list[str]) -> Message:
    """The notification; user-controlled text in ``subject``, ``text`` and ``log_tail`` has its
    control characters escaped (``job`` keeps the exact values)."""
    from .display import safe

    s = job.spec
    what = {"started": "started", "finished": "finished", "failed": "FAILED"}[event]
    subject = f"labq job {job.id} ({safe(s.name)}) {what} on {safe(host)}"
    lines = [subject]
    if event != "started":
        lines.append(f"state: {job.state.value}, exit code: {job.exit_code}, "
                     f"OOM killed: {'yes' if job.oom_killed else 'no'}")
        if job.reason:
            lines.append(f"reason: {safe(job.reason)}")
    lines.append(f"GPUs: {safe(', '.join(job.assigned_gpus) or 'none')}; image: {safe(s.image)}")
    text = "\n".join(lines)
    summary = {"id": job.id, "name": s.name, "user": s.user, "state": job.state.value, "host": host,
               "exit_code": job.exit_code, "oom_killed": job.oom_killed, "reason": job.reason}
    tail = [safe(line, keep="\t") for line in log_tail]
    return Message(event=event, job=summary, subject=subject, text=text, log_tail=tail)


def _slack_text(msg: Message) -> str:
    if not msg.log_tail:
        return msg.text
    return msg.text + "\nlast lines of the log:\n```\n" + "\n".join(msg.log_tail) + "\n```"


class Notifier:
    """Queue of notifications and the worker that sends them (``start()`` starts the thread)."""

    def __init__(self, cfg: NotifyConfig, get_job: Callable[[int], Job | None], host: str,
                 wait_log: Callable[[int, float], None] | None = None,
                 log_path: Callable[[int], str] | None = None,
                 count: Callable[[str, str], None] | None = None) -> None:
        self.cfg = cfg
        self.get_job = get_job
        self.host = host
        self.wait_log = wait_log
        self.log_path = log_path
        self.count = count or (lambda channel, outcome: None)
        self._queue: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=cfg.queue_size)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ called by labqd (never blocks)
    def job_changed(self, job: Job, missed_start: bool = False) -> None:
        """Queue the notice for the job's new state. ``missed_start``: the job ended before labqd
        recorded it running (a very short job), so its "started" notice goes first if it asked for one."""
        event = event_for(job)
        if event is None or not self.cfg.enabled:
            return
        wanted = job.spec.notify if job.spec.notify is not None else list(self.cfg.default_events)
        events = (["started"] if missed_start and event != "started" else []) + [event]
        for one in events:
            if one not in wanted:
                continue
            try:
                self._queue.put_nowait((job.id, one))
            except queue.Full:
                log.warning("job %d: notification queue full; %s notice dropped", job.id, one)
                self.count("queue", "dropped")

    def start(self) -> None:
        if self._thread is None and self.cfg.enabled:
            self._thread = threading.Thread(target=self._run, name="labq-notify", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                return
            self._thread.join(timeout)
            self._thread = None

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until everything queued so far was sent or failed (tests)."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        done.wait(timeout)

    # ------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.send(*item)
            except Exception:
                log.exception("notification worker: unexpected error")
            finally:
                self._queue.task_done()

    def send(self, job_id: int, event: str) -> None:
        job = self.get_job(job_id)
        if job is None:
            return
        tail: list[str] = []
        if event != "started" and self.log_path is not None:
            if self.wait_log is not None:
                self.wait_log(job_id, self.cfg.timeout_s)
            tail = tail_lines(self.log_path(job_id), self.cfg.log_lines)
        deliver(self.cfg, build_message(event, job, self.host, tail), job.spec.user, self.count,
                label=f"job {job_id}")


def deliver(cfg: NotifyConfig, msg: Message, user: str,
            count: Callable[[str, str], None] | None = None, label: str = "") -> None:
    """Send one notification to its owner through every configured channel. A channel's failure is
    logged and counted, never raised: the others still go out. Used by labqd's worker and by the Slurm
    mail program (job_queue/slurm_mail.py), so both reach a member the same way."""
    counted = count or (lambda channel, outcome: None)
    senders: dict[str, Callable[[NotifyConfig, Message, str], None]] = {
        "webhook": _webhook, "slack_dm": _slack_dm, "mail": _mail,
    }
    for channel in cfg.channels:
        try:
            senders[channel](cfg, msg, user)
        except Exception as exc:
            log.warning("%s: %s notification (%s) failed: %s", label or user, channel, msg.event, exc)
            counted(channel, "error")
        else:
            counted(channel, "sent")


def _webhook(cfg: NotifyConfig, msg: Message, user: str) -> None:
    from slack_sdk.webhook import WebhookClient

    if not cfg.slack_webhook_url:
        raise RuntimeError("no slack_webhook_url")
    client = WebhookClient(cfg.slack_webhook_url, timeout=int(max(1, cfg.timeout_s)))
    resp = client.send(text=_slack_text(msg))
    if resp.status_code != 200:
        raise RuntimeError(f"webhook answered {resp.status_code}: {resp.body[:200]}")


def _slack_dm(cfg: NotifyConfig, msg: Message, user: str) -> None:
    from slack_sdk import WebClient

    if not cfg.slack_token:
        raise RuntimeError("no slack_token")
    if not cfg.mail_domain:
        raise RuntimeError("no mail_domain to find the owner's Slack account by")
    client = WebClient(token=cfg.slack_token, base_url=cfg.slack_api_url, timeout=int(max(1, cfg.timeout_s)))
    found = client.users_lookupByEmail(email=f"{user}@{cfg.mail_domain}")
    user_id = found["user"]["id"]
    client.chat_postMessage(channel=user_id, text=_slack_text(msg))


def _mail(cfg: NotifyConfig, msg: Message, user: str) -> None:
    import smtplib
    from email.message import EmailMessage

    mail = EmailMessage()
    mail["From"] = cfg.mail_from
    mail["To"] = f"{user}@{cfg.mail_domain}"
    mail["Subject"] = msg.subject
    body = msg.text
    if msg.log_tail:
        body += "\n\nLast lines of the log:\n" + "\n".join(msg.log_tail)
    mail.set_content(body + "\n")
    with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=cfg.timeout_s) as smtp:
        if cfg.smtp_user:
            smtp.login(cfg.smtp_user, cfg.smtp_password)
        smtp.send_message(mail)
