"""The NFS VM scenario's reports: a failed test shows the tail of both VMs' serial consoles."""

from __future__ import annotations

from collections.abc import Generator

import pytest
from labkit_lab import nfs_vm


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and item.get_closest_marker("nfs_vm") is not None:
        for vm in nfs_vm.VMS:
            report.sections.append(
                (f"serial console of {vm.name}", nfs_vm.tail(nfs_vm.RUN / f"{vm.name}.serial.log", 60))
            )
