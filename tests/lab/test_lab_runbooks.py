"""Every lab-safe command block of docs/runbooks runs in the lab as written: where its marker says, as whom,
exit status 0 (and the marker's expected text in its output). A block is run once, as one bash script
that stops at its first failing command (runbook_blocks.py has the marker's form).

As root a block runs at the host's console (docker exec); as any other user over a real SSH login with
the lab's admin key, forwarded (ssh -A), so its own `ssh gpu01 ...` lines reach the other hosts as the
runbooks' admin does from the lab's machines.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from lab_helpers import ssh
from runbook_blocks import Block, all_blocks

pytestmark = pytest.mark.lab

BLOCKS = all_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_lab_safe_block_runs(
    block: Block,
    lab: dict[str, Any],
    host_exec: Callable[..., subprocess.CompletedProcess[str]],
    agent: dict[str, str],
) -> None:
    if block.user == "root":
        run = host_exec(block.host, "bash", "-c", block.script)
    else:
        address = lab[block.host]["address"]
        run = ssh(address, block.user, "bash -c " + shlex.quote(block.script), extra=("-A",), env=agent,
                  stdin="")
    said = f"{block.runbook}.md line {block.line}, on {block.host} as {block.user}:\n{block.script}\n" \
           f"--- rc={run.returncode}\n--- stdout:\n{run.stdout[-3000:]}\n--- stderr:\n{run.stderr[-3000:]}"
    assert run.returncode == 0, said
    if block.expect is not None:
        assert block.expect in run.stdout, said
