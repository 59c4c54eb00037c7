"""Pure decisions about how a job's container ended and what a failed Docker call means.

No I/O: the daemon passes in what Docker reported (or the exception it raised) and applies the
result, so every rule is unit-tested like the scheduler.
"""

from __future__ import annotations

import errno
import re

from .models import JobState, StopReason

# Errors that mean dockerd is not there (restarting, socket gone): the start is resumed, however long.
_UNREACHABLE_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE,
                                 errno.ECONNABORTED, errno.ETIMEDOUT})
# Errors of labqd's own resources: retried a bounded number of times, then the job fails with them.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC})

MAX_START_ATTEMPTS = 3
"""Tries of a start that failed with a Docker error other than "unreachable" before the job fails."""


def classify_exit(stop_reason: StopReason | None, exit_code: int | None, oom_killed: bool,
                  reason: str) -> tuple[JobState, str]:
    """The final state and reason of a job whose container ended.

    ``reason`` is the job's recorded reason (a cancel records who cancelled before the stop).
    """
    if stop_reason == StopReason.CANCEL:
        return JobState.CANCELLED, reason or "cancelled"
    if stop_reason == StopReason.TIME_LIMIT:
        return JobState.TIMEOUT, "TimeLimit"
    if exit_code == 0 and not oom_killed:
        return JobState.SUCCEEDED, ""
    if oom_killed:
        return JobState.FAILED, "OOM killed"
    if exit_code is not None and 128 < exit_code < 160:
        return JobState.FAILED, f"killed by signal {exit_code - 128} (exit code {exit_code})"
    return JobState.FAILED, f"exit code {exit_code}"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts, and exceptions carried in its arguments (urllib3
    and requests wrap the socket error they got in their own)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 32:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo.extend(x for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
                    if isinstance(x, BaseException))
    return seen


def docker_unreachable(exc: BaseException) -> bool:
    """True when a failed Docker call means dockerd cannot be reached (retry without limit);
    False for any other failure (bounded retries, then the job fails with the error text)."""
    chain = _chain(exc)
    if any(isinstance(e, OSError) and e.errno in _RESOURCE_ERRNOS for e in chain):
        return False
    if any(isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS for e in chain):
        return True
    names = {type(e).__name__ for e in chain}
    # requests/urllib3 without an errno: a refused or dropped connection to the Docker socket
    return bool(names & {"ConnectionError", "NewConnectionError", "ProtocolError", "ConnectTimeout",
                         "ReadTimeout", "ConnectionRefusedError", "FileNotFoundError"})


def start_failure(exc: BaseException, attempts: int) -> str | None:
    """After a start that raised ``exc`` on try ``attempts`` (1-based): the reason to fail the job
    with, or None to try again later."""
    text = str(getattr(exc, "explanation", None) or exc) or type(exc).__name__
    explained = explain_start_error(text)
    if explained is not None:  # the image cannot run the command: retrying cannot help
        return explained
    if docker_unreachable(exc) or attempts < MAX_START_ATTEMPTS:
        return None
    return f"docker: {text[:300]} (after {attempts} tries)"


_NOT_ON_PATH = re.compile(r'exec: "([^"]+)": executable file not found in \$PATH')
_NO_FILE = re.compile(r'exec: "([^"]+)": stat [^:]+: no such file or directory')
_NO_ACCESS = re.compile(r'exec: "([^"]+)": (?:stat [^:]+: )?permission denied')


def explain_start_error(text: str) -> str | None:
    """Docker's "cannot exec the command" errors in words a student can act on (None: another error)."""
    m = _NOT_ON_PATH.search(text)
    if m:
        return (f"the image has no '{m.group(1)}' on its PATH (it may set no PATH at all): give the "
                f"program's full path (e.g. /bin/sh) or use an image that has it")
    m = _NO_FILE.search(text)
    if m:
        return f"the image has no file {m.group(1)}: check the command's path, or use an image that has it"
    m = _NO_ACCESS.search(text)
    if m:
        return (f"your user cannot run {m.group(1)} in the image (a directory such as / or /usr readable "
                f"by root only, e.g. mode 0700): rebuild the image with world-readable files")
    return None
