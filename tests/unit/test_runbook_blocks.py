"""The runbooks' lab-safe markers (tests/lab/runbook_blocks.py): the parser on samples, and every marked
block of docs/runbooks runs on a host of the lab, as a user the lab has, with no placeholder left and no
command that changes anything. tests/lab/test_lab_runbooks.py runs the blocks in the lab; this runs
without it. Also the runbooks' shape: each starts with Check first and says when to escalate."""

from __future__ import annotations

import re

import pytest
import yaml
from mon_helpers import alerting_rules
from runbook_blocks import REPO, RUNBOOKS, Block, MarkerError, all_blocks, blocks_in

SAMPLE = """\
# Something broke

<!-- lab-safe: host=infra01 user=labadmin -->
```sh
ssh infra01 scontrol ping      # is it UP?
```

```sh
sudo systemctl restart slurmctld
```

1. In a list:
   <!-- lab-safe: host=gpu01 user=root expect="uid=" jdoe=alice <node>=gpu01 -->
   ```sh
   ssh <node> id jdoe
     indented more
   ```
"""


def test_parser_finds_only_marked_blocks_with_their_options() -> None:
    first, second = blocks_in(SAMPLE, "Something")
    assert (first.id, first.line, first.host, first.user, first.expect) == (
        "Something-1", 4, "infra01", "labadmin", None)
    assert first.text == "ssh infra01 scontrol ping      # is it UP?\n"
    assert first.script == "set -e\nssh infra01 scontrol ping      # is it UP?\n"
    assert (second.id, second.host, second.user, second.expect) == ("Something-2", "gpu01", "root", "uid=")
    assert second.subs == {"jdoe": "alice", "<node>": "gpu01"}
    assert second.text == "ssh <node> id jdoe\n  indented more\n"
    assert second.script == "set -e\nssh gpu01 id alice\n  indented more\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("<!-- lab-safe: host=infra01 user=labadmin -->\n\n```sh\nuptime\n```\n", "just above"),
        ("<!-- lab-safe: host=infra01 user=labadmin -->\nuptime\n", "just above"),
        ("  <!-- lab-safe: host=infra01 user=labadmin -->\n```sh\nuptime\n```\n", "indented like it"),
        ("<!-- lab-safe: host=infra01 user=labadmin -->\n```sh\nuptime\n", "never closed"),
        ("<!-- lab-safe: user=labadmin -->\n```sh\nuptime\n```\n", "no host"),
        ("<!-- lab-safe: host=infra01 -->\n```sh\nuptime\n```\n", "no user"),
        ("<!-- lab-safe: host=infra01 user=labadmin infra01 -->\n```sh\nuptime\n```\n", "not NAME=VALUE"),
        ("<!-- lab-safe: host=infra01 host=gpu01 user=root -->\n```sh\nuptime\n```\n", "given twice"),
        ('<!-- lab-safe: host=infra01 user=root expect="open -->\n```sh\nuptime\n```\n', "quotation"),
    ],
)
def test_parser_refuses_a_marker_it_cannot_run(text: str, error: str) -> None:
    with pytest.raises(MarkerError, match=error):
        blocks_in(text, "Bad")


def lab_hosts() -> set[str]:
    """Every host named in inventory/lab/groups.yml (hosts.yml is written by make lab)."""
    def walk(group: dict) -> set[str]:
        hosts = set((group or {}).get("hosts") or {})
        for child in ((group or {}).get("children") or {}).values():
            hosts |= walk(child)
        return hosts

    return walk(yaml.safe_load((REPO / "inventory" / "lab" / "groups.yml").read_text())["all"])


def lab_users() -> set[str]:
    """root, the lab's admins and its members that are present: the accounts the admin key logs in as."""
    group_vars = REPO / "inventory" / "lab" / "group_vars" / "all"
    admins = yaml.safe_load((group_vars / "lab.yml").read_text())["common_admins"]
    members = yaml.safe_load((group_vars / "users.yml").read_text())["lab_users"]
    return {"root"} | {a["name"] for a in admins} | {
        m["name"] for m in members if m.get("state", "present") == "present"}


BLOCKS = all_blocks()

