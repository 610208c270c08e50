# django-openworkflow: `make demo` and `make test` set up everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The Django 6.x lane (noxfile.py): the newest Django 6 on Python 3.13 (pyenv's 3.13, or
# PYTHON_DJANGO6=...), which nox is given whether or not it is on PATH.
PYENV_ROOT ?= $(or $(shell pyenv root 2>/dev/null),$(HOME)/.pyenv)
PYTHON_DJANGO6 ?= $(or $(lastword $(sort $(wildcard $(PYENV_ROOT)/versions/3.13*/bin/python))),$(shell command -v python3.13))
NOX_DJANGO6 = PYTHON_DJANGO6="$(PYTHON_DJANGO6)" $(VENV)/bin/nox --error-on-missing-interpreters -s "tests(django6)"
PG_URL ?= postgres://postgres@127.0.0.1:5432/test
MYSQL_URL ?= mysql://root@127.0.0.1:3306/test
PGBOUNCER_URL ?= postgres://postgres@127.0.0.1:6432/test
DEMO_ADDR ?= 127.0.0.1:8000
BENCH_URL ?= postgres://postgres@127.0.0.1:5432/openworkflow_bench
BENCH_ARGS ?=
BENCH_QUEUES_ARGS ?=
CHAOS_URL ?= postgres://postgres@127.0.0.1:5432/openworkflow_chaos
CHAOS_ARGS ?=
SOAK_URL ?= postgres://postgres@127.0.0.1:5432/openworkflow_soak
SOAK_ARGS ?=
PG_CTL ?= pg_ctlcluster --skip-systemctl-redirect $(shell ls /etc/postgresql 2>/dev/null | tail -n 1) main


.PHONY: test-setup test-lane-postgres test-lane-others
.PHONY: pgbouncer-up test-pgbouncer soak soak-short soak-db
.PHONY: install demo test test-sqlite test-postgres test-mariadb test-django6 test-django6-postgres lint format pg-up mariadb-up mysql-driver browser bench bench-db bench-queues bench-compare bench-ab chaos chaos-short chaos-db clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# nox's virtualenv of the Django 6.x lane, (re)installed when pyproject.toml or noxfile.py change.
.nox/.django6-installed: $(VENV)/.installed noxfile.py
	@test -n "$(PYTHON_DJANGO6)" || { echo "The Django 6.x lane needs Python 3.13 (pyenv install 3.13, or PYTHON_DJANGO6=/path/to/python3.13)" >&2; exit 1; }
	$(NOX_DJANGO6) --install-only
	touch $@

# Start the local PostgreSQL cluster when it is down, then wait until it accepts connections.
pg-up:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | tail -n 1) main start
	@for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && exit 0; sleep 1; done; \
		echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2; exit 1

# Start the local MariaDB when it is down (only then), then wait until it answers.
mariadb-up:
	@mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -u root --connect-timeout=2 ping >/dev/null 2>&1 \
		|| service mariadb start >/dev/null 2>&1 || (mysqld_safe >/dev/null 2>&1 &)
	@for i in $$(seq 1 30); do \
		mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -u root --connect-timeout=2 ping >/dev/null 2>&1 && exit 0; \
		sleep 1; done; echo "MariaDB did not come up on 127.0.0.1:3306" >&2; exit 1

# mysqlclient (Django's MySQL driver, the extra [mysql]) compiles against the client
# headers: Debian's default-libmysqlclient-dev and pkg-config, installed when missing.
mysql-driver: install
	@$(PY) -c "import MySQLdb" 2>/dev/null || { \
		pkg-config --exists mysqlclient 2>/dev/null || { \
			echo "Installing Debian's default-libmysqlclient-dev and pkg-config for mysqlclient"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				default-libmysqlclient-dev pkg-config >/dev/null; }; \
		$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,mysql]'; }

