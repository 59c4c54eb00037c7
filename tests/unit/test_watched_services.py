"""The one list of watched services (tools/labkit_lab/watched-services.yml), read by `labctl status` and by
playbooks/rebuild-node.yml: every entry is a systemd unit some role starts, so neither shows a service
that cannot run (as labctl's own list once did with Prometheus, which runs in a container)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from labkit_lab import lab

REPO = Path(__file__).resolve().parents[2]
SERVICE_MODULES = ("ansible.builtin.systemd", "ansible.builtin.systemd_service", "ansible.builtin.service")


def _tasks(items: list[Any]) -> Iterator[dict[str, Any]]:
    for item in items or []:
        if not isinstance(item, dict):
            continue
        yield item
        for key in ("block", "rescue", "always"):
            yield from _tasks(item.get(key, []))


def started_units() -> set[str]:
    """Units the roles start or enable (`{{ var }}` names resolved from the roles' vars/main.yml)."""
    role_vars: dict[str, Any] = {}
    for path in REPO.glob("roles/*/vars/main.yml"):
        role_vars |= yaml.safe_load(path.read_text()) or {}
    units = set()
    for path in [*REPO.glob("roles/*/tasks/*.yml"), *REPO.glob("roles/*/handlers/*.yml")]:
        for task in _tasks(yaml.safe_load(path.read_text())):
            args = next((task[m] for m in SERVICE_MODULES if isinstance(task.get(m), dict)), None)
            if not args or args.get("masked") or not (
                args.get("enabled") is True or args.get("state") in ("started", "restarted", "reloaded")
            ):
                continue
            name = re.sub(r"\{\{ *(\w+) *\}\}", lambda m: str(role_vars.get(m[1], m[0])), str(args["name"]))
            units.add(name.removesuffix(".service"))
    return units


def test_the_list_is_one_list_of_names_without_repeats() -> None:
    watched = lab.watched_services()
    assert watched and all(isinstance(s, str) and s for s in watched), watched
    assert len(set(watched)) == len(watched), watched


def test_every_watched_service_is_a_unit_a_role_starts() -> None:
    started = started_units()
    assert {"ssh", "slurmd", "prometheus-node-exporter"} <= started, started  # the search finds units
    missing = [s for s in lab.watched_services() if s not in started]
    assert not missing, f"watched but started by no role: {missing}"


def test_rebuild_node_reads_the_same_list() -> None:
    plays = yaml.safe_load((REPO / "playbooks" / "rebuild-node.yml").read_text())
    summary = next(play for play in plays if play.get("name") == "Health summary")
    files = [(REPO / "playbooks" / f).resolve() for f in summary.get("vars_files", [])]
    assert lab.WATCHED_SERVICES_FILE in files, files
    assert "labkit_watched_services" in (REPO / "playbooks" / "rebuild-node.yml").read_text()
