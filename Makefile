# The two commands that matter: `make run` (the whole product on embedded defaults) and
# `make test` (everything against the real PostgreSQL and Redis).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/factory_saas
REDIS_URL ?= redis://127.0.0.1:6379/0
# Python keeps the bytecode it compiles (__pycache__, ignored by git) even where the environment
# says not to: otherwise every process of the suite (each xdist worker, pool worker, Celery
# process and job child) compiles every module of the project again, about 7 s of CPU for a
# pytest process alone.
unexport PYTHONDONTWRITEBYTECODE
# pytest-xdist processes for the suite (one per core here); `serial` tests run alone after them.
TEST_WORKERS ?= 2
# The runtime own-code jobs get by default: the worker's own environment (torch 2.13, numpy,
# pyarrow, safetensors), named as jobs ask for it. Operators add others: docs/operations.md.
WORKER_RUNTIMES ?= torch-2.13-py311=$(abspath $(BIN))/python
TEST_ENV := DJANGO_SETTINGS_MODULE=factory_saas.settings.test DATABASE_URL=$(DATABASE_URL) REDIS_URL=$(REDIS_URL)

.PHONY: install run worker test test-fast lint audit screenshots clean

$(STAMP): pyproject.toml sdk/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0; on these machines pip takes the CPU wheel already on disk.
	$(BIN)/python -m pip install --quiet -e ".[worker,dev]"
	$(BIN)/python -m pip install --quiet -e sdk  # the `factory` CLI and client (no Django)
	touch $(STAMP)

install: $(STAMP)

run: install
	export DJANGO_SETTINGS_MODULE=factory_saas.settings.embedded WORKER_RUNTIMES="$(WORKER_RUNTIMES)"; \
	$(BIN)/python manage.py migrate --noinput && \
	$(BIN)/python manage.py seed_demo && \
	$(BIN)/python manage.py seed_samples --org demo-lab && \
	$(BIN)/python manage.py seed_loop --org demo-lab && \
	$(BIN)/python manage.py seed_code --org demo-lab && \
	exec $(BIN)/python manage.py run_embedded

# One GPU machine of the pool (or CPU slots without GPUs), against the configured database/broker.
worker: install
	WORKER_RUNTIMES="$(WORKER_RUNTIMES)" $(BIN)/python manage.py run_worker

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	# High-severity findings only; ruff's S rules already cover the rest of bandit's checks.
	$(BIN)/bandit -q -r factory_saas charts outbox tenants registry jobs billing serving -lll

# Known vulnerabilities in the installed packages (needs PyPI's JSON API; fails without it).
audit: install
	$(BIN)/pip-audit --strict --skip-editable --progress-spinner off

# The browser tests drive Debian's chromium package, launched by its path (never a download).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# Own-code jobs run in a bubblewrap sandbox (jobs/runner/sandbox.py); its tests need Debian's
# bubblewrap package, as a worker that takes own-code jobs does.
BWRAP ?= /usr/bin/bwrap
$(BWRAP):
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap)

test: install $(CHROMIUM) $(BWRAP)
	$(TEST_ENV) $(BIN)/python manage.py check_services
	$(MAKE) lint
	$(TEST_ENV) $(BIN)/python manage.py makemigrations --check --dry-run
	$(TEST_ENV) $(BIN)/python manage.py spectacular --validate --fail-on-warn --file /dev/null
	$(BIN)/python tests/security/pip_audit_gate.py
	$(TEST_ENV) $(BIN)/pytest -n $(TEST_WORKERS) -m "not serial"
	$(TEST_ENV) $(BIN)/pytest -m serial

# The edit-run loop: everything that needs no process of its own (no pool, browser, S3 or Redis
# server, no fuzzing), in parallel. `make test` still runs everything.
test-fast: install
	$(TEST_ENV) $(BIN)/pytest -n $(TEST_WORKERS) -m "not slow and not serial" -q

# Re-take the user guide's screenshots (docs/img/journey/) from the browser journey.
screenshots: install $(CHROMIUM)
	$(TEST_ENV) $(BIN)/python manage.py check_services
	$(TEST_ENV) $(BIN)/pytest tests/e2e -q
	cp test-artifacts/e2e/test_a_new_tenant_goes_from_sign_up_to_an_invoice_and_the_operator_sees_it/*.png docs/img/journey/

clean:
	rm -rf var db.sqlite3 test-artifacts
