"""The runbooks' lab-safe command blocks: read-only commands an admin can paste, each run in the lab.

A block is lab-safe when the line just above its fence is a marker (an HTML comment: hidden in rendered
Markdown, the same indentation as the fence)::

    <!-- lab-safe: host=infra01 user=labadmin expect="is UP" jdoe=alice -->
    ```sh
    ssh infra01 scontrol ping
    ```

`host` (a lab host) and `user` (`root`, or an account that logs in with the lab's admin key) say where and
as whom it runs; `expect` (optional) is text its output must contain; every other `NAME=VALUE` replaces
the placeholder NAME in the block with the lab's VALUE (`jdoe=alice`, `<node>=gpu01`). docs/development.md
("Runbooks") has the rules; tests/lab/test_lab_runbooks.py runs every block, tests/unit/test_runbook_blocks.py
checks the markers.

Imported as `runbook_blocks` (tests/lab is on pytest's pythonpath).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNBOOKS = REPO / "docs" / "runbooks"
MARKER = re.compile(r"^(?P<indent>\s*)<!--\s*lab-safe:(?P<body>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```")
RESERVED = ("host", "user", "expect")


class MarkerError(ValueError):
    """A marker that cannot be run: no fence below it, no host or user, a word that is not NAME=VALUE."""


@dataclass(frozen=True)
class Block:
    runbook: str  # the file's name without .md
    index: int  # 1, 2, ...: the marked blocks of that runbook, in order
    line: int  # the fence's line number (1-based)
    host: str
    user: str
    text: str  # the block as written (indentation removed)
    expect: str | None = None
    subs: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.runbook}-{self.index}"

    @property
    def script(self) -> str:
        """The block as it runs in the lab: its placeholders replaced, stopping at the first failure."""
        text = self.text
        for name, value in self.subs.items():
            text = text.replace(name, value)
        return "set -e\n" + text


def parse_marker(body: str, where: str) -> tuple[str, str, str | None, dict[str, str]]:
    try:
        words = shlex.split(body)
    except ValueError as e:
        raise MarkerError(f"{where}: {e}") from e
    options: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not name or not value:
            raise MarkerError(f"{where}: '{word}' is not NAME=VALUE")
        if name in options:
            raise MarkerError(f"{where}: {name} given twice")
        options[name] = value
    for name in ("host", "user"):
        if name not in options:
            raise MarkerError(f"{where}: the marker names no {name}")
    subs = {k: v for k, v in options.items() if k not in RESERVED}
    return options["host"], options["user"], options.get("expect"), subs


def blocks_in(text: str, runbook: str) -> list[Block]:
    """The marked blocks of one runbook's text."""
    lines = text.splitlines()
    found: list[Block] = []
    for n, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        where = f"{runbook}.md:{n + 1}"
        host, user, expect, subs = parse_marker(marker["body"], where)
        fence = FENCE.match(lines[n + 1]) if n + 1 < len(lines) else None
        if not fence or fence["indent"] != marker["indent"]:
            raise MarkerError(f"{where}: a lab-safe marker must stand just above a ``` fence, "
                              "indented like it")
        indent = fence["indent"]
        body: list[str] = []
        for inner in lines[n + 2:]:
            if inner.strip().startswith("```"):
                break
            body.append(inner.removeprefix(indent))
        else:
            raise MarkerError(f"{where}: the block is never closed")
        found.append(Block(runbook, len(found) + 1, n + 2, host, user, "\n".join(body) + "\n", expect, subs))
    return found


def all_blocks(directory: Path = RUNBOOKS) -> list[Block]:
    """Every marked block of every runbook, runbooks sorted by name."""
    return [b for path in sorted(directory.glob("*.md")) for b in blocks_in(path.read_text(), path.stem)]
