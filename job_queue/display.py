"""Terminal safety: user-controlled text shown to people has its control characters escaped.

A job name, command, working directory, reason or user name reaches other users' terminals through
``labq ls``/``show``/``history``/``gpus`` and Slack or mail notifications. Anything that is not a
printable character (C0/C1 controls such as ESC, newlines, tabs, DEL, bidirectional overrides,
line separators) is shown as a Python-style escape (``\\x1b``, ``\\n``, ``\\u202e``), so no input can
move the cursor, recolour or rewrite another user's terminal. ``--json`` output keeps the exact text
(JSON itself escapes control characters).

Stdlib only, no imports: the CLI imports this module on every human-readable command.
"""

from __future__ import annotations

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
