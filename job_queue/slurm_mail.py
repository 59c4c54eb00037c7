"""Slurm's mail program (``MailProg``): a Slurm job's notice reaches its owner as labq's do.

slurmctld runs ``MailProg -s SUBJECT RECIPIENT`` for each ``--mail-type`` event of a job, with the job in
its environment (``SLURM_JOB_ID``, ``SLURM_JOB_USER``, ``SLURM_JOB_NAME``, ``SLURM_JOB_MAIL_TYPE``,
``SLURM_JOB_STATE``). This program turns that into labq's notification (started, finished, FAILED) and
sends it through the channels of the ``[notify]`` table of its configuration file (Slack webhook, Slack
direct message, mail; job_queue/notify.py), secrets from the ``secrets_file`` it names.

It never fails slurmctld's call: a bad configuration or a channel that cannot be reached is logged to
stderr (the journal of slurmctld) and the program exits 0; only wrong arguments exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .display import safe
from .notify import Message, NotifyConfig, NotifyConfigError, deliver, load_secrets, parse_notify

log = logging.getLogger("labkit-slurm-mail")

DEFAULT_CONFIG = "/etc/labkit/slurm-mail.toml"
FAILED_STATES = frozenset({"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                           "PREEMPTED"})
_SUBJECT_ID = re.compile(r"Job_id=(\d+(?:_\d+)?)")
_SUBJECT_STATE = re.compile(r",\s*([A-Z_]+)(?:,|$)")
_SUBJECT_EXIT = re.compile(r"ExitCode\s+(\d+)")


@dataclass(frozen=True)
class SlurmEvent:
    """One call of the mail program, from its environment and its subject line."""

    job_id: str
    user: str
    name: str
    mail_type: str
    state: str
    exit_code: int | None
    subject: str

    @property
    def event(self) -> str | None:
        """labq's event for it: ``started``, ``finished``, ``failed``, or None (cancelled by a person,
        or a warning such as TIME_LIMIT_80: labq sends neither)."""
        kind = self.mail_type.lower()
        if kind == "began" or (not kind and "Began" in self.subject):
            return "started"
        if self.state in FAILED_STATES or kind == "failed":
            return "failed"
        if self.state == "COMPLETED":
            return "finished"
        return None


def parse_event(subject: str, recipient: str, env: Mapping[str, str]) -> SlurmEvent:
    """The job of a mail call: the environment first (Slurm 21.08 and later set it), the subject
    (``Slurm Job_id=42 Name=train Ended, Run time 00:01:02, COMPLETED, ExitCode 0``) where it is not."""
    id_match = _SUBJECT_ID.search(subject)
    state_match = _SUBJECT_STATE.search(subject)
    exit_match = _SUBJECT_EXIT.search(subject)
    job_id = env.get("SLURM_JOB_ID") or (id_match[1] if id_match else "")
    if not job_id:
        raise ValueError(f"no job id in the environment or the subject {subject!r}")
    state = env.get("SLURM_JOB_STATE") or (state_match[1] if state_match else "")
    return SlurmEvent(
        job_id=job_id,
        user=env.get("SLURM_JOB_USER") or recipient.split("@", 1)[0],
        name=env.get("SLURM_JOB_NAME", ""),
        mail_type=env.get("SLURM_JOB_MAIL_TYPE", ""),
        state=state.split()[0] if state else "",
        exit_code=int(exit_match[1]) if exit_match else None,
        subject=subject,
    )


def build_message(ev: SlurmEvent, event: str, cluster: str) -> Message:
    """labq's notice for a Slurm job (user-controlled text escaped, as in job_queue/notify.py)."""
    what = {"started": "started", "finished": "finished", "failed": "FAILED"}[event]
    subject = f"Slurm job {safe(ev.job_id)} ({safe(ev.name)}) {what} on {safe(cluster)}"
    lines = [subject]
    if event != "started":
        code = "unknown" if ev.exit_code is None else str(ev.exit_code)
        lines.append(f"state: {safe(ev.state.lower() or 'unknown')}, exit code: {code}, "
                     f"OOM killed: {'yes' if ev.state == 'OUT_OF_MEMORY' else 'no'}")
    lines.append(f"details: sacct -j {safe(ev.job_id)}")
    summary = {"id": ev.job_id, "name": ev.name, "user": ev.user, "state": ev.state.lower(),
               "host": cluster, "exit_code": ev.exit_code, "oom_killed": ev.state == "OUT_OF_MEMORY",
               "reason": ""}
    return Message(event=event, job=summary, subject=subject, text="\n".join(lines))


def load_config(path: str) -> tuple[NotifyConfig, str]:
    """The ``[notify]`` table (with its secrets) and the cluster's name from the configuration file."""
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise NotifyConfigError(f"config {path}: {exc}") from exc
    cluster = data.get("cluster", "slurm")
    if not isinstance(cluster, str):
        raise NotifyConfigError(f"config {path}: 'cluster' must be a string")
    return load_secrets(parse_notify(data.get("notify", {}))), cluster


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="labkit-slurm-mail: %(message)s", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="labkit-slurm-mail", description=__doc__.split("\n\n")[0])
    parser.add_argument("-s", dest="subject", required=True, help="the subject slurmctld made")
    parser.add_argument("recipient", help="the job's mail user (default: its owner's name)")
    parser.add_argument("--config", default=os.environ.get("LABKIT_SLURM_MAIL_CONFIG", DEFAULT_CONFIG))
    args, _ignored = parser.parse_known_args(argv)
    environ = os.environ if env is None else env
    try:
        ev = parse_event(args.subject, args.recipient, environ)
        cfg, cluster = load_config(args.config)
    except (ValueError, NotifyConfigError) as exc:
        log.error("%s", exc)
        return 0
    event = ev.event
    if event is None:
        log.info("job %s: %s %s is not notified", ev.job_id, ev.mail_type or "event", ev.state)
        return 0
    if not cfg.enabled:
        log.info("job %s: no notification channels configured", ev.job_id)
        return 0
    deliver(cfg, build_message(ev, event, cluster), ev.user, label=f"Slurm job {ev.job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
