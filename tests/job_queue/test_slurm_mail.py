"""labkit-slurm-mail, Slurm's MailProg: a Slurm job's notice reaches its owner through labq's channels.

The program runs as slurmctld runs it (``-s SUBJECT RECIPIENT`` and the job in its environment) against a
real Slack-like HTTP receiver and a real SMTP sink on loopback (the receivers of test_labq_notify.py).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_labq_notify import SlackReceiver, SmtpSink, notify_config

from job_queue import slurm_mail

SUBJECT_END = "Slurm Job_id=42 Name=train Ended, Run time 00:01:02, COMPLETED, ExitCode 0"
SUBJECT_FAIL = "Slurm Job_id=43 Name=bad\x1b[2J Failed, Run time 00:00:01, FAILED, ExitCode 3"
ENV_END = {"SLURM_JOB_ID": "42", "SLURM_JOB_USER": "alice", "SLURM_JOB_NAME": "train",
           "SLURM_JOB_MAIL_TYPE": "Ended", "SLURM_JOB_STATE": "COMPLETED"}


@pytest.fixture
def receivers() -> Iterator[tuple[SlackReceiver, SmtpSink]]:
    slack, smtp = SlackReceiver({"alice@lab.test": "U0ALICE"}), SmtpSink()
    yield slack, smtp
    slack.close()
    smtp.close()


def write_config(tmp_path: Path, slack: SlackReceiver, smtp: SmtpSink, channels: str) -> Path:
    cfg = tmp_path / "slurm-mail.toml"
    text = notify_config(tmp_path, slack_port=slack.port, smtp_port=smtp.port, channels=channels,
                         default_events="[]")
    cfg.write_text('cluster = "labkit"\n' + text)
    return cfg


@pytest.mark.parametrize(
    ("env", "subject", "event"),
    [
        (ENV_END, SUBJECT_END, "finished"),
        ({**ENV_END, "SLURM_JOB_MAIL_TYPE": "Began", "SLURM_JOB_STATE": "RUNNING"},
         "Slurm Job_id=42 Name=train Began, Queued time 00:00:01", "started"),
        ({**ENV_END, "SLURM_JOB_MAIL_TYPE": "Failed", "SLURM_JOB_STATE": "FAILED"}, SUBJECT_FAIL, "failed"),
        ({**ENV_END, "SLURM_JOB_STATE": "TIMEOUT"}, SUBJECT_END, "failed"),
        ({**ENV_END, "SLURM_JOB_STATE": "OUT_OF_MEMORY"}, SUBJECT_END, "failed"),
        ({**ENV_END, "SLURM_JOB_STATE": "CANCELLED"}, SUBJECT_END, None),  # a person cancelled it
        ({}, SUBJECT_END, "finished"),  # an older Slurm: everything from the subject
        ({}, "Slurm Job_id=44 Name=x Ended, Run time 00:00:09, TIMEOUT, ExitCode 0", "failed"),
    ],
)
def test_events_map_to_labqs(env: dict[str, str], subject: str, event: str | None) -> None:
    ev = slurm_mail.parse_event(subject, "alice", env)
    assert ev.event == event
    assert ev.user == "alice"


def test_no_job_id_is_an_error() -> None:
    with pytest.raises(ValueError, match="no job id"):
        slurm_mail.parse_event("hello", "alice", {})


def test_a_finished_job_reaches_its_owner_by_webhook_dm_and_mail(tmp_path, receivers) -> None:
    slack, smtp = receivers
    cfg = write_config(tmp_path, slack, smtp, '["webhook", "slack_dm", "mail"]')
    rc = slurm_mail.main(["-s", SUBJECT_END, "alice", "--config", str(cfg)], env=ENV_END)
    assert rc == 0
    [hook] = slack.of("/webhook")
    assert "Slurm job 42 (train) finished on labkit" in hook["data"]["text"]
    [dm] = slack.of("/api/chat.postMessage")
    assert dm["data"]["channel"] == "U0ALICE" and "exit code: 0" in dm["data"]["text"]
    [mail] = smtp.messages
    assert mail["to"] == ["alice@lab.test"]
    assert mail["msg"]["Subject"] == "Slurm job 42 (train) finished on labkit"


def test_a_failed_job_escapes_its_name_and_says_failed(tmp_path, receivers) -> None:
    slack, smtp = receivers
    cfg = write_config(tmp_path, slack, smtp, '["mail"]')
    env = {**ENV_END, "SLURM_JOB_ID": "43", "SLURM_JOB_NAME": "bad\x1b[2J", "SLURM_JOB_STATE": "FAILED",
           "SLURM_JOB_MAIL_TYPE": "Failed"}
    assert slurm_mail.main(["-s", SUBJECT_FAIL, "alice", "--config", str(cfg)], env=env) == 0
    [mail] = smtp.messages
    subject = mail["msg"]["Subject"]
    assert "FAILED" in subject and "\x1b" not in subject and "\\x1b" in subject
    assert "exit code: 3" in mail["msg"].get_payload()


def test_cancelled_jobs_and_broken_configs_send_nothing_and_never_fail_slurmctld(tmp_path, receivers) -> None:
    slack, smtp = receivers
    cfg = write_config(tmp_path, slack, smtp, '["webhook", "mail"]')
    cancelled = {**ENV_END, "SLURM_JOB_STATE": "CANCELLED"}
    assert slurm_mail.main(["-s", SUBJECT_END, "alice", "--config", str(cfg)], env=cancelled) == 0
    broken = tmp_path / "broken.toml"
    broken.write_text('[notify]\nchannels = ["pigeon"]\n')
    assert slurm_mail.main(["-s", SUBJECT_END, "alice", "--config", str(broken)], env=ENV_END) == 0
    missing = tmp_path / "missing.toml"
    assert slurm_mail.main(["-s", SUBJECT_END, "alice", "--config", str(missing)], env=ENV_END) == 0
    assert slack.requests == [] and smtp.messages == []


def test_unreachable_channels_are_logged_not_raised(tmp_path) -> None:
    cfg = tmp_path / "slurm-mail.toml"
    cfg.write_text('[notify]\nchannels = ["mail"]\nmail_domain = "lab.test"\nsmtp_host = "127.0.0.1"\n'
                   "smtp_port = 9\ntimeout_s = 2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "job_queue.slurm_mail", "-s", SUBJECT_END, "alice", "--config", str(cfg)],
        env={**ENV_END, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0
    assert "Slurm job 42: mail notification (finished) failed" in proc.stderr


def test_wrong_arguments_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        slurm_mail.main(["alice"], env=ENV_END)
    assert exc.value.code == 2
