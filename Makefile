# Two commands on a fresh machine: `make run` serves the service, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
export HOST PORT

.PHONY: run test lint bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "Rendezvous needs Python 3.11 or newer; try: make $(MAKECMDGOALS) PYTHON=python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py ensure_local_admin
	RENDEZVOUS_SECURITY_MODE=$${RENDEZVOUS_SECURITY_MODE:-open} $(PY) manage.py serve

test: $(VENV)/.installed lint
	sh tools/install_system_packages.sh
	$(PY) tools/run_tests.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(VENV)/.installed
	PY=$(PY) bash bench/run_matrix.sh

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
