"""Re-run speed of site.yml on the local lab (run by `make bench`; it RECREATES the lab's hosts).

Prints, measured in one run: the time of a fresh converge (the lab's hosts removed and started again from
the node image, then playbooks/site.yml), the time of a second site.yml on the same lab, whose recap must
show nothing changed, and their ratio (issue 20's goal: the second run takes at most a fifth). Each run
uses the profile_tasks callback; the second run's time per role is printed, so the next person cuts real
time instead of guessing. The lab is converged again at the end (later benchmarks use it), but members'
homes, queued jobs and test data of the old hosts are gone: run it on a lab you can rebuild.

Without the lab's image and Docker it says so and exits 0. `bench_rerun.py second` skips the fresh
converge and times only a second run on the lab as it is.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "lab"))

from lab_helpers import PlaybookRun  # noqa: E402  (the lab tests' recap parser)

LABCTL = [sys.executable, str(REPO / "tools" / "labctl.py")]
GOAL = 5.0
TASK_HEADER = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(.+?)\] \*+$")
PREVIOUS_TASK_TIME = re.compile(r"\((\d+):(\d+):(\d+(?:\.\d+)?)\)\s+\d+:\d+:\d+")


def converge() -> tuple[float, str]:
    """One site.yml run on the lab: its wall time and its output (profile_tasks timing each task)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks")
    start = time.monotonic()
    command = ["ansible-playbook", "-i", "inventory/lab", "playbooks/site.yml"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_rerun: site.yml failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}")
    return elapsed, proc.stdout


def changed_hosts(output: str) -> dict[str, int]:
    recap = PlaybookRun(0, output).recap()
    return {host: counts["changed"] for host, counts in recap.items() if counts["changed"]}


def seconds_per_role(output: str) -> list[tuple[str, int, float]]:
    """(role, tasks, seconds) from profile_tasks' lines: each task's header is followed by the time the task
    before it took. Plays' own tasks (fact gathering, argument checks) count as '(play)'."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    lines = output.splitlines()
    previous = None
    for i, line in enumerate(lines):
        header = TASK_HEADER.match(line)
        if not header:
            continue
        timing = PREVIOUS_TASK_TIME.search(lines[i + 1]) if i + 1 < len(lines) else None
        if previous is not None and timing:
            hours, minutes, secs = timing.groups()
            role = previous.split(" : ")[0] if " : " in previous else "(play)"
            totals[role][0] += 1
            totals[role][1] += int(hours) * 3600 + int(minutes) * 60 + float(secs)
        previous = header.group(1)
    return sorted(((role, int(n), s) for role, (n, s) in totals.items()), key=lambda row: -row[2])


def labctl(*args: str) -> None:
    subprocess.run([*LABCTL, *args], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        print("bench_rerun: no Docker engine (make host, make lab); nothing measured")
        return 0
    second_only = sys.argv[1:] == ["second"]
    if not second_only:
        print("bench_rerun: recreating the lab's hosts for a fresh converge (~15 min), then a second run")
        labctl("down")
        labctl("up")
        fresh, fresh_out = converge()
        print(f"1. fresh converge of new hosts: {fresh:.0f} s (changed per host: {changed_hosts(fresh_out)})")
    second, second_out = converge()
    changed = changed_hosts(second_out)
    print(f"2. second run of site.yml on the same lab: {second:.0f} s; "
          + ("nothing changed" if not changed else f"CHANGED (not idempotent): {changed}"))
    for role, tasks, seconds in seconds_per_role(second_out)[:12]:
        print(f"     {role:28s} {tasks:4d} tasks {seconds:7.1f} s")
    if not second_only:
        ratio = fresh / second
        verdict = "meets" if ratio >= GOAL else "misses"
        print(f"3. fresh / second = {ratio:.2f} ({verdict} the goal of {GOAL:.0f}, measured in this run)")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
