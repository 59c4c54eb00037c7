"""Every role keeps labkit's contract: argument_specs and defaults in step, documented, tested by molecule.

This is what prometheus-community's lint_arguments_spec.sh checks, plus labkit's own rules.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.parent.parent for p in (REPO / "roles").glob("*/meta/main.yml"))
ROLE_IDS = [r.name for r in ROLES]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def spec_options(role: Path) -> dict:
    specs = load(role / "meta" / "argument_specs.yml")["argument_specs"]
    return specs["main"].get("options", {})


def test_there_are_roles():
    assert "common" in ROLE_IDS


@pytest.mark.parametrize("role", ROLES, ids=ROLE_IDS)
def test_role_has_the_standard_layout(role):
    for rel in (
        "defaults/main.yml",
        "meta/argument_specs.yml",
        "tasks/main.yml",
        "molecule/default/molecule.yml",
        "molecule/default/converge.yml",
        "molecule/default/verify.yml",
    ):
        assert (role / rel).is_file(), f"{role.name}: missing {rel}"
    assert (REPO / "docs" / "roles" / f"{role.name}.md").is_file(), (
        f"{role.name}: missing docs/roles/{role.name}.md"
    )


@pytest.mark.parametrize("role", ROLES, ids=ROLE_IDS)
def test_argument_specs_and_defaults_list_the_same_variables(role):
    defaults = set(load(role / "defaults" / "main.yml"))
    options = set(spec_options(role))
    assert defaults - options == set(), f"{role.name}: defaults missing from argument_specs"
    assert options - defaults == set(), f"{role.name}: argument_specs options without a default"


@pytest.mark.parametrize("role", ROLES, ids=ROLE_IDS)
def test_public_variables_carry_the_role_prefix_and_internal_ones_an_underscore(role):
    prefix = role.name + "_"
    for name in load(role / "defaults" / "main.yml"):
        assert name.startswith(prefix), f"{role.name}: public variable {name} must start with {prefix}"
    vars_file = role / "vars" / "main.yml"
    if vars_file.exists():
        for name in load(vars_file):
            assert name.startswith("_" + prefix), (
                f"{role.name}: internal variable {name} must start with _{prefix}"
            )


@pytest.mark.parametrize("role", ROLES, ids=ROLE_IDS)
def test_every_default_is_documented_by_a_comment(role):
    lines = (role / "defaults" / "main.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^([a-z_][a-z0-9_]*):", line)
        if match:
            above = lines[i - 1] if i else ""
            assert above.startswith("#"), f"{role.name}: {match[1]} has no comment right above it in defaults"


@pytest.mark.parametrize("role", ROLES, ids=ROLE_IDS)
def test_every_option_has_a_description_and_type(role):
    def walk(options: dict, path: str) -> None:
        for name, spec in options.items():
            assert spec.get("description"), f"{role.name}: {path}{name} has no description"
            assert spec.get("type"), f"{role.name}: {path}{name} has no type"
            walk(spec.get("options", {}), f"{path}{name}.")

    walk(spec_options(role), "")


@pytest.mark.parametrize("role", ROLES, ids=ROLE_IDS)
def test_no_handler_or_task_restarts_services_through_the_shell(role):
    for path in role.rglob("*.yml"):
        text = path.read_text()
        assert not re.search(r"(command|shell):.*systemctl\s+(re)?(start|load)", text), path


def test_handler_names_are_unique_across_roles():
    # Handlers share one namespace per play: two roles' "Reload systemd" meant mlflow_server's notify ran
    # optuna_dashboard's handler, after mlflow-server had been restarted on its old unit (found in the lab).
    seen: dict[str, str] = {}
    for role in ROLES:
        handlers = role / "handlers" / "main.yml"
        if not handlers.exists():
            continue
        for handler in yaml.safe_load(handlers.read_text()) or []:
            name = handler["name"]
            assert name not in seen, f"handler {name!r} is in both {seen[name]} and {role.name}"
            seen[name] = role.name