# The browser tests drive Debian's Chromium (never a browser download of its own).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium package for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	} || echo "warning: could not install chromium; the browser tests will be skipped (they fail under CI=true)" >&2

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy django_openworkflow
	DJANGO_SETTINGS_MODULE=tests.settings $(PY) -m django makemigrations --check --dry-run
	DJANGO_SETTINGS_MODULE=demo_project.settings $(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir site

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-sqlite: install browser
	$(PY) -m pytest

test-postgres: install browser pg-up
	DATABASE_URL=$(PG_URL) OPENWORKFLOW_TEST_PG_CTL="$(PG_CTL)" $(PY) -m pytest

# The Django 6.x lane through nox (its virtualenv reused: -R), on SQLite, with Django's
# deprecation warnings as errors.
test-django6: .nox/.django6-installed
	env -u DATABASE_URL $(NOX_DJANGO6) -R -- -q

# Django 6's own django.tasks and the async API on PostgreSQL too (SPEC section 14); the
# Django 5.2 lane runs them there with the django-tasks backport (test-postgres).
test-django6-postgres: .nox/.django6-installed pg-up
	DATABASE_URL=$(PG_URL) OPENWORKFLOW_PG_TEST_NAME=test_django6 $(NOX_DJANGO6) -R -- -q \
		$(DJANGO6_POSTGRES_TESTS)
DJANGO6_POSTGRES_TESTS = tests/test_tasks.py tests/test_review_tasks.py tests/test_async.py \
	tests/test_async_steps.py tests/test_review_async.py
# PgBouncer in transaction mode on 127.0.0.1:6432 in front of the local PostgreSQL (Debian's
# package, installed when missing); idempotent. scripts/pgbouncer.py stop ends it.
pgbouncer-up: install pg-up
	$(PY) scripts/pgbouncer.py up

# The engine through PgBouncer: the default database behind the pooler, LISTEN on a direct
# alias (tests/settings_pgbouncer.py): start(), workers, resume, signals, children, fencing.
test-pgbouncer: install pg-up pgbouncer-up
	DATABASE_URL=$(PG_URL) OPENWORKFLOW_PGBOUNCER_URL=$(PGBOUNCER_URL) \
		OPENWORKFLOW_PG_TEST_NAME=test_pgbouncer $(PY) -m pytest --ds tests.settings_pgbouncer \
		$(PGBOUNCER_TESTS)
PGBOUNCER_TESTS = tests/test_pgbouncer.py tests/test_children.py tests/test_signaling.py \
	tests/test_resume.py tests/test_fencing.py tests/test_worker.py

test-mariadb: install browser mysql-driver mariadb-up
	DATABASE_URL=$(MYSQL_URL) $(PY) -m pytest

# Everything: lint, the suite on SQLite, PostgreSQL and MariaDB (Django 5.2), on SQLite with
# the newest Django 6, and the short chaos run. Set up first, then two lanes side by side
# (the machine has 2 cores): PostgreSQL's lane restarts the server (the outage test, the
# chaos run), so everything on PostgreSQL runs in one lane, one step after another.
test: test-setup
	@$(MAKE) --no-print-directory -j2 --output-sync=line test-lane-postgres test-lane-others

test-setup: install browser pg-up pgbouncer-up mariadb-up mysql-driver chaos-db soak-db \
	.nox/.django6-installed

test-lane-postgres:
	@$(MAKE) --no-print-directory test-postgres
	@$(MAKE) --no-print-directory test-pgbouncer
	@$(MAKE) --no-print-directory chaos-short
	@$(MAKE) --no-print-directory soak-short
	@$(MAKE) --no-print-directory test-django6
	@$(MAKE) --no-print-directory test-django6-postgres

test-lane-others:
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory test-sqlite
	@$(MAKE) --no-print-directory test-mariadb

# The demo: SQLite file, example runs (one fails on a declined card), a worker and the pages.
# Both restart when a Python file changes; the trap's SIGTERM stops the worker's reloader,
# which stops its worker process and waits for it.
demo: install
	$(PY) manage.py migrate --verbosity 0
	$(PY) manage.py demo_seed
	@$(PY) manage.py check_inflight_runs || echo "warning: the code no longer replays the runs above (docs/deploying.md)" >&2
	@echo "Open http://$(DEMO_ADDR)/ (user admin, password admin). Ctrl-C stops the worker and the server."
	@trap 'kill $$worker 2>/dev/null; wait $$worker' EXIT INT TERM; \
		$(PY) manage.py runworker --reload --verbosity 1 & worker=$$!; \
		$(PY) manage.py runserver $(DEMO_ADDR)

# Benchmarks (PostgreSQL): ours alone, or ours beside the peers of ../shared/bench-peers.
# A database of their own for the benchmark and the chaos test, created and migrated on demand.
bench-db chaos-db soak-db: install pg-up
	@db=openworkflow_$(@:-db=); \
		psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$$db'" | grep -q 1 \
		|| createdb -h 127.0.0.1 -U postgres $$db; \
		DATABASE_URL=$(if $(filter bench-db,$@),$(BENCH_URL),$(if $(filter soak-db,$@),$(SOAK_URL),$(CHAOS_URL))) \
		$(PY) manage.py migrate --verbosity 0

bench: bench-db
	DEBUG=false DATABASE_URL=$(BENCH_URL) $(PY) manage.py bench_workflows $(BENCH_ARGS)

# Queue limits (SPEC section 9), each against the unlimited enqueue_first of the same
# invocation, C = 10 and 50: concurrency = C (>= 85 % of it), key_concurrency 1 over 100 keys
# (>= 70 %), rate_limit 100/s (first starts within 5 % of it). A verdict per line on stderr.
bench-queues: bench-db
	DEBUG=false DATABASE_URL=$(BENCH_URL) $(PY) manage.py bench_workflows --skip-latency \
		--concurrency 10,50 --runs 1000 --variants queue_concurrency,key_concurrency,rate_limit \
		$(BENCH_QUEUES_ARGS)

bench-compare: bench-db
	DEBUG=false BENCH_URL=$(BENCH_URL) $(PY) scripts/bench_compare.py

# A/B of this working tree against BASE (a git ref), interleaved in one sitting.
BASE ?= HEAD
bench-ab: install pg-up
	$(PY) scripts/bench_ab.py $(BASE) $(BENCH_AB_ARGS)

# Chaos (PostgreSQL): kill workers every ~0.5 s, restart PostgreSQL once and cut workers off
# behind their proxies (--partitions, 3 by default), then count lost runs and doubled
# step.atomic writes (both must be 0). `make test` runs a short one, with one partition.
chaos: chaos-db
	DEBUG=false DATABASE_URL=$(CHAOS_URL) $(PY) manage.py chaos_workflows \
		$(if $(strip $(PG_CTL)),--restart-db-command "$(PG_CTL) restart") $(CHAOS_ARGS)

chaos-short: chaos-db
	DEBUG=false DATABASE_URL=$(CHAOS_URL) $(PY) manage.py chaos_workflows \
		--runs 300 --pause-ms 10 --duration 20 --partitions 1 $(if $(strip $(PG_CTL)),--restart-db-command "$(PG_CTL) restart") $(CHAOS_ARGS)

# Soak (PostgreSQL): 200,000 runs of sleeps, retries, children, signals and deadlines through
# two workers over about an hour; fails on growth of RSS, threads, open files or connections.
# `make test` runs a 2,000-run one.
soak: soak-db
	DEBUG=false DATABASE_URL=$(SOAK_URL) $(PY) manage.py soak_workflows $(SOAK_ARGS)

soak-short: soak-db
	DEBUG=false DATABASE_URL=$(SOAK_URL) $(PY) manage.py soak_workflows --runs 2000 --duration 60 $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .nox .pytest_cache .ruff_cache .mypy_cache demo_project/db.sqlite3 bench-results test-artifacts
