"""pytest wiring for the labq tests; the helpers and fixtures live in labq_helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from labq_helpers import _docker_ok, labqd, make_labqd, shared_labqd, test_image, users

__all__ = ["labqd", "make_labqd", "shared_labqd", "test_image", "users"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    ours = [i for i in items if i.get_closest_marker("docker") and here in Path(str(i.path)).parents]
    if ours and not _docker_ok():
        if os.environ.get("CI"):
            raise pytest.UsageError("CI: the labq Docker tests need a running Docker engine")
        skip = pytest.mark.skip(reason="no running Docker engine")
        for item in ours:
            item.add_marker(skip)


