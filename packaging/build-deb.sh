#!/usr/bin/env bash
# Build aysfs_VERSION+debN_ARCH.deb into dist/ (`make deb`), as root on Debian 12 or 13.
#
#   packaging/build-deb.sh [--version V] [--no-lint] [--out DIR]
#
# Installs the build dependencies when missing, copies the working tree (tracked or not,
# without .git, .venv, caches and build output) to build/deb-N/aysfs-VERSION/ with
# packaging/debian as its debian/, runs dpkg-buildpackage there (source and binary, unsigned),
# copies the .deb to dist/ (or DIR) and runs lintian, which must report no errors.
# Idempotent: build/deb-N is made anew each time.
#
# The package is built on the Debian release it is for (N = 12 bookworm, 13 trixie: `make
# deb-trixie` runs this script in a Debian 13 tree), and its version gets the suffix +debN:
# a build for one release is never mistaken for the other's (each release's dh_python3 and
# compilers make its own), and a node upgraded from 12 to 13 moves to the 13 build
# (0.1.0+deb13 > 0.1.0+deb12). --version V builds upstream version V instead of
# pyproject.toml's (the version is set in the copy only; `make test-installed` builds the next
# version this way to test upgrades).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's own tools and Python only (not a pyenv, a venv or /usr/local in PATH)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

BUILD_DEPS=(build-essential debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject
            python3-build python3-installer lintian)

# and debian/control's Build-Depends (names only)
mapfile -t -O ${#BUILD_DEPS[@]} BUILD_DEPS < <(sed -n '/^Build-Depends:/,/^[A-Z]/{s/^Build-Depends://;/^[A-Z]/d;p}' \
    packaging/debian/control | tr ',' '\n' | sed 's/[[(<].*//;s/|.*//;s/ //g' | grep -v -e '^$' -e '^debhelper-compat$')
if [[ "${1:-}" == --print-build-deps ]]; then
    printf '%s\n' "${BUILD_DEPS[@]}" | sort -u | tr '\n' ' '
    exit 0
fi

missing=()
for p in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "build-deb: installing Debian packages: ${missing[*]}"
    flock /tmp/aysfs-apt.lock sh -c 'apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"' sh "${missing[@]}"
fi

next_version=""
lint=1
out=dist
while (($#)); do
    case "$1" in
        --version) next_version=$2; shift 2 ;;
        --no-lint) lint=0; shift ;;
        --out) out=$2; shift 2 ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done
# shellcheck disable=SC1091
release=$(. /etc/os-release && echo "${VERSION_ID%%.*}")
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
deb_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [[ "$version" != "$deb_version" ]]; then
    echo "build-deb: pyproject.toml says version $version, packaging/debian/changelog says $deb_version." >&2
    echo "build-deb: add a changelog entry: dch -c packaging/debian/changelog -v $version" >&2
    exit 1
fi

if [[ -n "$next_version" ]]; then
    version=$next_version
fi
top=build/deb-$release
src=$top/aysfs-$version
rm -rf "$top"
mkdir -p "$src" "$out"
tar -c --exclude-vcs --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./debian \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache \
    --exclude=.ruff_cache --exclude=.hypothesis --exclude=./bench/results \
    --exclude='./aysfs_*' -f - . | tar -x -C "$src"
cp -a packaging/debian "$src/debian"
# the unit, where dh_installsystemd installs it for this release (Debian 13: /usr/lib/systemd/system)
cp packaging/systemd/aysfsd.service "$src/debian/aysfs.aysfsd.service"
if [[ -n "$next_version" ]]; then
    sed -i "s/^version = \".*\"/version = \"$next_version\"/" "$src/pyproject.toml"
    sed -i "s/^__version__ = \".*\"/__version__ = \"$next_version\"/" "$src/aysfsd/__init__.py"
fi
# the release's own changelog entry: version V+debN for suite CODENAME
maint=$(sed -n 's/^ -- \(.*>\)  .*/\1/p' packaging/debian/changelog | head -1)
{
    echo "aysfs ($version+deb$release) $codename; urgency=medium"
    echo
    echo "  * Built for Debian $release ($codename)."
    echo
    echo " -- $maint  $(date -R)"
    echo
    cat packaging/debian/changelog
} > "$src/debian/changelog"

(cd "$src" && dpkg-buildpackage --no-sign -us -uc 2>&1) > "$top/build.log" || {
    tail -40 "$top/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed; full log: $top/build.log" >&2
    exit 1
}
deb=$(cd "$top" && ls aysfs_"$version+deb$release"_*.deb)
cp "$top/$deb" "$out/"
echo "build-deb: built $out/$deb"
# the patched pyfuse3 (debian/rules builds it; without it the package falls back to python3-pyfuse3)
if grep -q ' \./usr/lib/aysfs/python/pyfuse3/__init__\..*\.so$' <<<"$(dpkg-deb -c "$out/$deb")"; then
    echo "build-deb: $deb carries the patched pyfuse3 in /usr/lib/aysfs/python"
else
    grep -B5 'WARNING: the patched pyfuse3' "$top/build.log" >&2 || true
    echo "build-deb: WARNING: $deb has no patched pyfuse3: it runs on python3-pyfuse3, without the kernel's" \
        "no_open mode (README.Debian; full log: $top/build.log)" >&2
fi
if ((!lint)); then
    exit 0
fi

# lintian over the source and the binary package: errors fail the build, the rest is shown
changes=$(ls "$top"/aysfs_"$version+deb$release"_*.changes | head -1)
set +e
lintian --fail-on error --info --display-info "$changes" > "$top/lintian.log" 2>&1
rc=$?
set -e
cat "$top/lintian.log"
summary=$(awk '/^[EWIPX]: /{n[$1]++} END{printf "%d errors, %d warnings, %d info, %d pedantic, %d experimental", n["E:"], n["W:"], n["I:"], n["P:"], n["X:"]}' "$top/lintian.log")
echo "build-deb: lintian: $summary"
if ((rc != 0)); then
    echo "build-deb: lintian reported errors" >&2
    exit 1
fi
