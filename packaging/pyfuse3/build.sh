#!/bin/bash
# Build pyfuse3 3.5.0 from its PyPI sdist with aysfs's patches (PATCHES below, see README.md here).
#   packaging/pyfuse3/build.sh PYTHON [pip install options...]
# e.g. build.sh .venv/bin/python                       (into that venv)
#      build.sh /usr/bin/python3 --target DIR          (a private copy, as the .deb does)
# PYFUSE3_SDIST=path: that sdist instead of pip's download. The sdist is checked against its
# SHA-256; Cython and setuptools come from PyPI (build isolation).
set -euo pipefail
PY=$(command -v "${1:?usage: build.sh PYTHON [pip install options...]}")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
shift
VERSION=3.5.0
PATCHES=${PYFUSE3_PATCHES:-"no-open.patch interrupt.patch readdir.patch loop.patch"}  # applied in this order
# (PYFUSE3_PATCHES: another list, e.g. to A/B one patch; the default is what aysfs ships)
SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SDIST=${PYFUSE3_SDIST:-}
if [ -z "$SDIST" ]; then
	"$PY" -m pip download -q --no-deps --no-binary :all: "pyfuse3==$VERSION" -d "$WORK"
	SDIST="$WORK/pyfuse3-$VERSION.tar.gz"
fi
echo "$SHA256  $SDIST" | sha256sum -c --quiet
tar -xzf "$SDIST" -C "$WORK"
cd "$WORK/pyfuse3-$VERSION"
for p in $PATCHES; do
	patch -p1 -s --no-backup-if-mismatch < "$HERE/$p"
done
rm -f src/pyfuse3/__init__.c  # generated from the unpatched .pyx: Cython makes it again
SETUPTOOLS_SCM_PRETEND_VERSION=$VERSION "$PY" -m pip install -q --no-deps "$@" .
