# labkit: one entry point for the lab, the tests and the benchmarks. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

ROOT      := $(abspath .)
VENV      := $(ROOT)/.venv
BIN       := $(VENV)/bin
PY        := $(BIN)/python
LABCTL    := $(PY) tools/labctl.py
LAB_INV   := inventory/lab
ROLES_WITH_MOLECULE := $(patsubst roles/%/molecule/default/molecule.yml,%,$(wildcard roles/*/molecule/default/molecule.yml))

export PATH := $(BIN):$(PATH)
export LABKIT_ROOT := $(ROOT)
export ANSIBLE_CONFIG := $(ROOT)/ansible.cfg

.PHONY: help host venv lab lab-image lab-infra lab-up lab-converge lab-status lab-down \
        test quick lint unit promtool-test pytest-docker e2e e2e-workflows e2e-dry-run lab-job-image checks-then-molecule molecule molecule-% test-nfs-vm bench gpu-check clean

help: ## list the targets
	@grep -hE '^[a-zA-Z%_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-16s %s\n", $$1, $$2}'

# ------------------------------------------------------------------------------------------ setup
host: ## apt packages (requirements/apt-host.txt) and a running dockerd on this machine
	tools/labkit_lab/host-setup.sh

$(BIN)/ansible-playbook: requirements/dev.txt requirements/constraints.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/dev.txt -c requirements/constraints.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

venv: $(BIN)/ansible-playbook ## Python tools in .venv (pinned by requirements/constraints.txt)

# ------------------------------------------------------------------------------------------ the lab
lab-image: host venv ## build (or reuse) the lab's Debian 12 systemd node image
	$(LABCTL) image

lab-infra: lab-image ## the lab network, its caching apt proxy and its service images
	$(LABCTL) images

lab-up: lab-infra ## start the lab's hosts and write inventory/lab/hosts.yml
	$(LABCTL) up

lab-converge: ## run playbooks/site.yml on the lab
	ansible-playbook -i $(LAB_INV) playbooks/site.yml

# In order even under `make -j` (make test runs it beside the Docker chain): the job image needs the
# nodes' Docker, which the converge installs.
lab: lab-up ## bring up the local lab, converge it, load the job image, print the status
	$(MAKE) --no-print-directory lab-converge
	$(MAKE) --no-print-directory lab-job-image
	$(MAKE) --no-print-directory lab-status

lab-job-image: ## load the lab's job image (labkit-job:1: Debian 12 with python3) into the GPU nodes
	$(LABCTL) job-image

lab-status: ## what runs where in the lab
	$(LABCTL) status

lab-down: venv ## remove the lab (keeps the image and the apt cache)
	$(LABCTL) down

# ------------------------------------------------------------------------------------------ tests
# The lab's chain (converge, end-to-end checks) and the other chain (linters and unit tests, the
# labqd/exporter Docker tests, then the molecule scenarios) run side by side: they share only the lab
# network and the apt proxy, and much of each is waiting on apt, systemd and SSH. The lab's chain is the
# longer one (about 58 of CI's 63 minutes when the linters ran first), so nothing runs before it but
# starting the lab's hosts, which take their fixed addresses before molecule's instances take theirs
# (from the network's dynamic range). `make quick` is the fast loop that fails early on lint.
test: venv ## everything CI runs: lab end-to-end beside lint, unit, the Docker tests and molecule
	$(MAKE) --no-print-directory lab-up
	$(MAKE) --no-print-directory -j2 e2e checks-then-molecule

checks-then-molecule: ## lint, unit, the Docker tests, then every molecule scenario (the half of `make test` beside e2e)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory unit
	$(MAKE) --no-print-directory pytest-docker
	$(MAKE) --no-print-directory molecule

quick: lint unit ## the fast loop: linters and unit tests (no Docker needed)

lint: venv ## yamllint, ansible-lint (production profile), ruff, mypy
	yamllint --strict .
	ansible-lint --profile production --offline -q
	ruff check .
	mypy

unit: venv ## unit tests (no Docker, no lab)
	pytest -m "not docker and not lab and not nfs_vm"

PROMTOOL_DIR := .cache/promtool
promtool-test: venv ## the alert rules rendered with monitoring_server's defaults: promtool check and unit tests
	rm -rf $(PROMTOOL_DIR) && mkdir -p $(PROMTOOL_DIR)
	$(PY) monitoring/prometheus/render_rules.py $(PROMTOOL_DIR)/rules >/dev/null
	cp -r monitoring/prometheus/tests $(PROMTOOL_DIR)/tests
	promtool check rules $(PROMTOOL_DIR)/rules/*.rules.yml
	cd $(PROMTOOL_DIR)/tests && promtool test rules *.test.yml

pytest-docker: host venv ## tests that drive a real Docker engine (labqd, exporters)
	pytest -m "docker and not lab"

e2e: lab ## end-to-end checks against the converged lab (the 25 slowest listed at the end)
	pytest -m "lab and not workflow and not dryrun" --durations=25

e2e-workflows: lab ## not in `make test`: the students' experiment workflows in the lab (about 15 min)
	pytest -m "lab and workflow" --durations=10

e2e-dry-run: lab ## not in `make test`: site.yml and rebuild-node.yml in check mode on the converged lab (about 12 min)
	pytest -m "lab and dryrun" --durations=0

MOLECULE_JOBS ?= 2
molecule: lab-infra ## every role's molecule scenario (converge, idempotence, verify), MOLECULE_JOBS at once
	$(MAKE) --no-print-directory -j$(MOLECULE_JOBS) --output-sync=target $(addprefix molecule-,$(ROLES_WITH_MOLECULE))

molecule-%: lab-infra ## one role's molecule scenario, e.g. make molecule-common
	start=$$(date +%s) && proxy=$$($(LABCTL) proxy-url) && cd roles/$* && \
	  LABKIT_MOLECULE_INSTANCE=molecule-$* LABKIT_APT_PROXY=$$proxy molecule test && \
	  echo "==> molecule-$*: passed in $$(( $$(date +%s) - start )) s"

test-nfs-vm: host venv ## opt-in, not in `make test`: the NFS roles on two QEMU VMs with real kernel NFS (~11 min)
	tools/labkit_lab/host-setup.sh nfs-vm
	$(LABCTL) infra
	$(PY) tools/nfsvm.py image
	pytest -m nfs_vm -s --durations=0 tests/nfs_vm

bench: venv ## benchmarks: print ratios measured in one run (not part of `make test`)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

gpu-check: venv ## on a node with an NVIDIA GPU: labkit's GPU parts against the device (docs/gpu-check.md)
	$(PY) tests/gpu_check/gpu_check.py $(GPU_CHECK_ARGS)

clean: ## remove caches (not the lab)
	rm -rf .cache .pytest_cache .mypy_cache .ruff_cache
