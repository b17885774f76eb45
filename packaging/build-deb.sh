#!/usr/bin/env bash
# Build aysfs_VERSION_all.deb into dist/ (`make deb`), as root on Debian 12.
#
# Installs the build dependencies when missing, copies the working tree (tracked or not,
# without .git, .venv, caches and build output) to build/deb/aysfs-VERSION/ with
# packaging/debian as its debian/, runs dpkg-buildpackage there (source and binary, unsigned),
# copies the .deb to dist/ and runs lintian, which must report no errors.
# Idempotent: build/deb is made anew each time.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's own tools and Python only (not a pyenv, a venv or /usr/local in PATH)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

BUILD_DEPS=(debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject
            python3-build python3-installer lintian)

missing=()
for p in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "build-deb: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
deb_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [[ "$version" != "$deb_version" ]]; then
    echo "build-deb: pyproject.toml says version $version, packaging/debian/changelog says $deb_version." >&2
    echo "build-deb: add a changelog entry: dch -c packaging/debian/changelog -v $version" >&2
    exit 1
fi

top=build/deb
src=$top/aysfs-$version
rm -rf "$top"
mkdir -p "$src" dist
tar -c --exclude-vcs --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./debian \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache \
    --exclude=.ruff_cache --exclude=.hypothesis --exclude=./bench/results \
    --exclude='./aysfs_*' -f - . | tar -x -C "$src"
cp -a packaging/debian "$src/debian"

(cd "$src" && dpkg-buildpackage --no-sign -us -uc 2>&1) > "$top/build.log" || {
    tail -40 "$top/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed; full log: $top/build.log" >&2
    exit 1
}
deb=aysfs_${version}_all.deb
cp "$top/$deb" dist/
echo "build-deb: built dist/$deb"

# lintian over the source and the binary package: errors fail the build, the rest is shown
changes=$(ls "$top"/aysfs_"${version}"_*.changes | head -1)
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
