# pgwarden: every target sets up what it needs, so each works on a fresh machine.
# `make test` is exactly what CI runs (.ci/run calls it).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extras that the test suite needs; kept in one place so demo and test agree.
EXTRAS := dev,cli,prometheus,otel,stress,sqlalchemy,fastapi
# A second venv with the lowest psycopg and psycopg-pool that pyproject.toml's
# lower bounds allow (same extras, everything else newest), so `make test` proves
# that the lower bounds tell the truth. docs/versions.md says why they are what they are.
LOWEST_VENV := .venv-lowest
LOWEST_BIN := $(LOWEST_VENV)/bin
LOWEST_STAMP := $(LOWEST_VENV)/.installed
LOWEST_CONSTRAINTS := $(LOWEST_VENV)/constraints.txt

.PHONY: demo test test-lowest lint types check-sync sysdeps bench clean help

help:
	@echo "make demo   - set up and run pgwarden's main job on an embedded PostgreSQL"
	@echo "make test   - set up and run lint, types and the whole test suite (what CI runs),"
	@echo "              then the suite again against the lowest psycopg/psycopg-pool allowed"
	@echo "make bench  - micro-benchmarks and full-size stress scenarios (about 20 minutes;"
	@echo "              writes docs/benchmarks.md)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

# Every runtime dependency in [project].dependencies pinned to its lower bound
# (`>=X`, `==X` or `~=X`); one without a lower bound is an error, since "the lowest
# version allowed" would then mean nothing. Constraints files take no extras:
# psycopg==X pulls psycopg-binary==X through the [binary] extra itself.
# (pip's own vendored tomli/packaging: this runs before anything is installed.)
define LOWEST_CONSTRAINTS_PY
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement

with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
for dep in deps:
    req = Requirement(dep)
    low = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    if len(low) != 1:
        sys.exit(f"pyproject.toml: {dep!r} needs exactly one lower bound (>=, == or ~=)")
    print(f"{req.name}=={low[0]}")
endef
export LOWEST_CONSTRAINTS_PY

# Checks that what got installed is what the constraints asked for.
define LOWEST_VERIFY_PY
import sys
from importlib.metadata import version

from pip._vendor.packaging.version import Version

bad = []
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    got = version(name)
    print(f"  {name} {got}")
    if Version(got) != Version(want):
        bad.append(f"{name} {got} installed, constraints say {want}")
sys.exit("; ".join(bad) or None)
endef
export LOWEST_VERIFY_PY

# Reinstalled when pyproject.toml changes, like the main venv; pip downgrades
# whatever no longer matches the constraints. The venv ignores itself in git.
# After the main venv (order only), so two editable installs never race under -j.
$(LOWEST_STAMP): pyproject.toml | $(STAMP)
	@test -x $(LOWEST_BIN)/python || $(PYTHON) -m venv $(LOWEST_VENV)
	@echo '*' > $(LOWEST_VENV)/.gitignore
	$(LOWEST_BIN)/python -m pip install --quiet --upgrade pip
	$(LOWEST_BIN)/python -c "$$LOWEST_CONSTRAINTS_PY" > $(LOWEST_CONSTRAINTS)
	$(LOWEST_BIN)/python -m pip install --quiet -c $(LOWEST_CONSTRAINTS) -e '.[$(EXTRAS)]'
	@echo "$(LOWEST_VENV) has:"
	@$(LOWEST_BIN)/python -c "$$LOWEST_VERIFY_PY" $(LOWEST_CONSTRAINTS)
	@touch $(LOWEST_STAMP)

# System packages the integration tests need: PostgreSQL server binaries,
# PgBouncer, Chromium for the dashboard's headless-browser test, and promtool
# (Debian package prometheus; its service is not started) for the alert rules. Installed only when missing and only when we can (root); the
# tests then say what is missing (skip locally, fail under CI=true).
# No cluster is created on the standard port: the tests start their own.
sysdeps:
	@need=""; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need="$$need postgresql"; \
	{ command -v pgbouncer || test -x /usr/sbin/pgbouncer; } >/dev/null 2>&1 || need="$$need pgbouncer"; \
	test -x /usr/bin/chromium || need="$$need chromium fonts-dejavu-core"; \
	command -v promtool >/dev/null 2>&1 || need="$$need prometheus"; \
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
	$(BIN)/ruff check src tests bench scripts examples
	$(BIN)/ruff format --check src tests bench scripts examples

types: $(STAMP)
	$(BIN)/mypy

check-sync: $(STAMP)
	$(BIN)/python scripts/async_to_sync.py --check

# The whole suite twice: newest versions, then the lowest ones the pins allow.
# The lowest run is the whole suite too, stress and browser tests included:
# nothing in it needs more than the lower bounds, and at about 4 minutes a run
# both fit well within CI's 90 minutes. Lint, types and check-sync run once
# (main venv); they do not depend on which psycopg is installed.
# pytest exits 5 when it collected no test: like any non-zero exit, that fails make.
define run-lowest-suite
@$(LOWEST_BIN)/python -c "$$LOWEST_VERIFY_PY" $(LOWEST_CONSTRAINTS)
$(LOWEST_BIN)/python -m pytest
endef

test: $(STAMP) $(LOWEST_STAMP) sysdeps lint types check-sync
	$(BIN)/python -m pytest
	$(run-lowest-suite)

# The lowest-versions run alone.
test-lowest: $(LOWEST_STAMP) sysdeps
	$(run-lowest-suite)

# Micro-benchmarks rewrite docs/benchmarks.md; the full-size stress tables are
# appended to it (the reading of who wins where is kept in docs/stress.md).
bench: $(STAMP) sysdeps
	$(BIN)/python bench/micro.py --write docs/benchmarks.md
	$(BIN)/python bench/sqlalchemy_bench.py --write docs/benchmarks.md
	$(BIN)/pgwarden stress --size full --out pgwarden-report/bench \
	  --markdown pgwarden-report/bench/stress.md; status=$$?; \
	  printf '\n' >> docs/benchmarks.md; cat pgwarden-report/bench/stress.md >> docs/benchmarks.md; \
	  exit $$status

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build src/*.egg-info .mypy_cache .ruff_cache .hypothesis
