"""Render the alert rule templates (rules/*.rules.yml.j2) outside Ansible, for the tests and promtool.

The monitoring_server role renders the same templates with ansible.builtin.template; this module
renders them the way Ansible does, for the promtool unit tests, the Prometheus tests, the benchmarks
and a workstation. The values come from the role: roles/monitoring_server/defaults/main.yml is the
one place thresholds, `for:` and the runbook base URL are set, and overrides are given as an
inventory would give them (role variables, `monitoring_server_alert_overrides` merged over
`monitoring_server_alerts` key by key). Each template names its own delimiters in a first
`#jinja2:` line (`[[ ... ]]`, so Prometheus' `{{ ... }}` stays as it is), which Ansible reads too.

    python monitoring/prometheus/render_rules.py DEST [-e '{"monitoring_server_node_down_for": "1m"}']

writes DEST/<name>.rules.yml for every template.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import yaml

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "rules"
TEMPLATE_SUFFIX = ".rules.yml.j2"
ROLE_DEFAULTS = HERE.parents[1] / "roles" / "monitoring_server" / "defaults" / "main.yml"
# Ansible's per-template override line (its JINJA2_OVERRIDE): `#jinja2:key:'value', key:'value'`.
OVERRIDE_LINE = "#jinja2:"


def templates() -> list[Path]:
    return sorted(TEMPLATES_DIR.glob(f"*{TEMPLATE_SUFFIX}"))


def rendered_name(template: Path) -> str:
    return template.name.removesuffix(".j2")


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Ansible's `combine(recursive=True)`: dicts merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in changes.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return out


def template_vars(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The role's defaults, `overrides` on top, and `_monitoring_server_alerts` as in its vars/main.yml."""
    values: dict[str, Any] = {**yaml.safe_load(ROLE_DEFAULTS.read_text()), **(overrides or {})}
    values["_monitoring_server_alerts"] = merge(
        values["monitoring_server_alerts"], values["monitoring_server_alert_overrides"]
    )
    return values


def _environment(first_line: str) -> jinja2.Environment:
    options: dict[str, Any] = {}
    for pair in first_line.removeprefix(OVERRIDE_LINE).split(","):
        key, value = pair.split(":", 1)
        options[key.strip()] = ast.literal_eval(value.strip())
    # ansible.builtin.template's settings: trim_blocks, the trailing newline kept, no escaping (YAML, not
    # HTML); undefined is an error.
    return jinja2.Environment(
        trim_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701
        undefined=jinja2.StrictUndefined,
        **options,
    )


def render_one(template: Path, values: Mapping[str, Any]) -> str:
    text = template.read_text()
    first_line, _, body = text.partition("\n")
    if not first_line.startswith(OVERRIDE_LINE):
        raise ValueError(f"{template}: the first line must be the {OVERRIDE_LINE} delimiter line")
    try:
        return _environment(first_line).from_string(body).render(values)
    except jinja2.UndefinedError as e:
        raise ValueError(f"{template.name}: {e.message}") from e


def render(overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Rendered rule file name -> its text, for every template."""
    values = template_vars(overrides)
    return {rendered_name(t): render_one(t, values) for t in templates()}


def write(dest: Path, overrides: Mapping[str, Any] | None = None) -> list[Path]:
    """Render every template into dest/ (made if missing); returns the files written."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render(overrides).items():
        path = dest / name
        path.write_text(text)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="directory the rendered *.rules.yml are written to")
    parser.add_argument(
        "-e",
        "--extra-vars",
        action="append",
        default=[],
        metavar="YAML",
        help="role variables as a YAML mapping, e.g. '{monitoring_server_node_down_for: 1m}' (repeatable)",
    )
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for text in args.extra_vars:
        extra = yaml.safe_load(text)
        if not isinstance(extra, dict):
            parser.error(f"--extra-vars must be a YAML mapping, got {text!r}")
        overrides.update(extra)
    try:
        for path in write(args.dest, overrides):
            print(path)
    except ValueError as e:
        print(f"render_rules: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
