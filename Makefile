# pgwarden: every target sets up what it needs, so each works on a fresh machine.
# `make test` is exactly what CI runs (.ci/run calls it).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extras that the test suite needs; kept in one place so demo and test agree.
EXTRAS := dev,cli,prometheus,otel,stress,sqlalchemy,fastapi,django,aws
# The API reference's builder (Sphinx): in the main venv only, since it checks the docs,
# not pgwarden's lower bounds (so not in EXTRAS, which .venv-lowest pins).
DOCS_EXTRAS := docs
DOCS_BUILD := build/docs
# A second venv with the lowest versions that pyproject.toml's lower bounds allow:
# psycopg, psycopg-pool and every library of the extras below (the test tools
# newest; see LOWEST_CONSTRAINTS_PY), so `make test` proves that the lower bounds
# tell the truth. docs/versions.md says why they are what they are.
LOWEST_VENV := .venv-lowest
LOWEST_BIN := $(LOWEST_VENV)/bin
LOWEST_STAMP := $(LOWEST_VENV)/.installed
LOWEST_CONSTRAINTS := $(LOWEST_VENV)/constraints.txt

.PHONY: demo test test-lowest lint types check-sync docs docs-check sysdeps bench clean help

help:
	@echo "make demo   - set up and run pgwarden's main job on an embedded PostgreSQL"
	@echo "make test   - set up and run lint, types and the whole test suite (what CI runs),"
	@echo "              then the suite again against the lowest versions pyproject.toml allows"
	@echo "make docs   - build the API reference and guides (HTML in $(DOCS_BUILD)/html)"
	@echo "make bench  - micro-benchmarks and full-size stress scenarios (about 20 minutes;"
	@echo "              writes docs/benchmarks.md)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS),$(DOCS_EXTRAS)]'
	@touch $(STAMP)

# Every runtime dependency in [project].dependencies pinned to its lower bound
# (`>=X`, `==X` or `~=X`); one without a lower bound is an error, since "the lowest
# version allowed" would then mean nothing. The same for every requirement of the
# extras the suite installs ($(EXTRAS), given as the argument): those are the
# libraries pgwarden integrates with (SQLAlchemy, FastAPI, Django, prometheus-client,
# OpenTelemetry) and the ones its tests drive them with (uvicorn, httpx), and each
# lower bound is a claim the suite must prove. A requirement listed in several
# extras must have the same bound in each (pinned once). The test tools themselves
# (LOWEST_NEWEST_TOOLS: pytest, its plugin, hypothesis, mypy, ruff) stay newest:
# they check pgwarden rather than run under it, and an old pytest would only test
# the tools. Requirements whose environment marker does not apply are left out.
# Constraints files take no extras: psycopg==X pulls psycopg-binary==X through the
# [binary] extra itself, sqlalchemy==X gets greenlet (newest) from [asyncio].
# (pip's own vendored tomli/packaging: this runs before anything is installed.)
define LOWEST_CONSTRAINTS_PY
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name

newest = {canonicalize_name(n) for n in sys.argv[2].split(",")}
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
sources = [("[project].dependencies", dep) for dep in project["dependencies"]]
for extra in sys.argv[1].split(","):
    sources += [(f"[{extra}]", dep) for dep in project["optional-dependencies"][extra]]
pins = {}
for where, dep in sources:
    req = Requirement(dep)
    name = canonicalize_name(req.name)
    if name in newest or (req.marker is not None and not req.marker.evaluate()):
        continue
    low = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    if len(low) != 1:
        sys.exit(f"pyproject.toml {where}: {dep!r} needs exactly one lower bound (>=, == or ~=)")
    seen = pins.setdefault(name, (low[0], where))
    if seen[0] != low[0]:
        sys.exit(f"pyproject.toml: {name} has lower bound {seen[0]} in {seen[1]} but {low[0]} in {where}")
for name, (version, _) in pins.items():
    print(f"{name}=={version}")
endef
export LOWEST_CONSTRAINTS_PY
# Test tools left at their newest in .venv-lowest (see above).
LOWEST_NEWEST_TOOLS := pytest,pytest-timeout,hypothesis,mypy,ruff

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
	$(LOWEST_BIN)/python -c "$$LOWEST_CONSTRAINTS_PY" '$(EXTRAS)' '$(LOWEST_NEWEST_TOOLS)' > $(LOWEST_CONSTRAINTS)
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
	{ command -v pgpool || test -x /usr/sbin/pgpool; } >/dev/null 2>&1 || need="$$need pgpool2"; \
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

# The API reference (from the docstrings) and the task guides: docs/conf.py, docs/index.rst,
# docs/api/, docs/guides/. Offline (no intersphinx). -W: any warning (a docstring that does
# not parse, a public name missing from the reference) fails; -E: read everything again.
docs: $(STAMP)
	$(BIN)/python -m sphinx -b html -W --keep-going -E -q docs $(DOCS_BUILD)/html
	@echo "API reference: $(DOCS_BUILD)/html/index.html"

docs-check: docs

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

test: $(STAMP) $(LOWEST_STAMP) sysdeps lint types check-sync docs-check
	$(BIN)/python -m pytest
	$(run-lowest-suite)

# The lowest-versions run alone.
test-lowest: $(LOWEST_STAMP) sysdeps
	$(run-lowest-suite)

# Micro-benchmarks rewrite the head of docs/benchmarks.md; every other benchmark
# and the full-size stress tables replace their own section (bench/sections.py) (the reading of who wins where is kept in docs/stress.md).
bench: $(STAMP) sysdeps
	$(BIN)/python bench/micro.py --write docs/benchmarks.md
	$(BIN)/python bench/sqlalchemy_bench.py --write docs/benchmarks.md
	$(BIN)/python bench/deadlines.py --write docs/benchmarks.md
	$(BIN)/python bench/django_bench.py --write docs/benchmarks.md
	@# asyncpg is a peer the bulk benchmark compares with, not a dependency of pgwarden.
	$(BIN)/python -m pip install --quiet 'asyncpg>=0.32'
	$(BIN)/python bench/bulk.py --write docs/benchmarks.md
	$(BIN)/pgwarden stress --size full --out pgwarden-report/bench \
	  --markdown pgwarden-report/bench/stress.md; status=$$?; \
	  $(BIN)/python bench/sections.py docs/benchmarks.md pgwarden-report/bench/stress.md; \
	  exit $$status

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build src/*.egg-info .mypy_cache .ruff_cache .hypothesis
