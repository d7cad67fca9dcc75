# Two entry points for a fresh Debian 12 machine: `make rehearse` and `make test`.
# Each installs what it needs (apt packages, the trixie root filesystem with
# pgcopydb 0.17 and PostgreSQL 17, a virtualenv in .venv), idempotently and cached.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= /var/cache/db-upgrade
HOST_PACKAGES := postgresql-15 postgresql-client-15 debootstrap bubblewrap python3-venv util-linux pgbouncer

.PHONY: deps host-packages rootfs venv test rehearse render bench image clean
VERSION := $(shell sed -n "s/^version = \"\(.*\)\"/\1/p" pyproject.toml)
IMAGE ?= ghcr.io/example/db-upgrade

deps: host-packages rootfs venv

# Host side: PostgreSQL 15 (the throwaway source), debootstrap and bwrap.
host-packages: $(CACHE)/.host-packages
$(CACHE)/.host-packages: Makefile
	@if ! dpkg -s $(HOST_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing host packages: $(HOST_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(HOST_PACKAGES) >/dev/null; \
	fi
	@mkdir -p $(CACHE) && touch $@

rootfs: host-packages
	@DB_UPGRADE_CACHE=$(CACHE) images/build-rootfs.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $@

test: deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

rehearse: deps
	$(VENV)/bin/db-upgrade rehearse $(REHEARSE_ARGS)

render: venv
	$(VENV)/bin/db-upgrade render --config environments/example.yaml --out manifests/

bench: deps
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .work

# The step image, tagged with the package version (the template pins the same tag).
image:
	docker build -f images/Dockerfile -t $(IMAGE):$(VERSION) .
