# pgwarden: every target sets up what it needs, so each works on a fresh machine.
# `make test` is exactly what CI runs (.ci/run calls it).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extras that the test suite needs; kept in one place so demo and test agree.
EXTRAS := dev,cli,prometheus,otel,stress

.PHONY: demo test lint types check-sync sysdeps bench clean help

help:
	@echo "make demo   - set up and run pgwarden's main job on an embedded PostgreSQL"
	@echo "make test   - set up and run lint, types and the whole test suite (what CI runs)"
	@echo "make bench  - micro-benchmarks and full-size stress scenarios (about 20 minutes;"
	@echo "              writes docs/benchmarks.md)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

# System packages the integration tests need: PostgreSQL server binaries,
# PgBouncer, and Chromium for the dashboard's headless-browser test. Installed only when missing and only when we can (root); the
# tests then say what is missing (skip locally, fail under CI=true).
# No cluster is created on the standard port: the tests start their own.
sysdeps:
	@need=""; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need="$$need postgresql"; \
	{ command -v pgbouncer || test -x /usr/sbin/pgbouncer; } >/dev/null 2>&1 || need="$$need pgbouncer"; \
	test -x /usr/bin/chromium || need="$$need chromium fonts-dejavu-core"; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing:$$need (apt-get)"; \
	    mkdir -p /etc/postgresql-common; \
	    grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf || \
	      echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$need >/dev/null; \
	  else \
	    echo "missing:$$need and not root: those tests will skip (fail under CI=true)"; \
	  fi; \
	fi

# The flagship: a cold-start storm and a restart under load, pgwarden against
# psycopg_pool, SQLAlchemy and a naive client, on servers it starts itself.
demo: $(STAMP) sysdeps
	$(BIN)/pgwarden stress --quick --out pgwarden-report

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

types: $(STAMP)
	$(BIN)/mypy

check-sync: $(STAMP)
	$(BIN)/python scripts/async_to_sync.py --check

test: $(STAMP) sysdeps lint types check-sync
	$(BIN)/python -m pytest

# Micro-benchmarks rewrite docs/benchmarks.md; the full-size stress tables are
# appended to it (the reading of who wins where is kept in docs/stress.md).
bench: $(STAMP) sysdeps
	$(BIN)/python bench/micro.py --write docs/benchmarks.md
	$(BIN)/pgwarden stress --size full --out pgwarden-report/bench \
	  --markdown pgwarden-report/bench/stress.md; status=$$?; \
	  printf '\n' >> docs/benchmarks.md; cat pgwarden-report/bench/stress.md >> docs/benchmarks.md; \
	  exit $$status

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .hypothesis
