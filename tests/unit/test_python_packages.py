"""The Python packaging scheme of docs/development.md ("Python packages"): one distribution named labkit;
one import package per component, in the component's folder, listed in the docs' table with its commands;
commands people type are labq*, the others labkit-*; job_queue never imports labkit_exporters, and the
wheel's packages import nothing from tools/ or tests/. And role labkit_python's build cache is keyed on
every path the wheel is made of."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOC = (REPO / "docs" / "development.md").read_text()


def doc_table() -> dict[str, tuple[str, set[str]]]:
    """import package -> (folder, commands), from the docs' table."""
    section = DOC.split("## Python packages", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\s*\| `(\w+)` \| `([^`]+)` \| [^|]+ \| (.+) \|\s*$", section, flags=re.MULTILINE)
    return {pkg: (folder.rstrip("/"), set(re.findall(r"`([\w-]+)`", cmds))) for pkg, folder, cmds in rows}


def packages() -> dict[str, Path]:
    """Top-level import packages the wheel ships (setuptools' find: where x include) -> their folder."""
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    found: dict[str, Path] = {}
    for where in find["where"]:
        for init in sorted((REPO / where).glob("*/__init__.py")):
            name = init.parent.name
            if any(re.fullmatch(pattern.replace("*", ".*"), name) for pattern in find["include"]):
                assert name not in found, f"{name} found twice"
                found[name] = init.parent
    return found


def test_one_distribution_named_for_the_product() -> None:
    assert PYPROJECT["project"]["name"] == "labkit"


def test_every_package_is_in_the_docs_table_with_its_folder_and_commands() -> None:
    table = doc_table()
    found = packages()
    assert set(table) == set(found), "docs/development.md's table and pyproject's packages differ"
    scripts = PYPROJECT["project"]["scripts"]
    for name, folder in found.items():
        assert table[name][0] == str(folder.relative_to(REPO)), name
        assert (folder / "py.typed").is_file(), f"{name} ships no py.typed"
        ships = {cmd for cmd, target in scripts.items() if target.split(".", 1)[0] == name}
        assert table[name][1] == ships, f"{name}: the docs list {table[name][1]}, pyproject {ships}"
    assert {target.split(".", 1)[0] for target in scripts.values()} <= set(found)


def test_a_generic_word_gets_the_labkit_prefix_and_commands_follow_the_scheme() -> None:
    for name in packages():
        assert name == "job_queue" or name.startswith("labkit_"), name
    for cmd, target in PYPROJECT["project"]["scripts"].items():
        typed = cmd in ("labq", "labqd")
        assert typed or cmd.startswith("labkit-"), cmd
        assert not typed or target.startswith("job_queue."), cmd


def imports(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_labkit_python_keys_its_build_cache_on_everything_the_wheel_is_made_of() -> None:
    """Role labkit_python names a cached build by these paths' git objects: a package outside them would be
    deployed stale from the cache after it changed."""
    role_vars = yaml.safe_load((REPO / "roles" / "labkit_python" / "vars" / "main.yml").read_text())
    paths = role_vars["_labkit_python_wheel_paths"]
    assert "pyproject.toml" in paths
    for name, folder in packages().items():
        relative = folder.relative_to(REPO)
        assert any(relative.is_relative_to(p) for p in paths), f"{name} ({relative}) is not in {paths}"


def test_which_package_imports_which() -> None:
    found = packages()
    assert "labkit_exporters" not in imports(found["job_queue"])
    for name, folder in found.items():
        used = imports(folder)
        assert not used & {"labkit_lab", "lab_helpers", "tests", "tools"}, f"{name} imports {used}"
