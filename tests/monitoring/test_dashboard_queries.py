"""Every dashboard query against a real Prometheus scraping real exporters (see conftest `stack`)."""

from __future__ import annotations

import pytest
from mon_dashboards import DASHBOARD_FILES, Target, load, sources_manifest, substitute, targets, variables
from mon_stack import TEST_HOST, Stack

pytest_plugins = ("mon_stack",)

TARGETS = targets()
MANIFEST = sources_manifest()


def needs(t: Target) -> set[str]:
    return set(MANIFEST.get(t.dashboard, {}).get(t.panel, []))


@pytest.mark.parametrize("t", TARGETS, ids=[f"{t.dashboard}:{t.panel}:{t.ref}" for t in TARGETS])
def test_panel_query(stack: Stack, t: Target) -> None:
    answer = stack.query(t.expr)
    assert answer["status"] == "success", f"Prometheus rejected {t.expr!r}: {answer.get('error')}"
    result = answer["data"]["result"]
    assert result, f"no series for {t.expr!r} (sources: {sorted(needs(t)) or 'node/exporter'})"


def test_unmarked_panels_show_the_real_host(stack: Stack) -> None:
    """Unmarked panels get their data from the real exporters scraped on this machine."""
    checked = 0
    for t in TARGETS:
        if needs(t):
            continue
        instances = {r["metric"].get("instance") for r in stack.series(t.expr)}
        if instances != {None}:  # aggregated away, e.g. sum(up)
            assert TEST_HOST in instances, t
            checked += 1
    assert checked >= 8


def test_gpu_user_panels_show_user_and_job(stack: Stack) -> None:
    """labkit_gpu_user_* panels keep the exporter's labels (e.g. `labq_job`, not Prometheus' `job`)."""
    for t in TARGETS:
        if "gpu_users" not in needs(t) or "labkit_gpu_user_" not in t.expr:
            continue
        for row in stack.series(t.expr):
            assert row["metric"].get("user") == "alice", t
            if "labq_job" in t.expr:
                assert row["metric"]["labq_job"] == "42", t


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=[p.stem for p in DASHBOARD_FILES])
def test_variable_queries(stack: Stack, path: object) -> None:
    import re

    import requests

    d = load(path)  # type: ignore[arg-type]
    names = set(variables(d))
    for var in variables(d).values():
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert m, var["query"]
        selector, label = substitute(m.group(1), names), m.group(2)
        resp = requests.get(
            f"{stack.prometheus}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10
        ).json()
        assert resp["status"] == "success", resp
        assert resp["data"], f"variable {var['name']}: no values for {selector}"
        if var["name"] == "host":
            assert TEST_HOST in resp["data"]
