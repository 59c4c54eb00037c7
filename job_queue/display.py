"""Terminal safety: user-controlled text shown to people has its control characters escaped.

A job name, command, working directory, reason or user name reaches other users' terminals through
``labq ls``/``show``/``history``/``gpus`` and Slack or mail notifications. Anything that is not a
printable character (C0/C1 controls such as ESC, newlines, tabs, DEL, bidirectional overrides,
line separators) is shown as a Python-style escape (``\\x1b``, ``\\n``, ``\\u202e``), so no input can
move the cursor, recolour or rewrite another user's terminal. ``--json`` output keeps the exact text
(JSON itself escapes control characters).

No imports: the CLI imports this module on every human-readable command.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not imported from typing: see cli.py
if TYPE_CHECKING:
    from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe(value: object, keep: str = "") -> str:
    """``str(value)`` with every non-printable character escaped (printable text is unchanged).

    ``keep``: characters left as they are (a log line keeps its tabs).
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _escape(ch) for ch in text)


def id_and_name(job: dict[str, Any]) -> tuple[str, str]:
    """The ID and NAME columns of a listed job (escaped): ``17_[5-9999]`` and ``train`` for an
    array's collapsed waiting tasks, ``42`` and ``train[3]`` for one task, ``43`` and ``eval`` else."""
    if job.get("array_tasks") is not None:
        return f"{job['array_id']}_[{job['array_tasks']}]", safe(job["name"])
    if job.get("array_index") is None:
        return str(job["id"]), safe(job["name"])
    return str(job["id"]), safe(f"{job['name']}[{job['array_index']}]")
