"""Dry runs on the converged lab: an admin previews a converge (`site.yml --check --diff`) and a node's
rebuild (`rebuild-node.yml --check -l gpu02`) before running them (docs/runbooks/rebuild-gpu-node.md).
Both finish without an error and predict no change on a lab that is as site.yml leaves it; the rebuild's
health summary still reports. Marker ``dryrun``: minutes each, `make e2e-dry-run`, not in `make test`.
"""

from __future__ import annotations

import pytest
from lab_helpers import run_playbook

pytestmark = [pytest.mark.lab, pytest.mark.dryrun]

HOSTS = ("infra01", "gpu01", "gpu02")


def test_site_dry_run_succeeds_and_predicts_no_change(second_run):
    run = run_playbook("site.yml", "--check", "--diff")
    assert run.rc == 0, run.output[-4000:]
    run.assert_changed_nothing(HOSTS)


def test_rebuild_dry_run_of_one_node_succeeds_and_reports_health(second_run):
    run = run_playbook("rebuild-node.yml", "--check", "-l", "gpu02")
    assert run.rc == 0, run.output[-4000:]
    run.assert_changed_nothing(("gpu02",))
    assert "systemd: running; failed units: none" in run.output
