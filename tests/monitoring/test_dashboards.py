"""Structure of the Grafana dashboards and provisioning files (no Grafana needed)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from mon_dashboards import (
    DASHBOARD_FILES,
    load,
    panels,
    sources_manifest,
    sources_used,
    substitute,
    variables,
)
from mon_helpers import MONITORING

DS_REF = {"type": "prometheus", "uid": "${datasource}"}
IDS = [p.stem for p in DASHBOARD_FILES]


def walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) of a JSON tree."""
    out = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            out += walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += walk(v, f"{path}[{i}]")
    return out


def test_the_five_dashboards_exist() -> None:
    uids = {load(p)["uid"] for p in DASHBOARD_FILES}
    assert uids == {
        "labkit-cluster-overview",
        "labkit-gpu-detail",
        "labkit-gpu-users",
        "labkit-job-queue",
        "labkit-slurm",
    }


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=IDS)
def test_datasource_variable_and_no_hard_coded_uid(path: Any) -> None:
    d = load(path)
    ds = variables(d)["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"
    for where, value in walk(d):
        if where.endswith(".datasource") and value is not None:
            assert value == DS_REF, f"{where} = {value}"
    assert "__inputs" not in d  # exported "for sharing externally" would pin a datasource


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=IDS)
def test_panels_have_units_datasource_and_queries(path: Any) -> None:
    d = load(path)
    real = [p for p in panels(d) if p["type"] != "row"]
    assert real
    assert len({p["id"] for p in panels(d)}) == len(list(panels(d))), "panel ids must be unique"
    for p in real:
        assert p["datasource"] == DS_REF, p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t.get("datasource", DS_REF) == DS_REF


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=IDS)
def test_host_variable_and_gpu_variable_where_gpus_are_shown(path: Any) -> None:
    d = load(path)
    names = variables(d)
    assert "host" in names
    host = names["host"]
    assert host["includeAll"] and host["multi"] and host["allValue"] == ".*"
    exprs = " ".join(t["expr"] for p in panels(d) for t in p.get("targets", []))
    # every panel query is filtered by the host variable, except queue-wide totals
    if "DCGM_FI_DEV" in exprs and d["uid"] != "labkit-cluster-overview":
        assert "gpu" in names
        assert "$gpu" in exprs
    for var in names.values():
        if var["type"] == "query":
            assert var["datasource"] == DS_REF
            assert var["query"]["query"].startswith("label_values(")
    for p in panels(d):
        for t in p.get("targets", []):
            leftover = substitute(t["expr"], set(names))
            assert "$" not in leftover.replace("$1", ""), f"{p['title']}: unknown variable in {t['expr']}"


def test_panel_sources_manifest_matches_the_queries() -> None:
    manifest = sources_manifest()
    seen: dict[str, dict[str, list[str]]] = {}
    for path in DASHBOARD_FILES:
        d = load(path)
        for p in panels(d):
            used: set[str] = set()
            for t in p.get("targets", []):
                used |= sources_used(t["expr"])
            if used:
                seen.setdefault(d["uid"], {})[p["title"]] = sorted(used)
    assert {u: {t: sorted(s) for t, s in m.items()} for u, m in manifest.items()} == seen


def test_provisioning_files() -> None:
    prov = MONITORING / "grafana" / "provisioning"
    (ds_file,) = sorted((prov / "datasources").glob("*.yaml"))
    ds = yaml.safe_load(ds_file.read_text())
    assert ds["apiVersion"] == 1
    (prom,) = ds["datasources"]
    assert prom["type"] == "prometheus" and prom["isDefault"] is True
    (db_file,) = sorted((prov / "dashboards").glob("*.yaml"))
    db = yaml.safe_load(db_file.read_text())
    (provider,) = db["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
