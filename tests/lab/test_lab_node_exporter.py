"""node_exporter on every lab host, scraped from outside as Prometheus would."""

from __future__ import annotations

import re
import urllib.request

import pytest

pytestmark = [pytest.mark.lab]


@pytest.mark.parametrize("host", ["infra01", "gpu01", "gpu02"])
def test_every_host_exports_its_metrics_on_the_lab_network(lab, host_exec, host):
    host_exec(
        host,
        "sh",
        "-c",
        "echo 'labkit_lab_check{check=\"e2e\"} 1' > /var/lib/prometheus/node-exporter/e2e.prom.tmp && "
        "mv /var/lib/prometheus/node-exporter/e2e.prom.tmp /var/lib/prometheus/node-exporter/e2e.prom",
    )
    url = f"http://{lab[host]['address']}:9100/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    assert re.search(r'^node_uname_info\{[^}]*nodename="' + host + '"', body, re.M)
    assert re.search(r'^labkit_lab_check\{check="e2e"\} 1$', body, re.M)
    assert re.search(r'^node_systemd_unit_state\{name="ssh.service",state="active"[^}]*\} 1$', body, re.M)
