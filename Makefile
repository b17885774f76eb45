# make demo   set up (Debian packages + .venv) and run the demo
# make test   set up and run lint, type checks and the test suite (as root: real FUSE mounts)
# make bench  set up and run the benchmarks
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := fuse3 libfuse3-dev pkg-config libsystemd-dev gcc python3-dev python3-venv \
	nginx-light redis-server openssh-server openssh-client util-linux python3-pyfuse3

.PHONY: setup deps demo test lint typecheck unit bench bench-deps clean

deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml $(wildcard packaging/pyfuse3/*.patch) packaging/pyfuse3/build.sh
	@$(MAKE) --no-print-directory deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# pyfuse3 with aysfs's patches (kernel no_open mode, interrupts: packaging/pyfuse3/README.md); PyPI's if it fails
	bash packaging/pyfuse3/build.sh $(PY) || { echo; \
		echo "WARNING: building the patched pyfuse3 failed: .venv runs PyPI's pyfuse3 (every open and"; \
		echo "WARNING: every directory listing stays a FUSE request; aysfsd logs which mode it runs in)"; echo; }
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) demo/demo.py

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy aysfsd aysctl tests
	$(VENV)/bin/mypy --explicit-package-bases bench

unit: setup
	$(VENV)/bin/pytest -q

test: lint typecheck unit

# peers for the benchmarks (a peer that cannot be installed is reported as n/a, not an error)
BENCH_APT := squashfuse squashfs-tools rclone httpdirfs nginx-light

bench-deps: setup
	@missing=$$(for p in $(BENCH_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for the benchmarks:" $$missing; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
			|| echo "warning: could not install $$missing (those peers will be n/a)"; \
	fi
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q matplotlib \
		|| echo "warning: no matplotlib (no chart)"

bench: bench-deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

# make deb             build dist/aysfs_VERSION+deb12_ARCH.deb with debhelper on this machine (Debian 12; as root:
#                      installs the build tools it lacks) and lint it: packaging/build-deb.sh
# make deb-trixie      the same for Debian 13 (dist/aysfs_VERSION+deb13_ARCH.deb), built in a Debian 13 tree
# make apt-repo        dist/apt: a signed apt repository of both (packaging/apt-repo.sh)
# make test-installed  install the package through that repository on this machine and in Debian 12 and 13
#                      system containers (a real systemd booted with systemd-nspawn), test the installed
#                      system, upgrade it to the next version through the repository, purge it:
#                      packaging/test_installed.py, with Debian's /usr/bin/python3
# Debian trees (debootstrap + packages) are cached in /var/cache/aysfs-ci: packaging/debian_tree.py
DEB_VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
DEB_NEXT_VERSION = $(DEB_VERSION).post1
HOST_DEB_RELEASE := $(shell . /etc/os-release && echo $${VERSION_ID%%.*})
TREE := /usr/bin/python3 packaging/debian_tree.py
# build-deb.sh in a Debian 13 tree, on this checkout (bound at /src). Its pip (the patched pyfuse3's
# sdist and build tools come from PyPI) trusts the CA certificates this host trusts (e.g. a proxy's):
# the host's bundle, bound read-only
HOST_CA := $(firstword $(PIP_CERT) $(wildcard /etc/ssl/certs/ca-certificates.crt))
IN_TRIXIE = $(TREE) run trixie make $$(bash packaging/build-deb.sh --print-build-deps) --bind $(CURDIR):/src \
	$(if $(HOST_CA),--bind-ro $(HOST_CA):/etc/ssl/aysfs-host-ca.crt --setenv PIP_CERT=/etc/ssl/aysfs-host-ca.crt) --

.PHONY: deb deb-trixie apt-repo apt-repo-next test-installed test-debian test-debian13

deb:
	bash packaging/build-deb.sh

deb-trixie:
	$(IN_TRIXIE) bash /src/packaging/build-deb.sh

apt-repo: deb deb-trixie
	bash packaging/apt-repo.sh dist/apt dist/aysfs_$(DEB_VERSION)+deb12_*.deb dist/aysfs_$(DEB_VERSION)+deb13_*.deb

# the next version (for the upgrade test): both releases' builds in build/apt-next beside this one's
apt-repo-next: apt-repo
	rm -rf build/next
	bash packaging/build-deb.sh --version $(DEB_NEXT_VERSION) --no-lint --out build/next
	$(IN_TRIXIE) bash /src/packaging/build-deb.sh --version $(DEB_NEXT_VERSION) --no-lint --out build/next
	bash packaging/apt-repo.sh build/apt-next dist/apt/pool/main/*/*.deb build/next/*.deb

test-installed: apt-repo-next
	/usr/bin/python3 packaging/test_installed.py --repo dist/apt --next-repo build/apt-next \
		dist/aysfs_$(DEB_VERSION)+deb$(HOST_DEB_RELEASE)_*.deb

# make test-debian    the test suite on Debian 12's own python3-* libraries (older pyfuse3, trio, httpx,
#                     redis, paramiko than PyPI's), in a venv that sees only Debian's packages
# make test-debian13  the same on Debian 13's (Python 3.13, newer libraries), in a Debian 13 tree with
#                     /dev/fuse (systemd-nspawn), on a copy of this checkout
DEBIAN_PY_PKGS := python3-pyfuse3 python3-trio python3-lmdb python3-httpx python3-paramiko python3-redis \
	python3-systemd python3-rich python3-cryptography python3-prometheus-client python3-pytest python3-pytest-timeout \
	python3-hypothesis python3-venv python3-setuptools
test-debian: deps
	@missing=$$(for p in $(DEBIAN_PY_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	rm -rf .venv-debian
	/usr/bin/python3 -m venv --system-site-packages .venv-debian
	cp packaging/debian/vendor/inotify_simple.py.vendored \
		$$(.venv-debian/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/inotify_simple.py
	.venv-debian/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .
	.venv-debian/bin/python -c 'import sys, pyfuse3, trio, httpx, redis, paramiko; print("Debian libraries:", \
		"python", sys.version.split()[0], "pyfuse3", pyfuse3.__version__, "trio", trio.__version__, \
		"httpx", httpx.__version__, "redis", redis.__version__, "paramiko", paramiko.__version__)'
	.venv-debian/bin/python -m pytest -q -p no:cacheprovider

test-debian13:
	$(TREE) run trixie make $(APT_PKGS) $(DEBIAN_PY_PKGS) --bind-ro $(CURDIR):/src -- sh -c '\
		mkdir -m 0755 /srv/aysfs && cd /src && tar -c --exclude-vcs --exclude=./.venv --exclude=./.venv-debian \
			--exclude=./build --exclude=./dist --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
			--exclude=.pytest_cache --exclude=.hypothesis -f - . | tar -x -C /srv/aysfs && \
		cd /srv/aysfs && make test-debian'