# Commands that change the lab: none of them belongs in a block an admin pastes to look.
MUTATING = re.compile(
    r"\bsystemctl\s+(?:restart|stop|start|reload|enable|disable|kill|mask|unmask|reboot|poweroff|edit)\b"
    r"|\b(?:rm|rmdir|mv|chmod|chown|truncate|umount|mount|fsck|mkfs\S*|modprobe|reboot|shutdown|kill|pkill)\s"
    r"|\bapt(?:-get)?\s|\bapt-mark\s+(?:hold|unhold)|\bdpkg\s+-[iPr]|\bdkms\s+(?:install|autoinstall|remove)"
    r"|\bansible-playbook\b|\bscontrol\s+(?:update|reboot|create|delete|reconfigure|shutdown|takeover)"
    r"|\bscancel\b|\bsbatch\b|\bsrun\b|\bsacctmgr\s+(?:-i\s+)?(?:add|create|delete|remove|modify|update)"
    r"|\blabq\s+(?:submit|cancel|hold|release)\b|\bldap(?:passwd|modify|add|delete|modrdn)\b|\bslapadd\b"
    r"|(?<![\w-])(?<!getent )passwd\b|\bsss_cache\b"
    r"|\bdocker\s+(?:run|rm|rmi|stop|kill|start|restart|system\s+prune|\S+\s+prune)"
    r"|\bamtool\b.*\bsilence\s+(?:add|expire|import)|\bnvidia-smi\b.*\s-r\b|\bchronyc\s+(?:makestep|burst)"
    r"|\bjournalctl\b.*--vacuum|\bexportfs\s+-[arfu]|\bdropdb\b|\bcreatedb\b|pg_terminate_backend"
    r"|\blabkit-\S+-restore\b(?!\s+--list)|\bcurl\b.*\s-X\s*(?:POST|PUT|DELETE)|\bsudo\s+-u\s+\S+\s+slurmctld"
    r"|\btee\b|(?:^|\s)\d?>>?\s*(?!&|/dev/null|\d+\b)[\w/~$.\"']",  # the last: writing to a file
)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_marked_block_runs_on_a_lab_host_as_a_lab_user(block: Block) -> None:
    assert block.host in lab_hosts(), f"{block.runbook}.md:{block.line}: no host {block.host} in the lab"
    assert block.user in lab_users(), f"{block.runbook}.md:{block.line}: no user {block.user} in the lab"
    for name in block.subs:
        assert name in block.text, f"{block.runbook}.md:{block.line}: placeholder {name} not in the block"
    left = re.findall(r"<[a-z][\w -]*>", block.script)
    assert not left, f"{block.runbook}.md:{block.line}: give the lab's value for {left} in the marker"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_marked_block_changes_nothing(block: Block) -> None:
    for line in block.script.splitlines():
        command = line.split(" #", 1)[0]  # a comment after the command says anything
        assert not MUTATING.search(command), f"{block.runbook}.md:{block.line}: '{line}' changes the lab"


@pytest.mark.parametrize(
    "command",
    ["sudo systemctl restart labqd", "ssh gpu01 sudo rm /etc/x",
     "sudo scontrol update nodename=gpu01 state=drain",
     "ansible-playbook -i inventory/lab playbooks/site.yml", "labq cancel 3", "echo x > /etc/motd",
     "ssh infra01 sudo labkit-postgresql-restore alice", "sudo apt-get install -y ipmitool",
     "ssh gpu01 passwd", "date >> /tmp/x"],
)
def test_mutating_commands_are_recognised(command: str) -> None:
    assert MUTATING.search(command)


@pytest.mark.parametrize(
    "command",
    ["ssh infra01 systemctl status slurmctld --no-pager", "curl -s x 2>/dev/null | head -n 3",
     "ssh infra01 sudo labkit-postgresql-restore --list", "timeout 5 bash -c '</dev/tcp/gpu01/22'",
     "sudo journalctl -u labqd --since -1h 2>&1 | tail", "ssh gpu01 labq ls --all-nodes",
     "ssh gpu01 getent passwd alice", "psql -c 'SELECT 1 WHERE 2 > 1'"],
)
def test_read_only_commands_pass(command: str) -> None:
    assert not MUTATING.search(command)


def test_runbooks_have_marked_blocks() -> None:
    assert len(BLOCKS) >= 30, "the runbooks' read-only checks are marked lab-safe and run in the lab"


def titles(path: str) -> list[str]:
    return re.findall(r"^## +(.+?)\s*$", (RUNBOOKS / path).read_text(), flags=re.MULTILINE)


# An alert's runbook is named like its alert (tests/monitoring/test_runbooks.py: the CamelCase pages are
# exactly the alerts of the rules in monitoring/prometheus/rules).
ALERTS = {rule["alert"] for rule in alerting_rules()}


@pytest.mark.parametrize("path", sorted(p.name for p in RUNBOOKS.glob("*.md")))
def test_runbook_starts_with_what_to_check_and_says_when_to_escalate(path: str) -> None:
    """Every runbook with sections starts with Check first, each section once. An alert's runbook then says
    What it means and What to do, and ends with When to escalate; a task's has When to escalate too (a
    restore may keep the record of a run after it). Pages without sections are task pages that only
    point to the alert runbook that has the procedure."""
    found = titles(path)
    alert = path.removesuffix(".md") in ALERTS
    if not found:
        assert not alert, f"{path}: an alert's runbook needs its sections"
        assert "This procedure is one page with its alert" in (RUNBOOKS / path).read_text(), path
        return
    assert found[0] == "Check first", f"{path}: starts with '{found[0]}', not with 'Check first'"
    assert len(found) == len(set(found)), f"{path}: a section twice in {found}"
    assert "When to escalate" in found, f"{path}: no section 'When to escalate'"
    if alert:
        assert found[:3] == ["Check first", "What it means", "What to do"], (
            f"{path}: sections {found[:3]}, not Check first, What it means, What to do")
        assert found[-1] == "When to escalate", f"{path}: ends with '{found[-1]}', not 'When to escalate'"
