# make demo   set up (Debian packages + .venv) and run the demo
# make test   set up and run lint, type checks and the test suite (as root: real FUSE mounts)
# make bench  set up and run the benchmarks
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := fuse3 libfuse3-dev pkg-config libsystemd-dev gcc python3-dev python3-venv \
	nginx-light redis-server openssh-server openssh-client util-linux

.PHONY: setup deps demo test lint typecheck unit bench clean

deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) demo/demo.py

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy aysfsd aysctl

unit: setup
	$(VENV)/bin/pytest -q

test: lint typecheck unit

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
