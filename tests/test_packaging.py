"""The wheel (and so the .deb) carries every package of the source tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_python_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("aysfsd", "aysctl") for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


PRIVATE_PROBE = r"""
import json, sys
from aysfsd.fuse import lib as fuselib
fuselib.use_private(sys.argv[1], load=sys.argv[2] == "load")
import pyfuse3
print(json.dumps({"file": pyfuse3.__file__, "first": sys.path[0], **fuselib.describe()}))
"""


def _private(tmp_path: Path, load: str = "load") -> dict[str, object]:
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PRIVATE_PROBE, str(tmp_path / "python"), load],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    return dict(json.loads(r.stdout))


def test_the_private_pyfuse3_is_used_when_it_loads_else_the_next_one(tmp_path: Path) -> None:
    """What /usr/bin/aysfsd does with the package's /usr/lib/aysfs/python (aysfsd.fuse.lib),
    with real imports in a child process: a copy there that loads comes first; a missing one,
    one built for another Python, and one that cannot be loaded give the next pyfuse3 on the
    path, with the reason."""
    import importlib.machinery
    import shutil

    import pyfuse3

    got = _private(tmp_path)  # no directory at all
    assert got["file"] == pyfuse3.__file__ and "no pyfuse3 in" in str(got["fallback"]), got
    installed = Path(pyfuse3.__file__).parent
    if not Path(pyfuse3.__file__).name.startswith("__init__."):  # Debian 12's 3.2: one module file
        pytest.skip(f"pyfuse3 {pyfuse3.__version__} is not a package directory to copy: {pyfuse3.__file__}")

    shutil.copytree(installed, tmp_path / "python" / "pyfuse3")  # a copy that loads
    got = _private(tmp_path)
    assert str(got["file"]).startswith(str(tmp_path / "python" / "pyfuse3")), got
    assert got["fallback"] == "" and got["first"] == str(tmp_path / "python")

    ext = next(p for p in (tmp_path / "python" / "pyfuse3").iterdir() if p.name.startswith("__init__.")
               and p.name.endswith(".so"))
    ext.write_bytes(b"not an ELF file")  # the copy cannot be loaded
    got = _private(tmp_path)
    assert got["file"] == pyfuse3.__file__ and "cannot be loaded" in str(got["fallback"]), got
    assert got["first"] != str(tmp_path / "python")

    ext.rename(ext.with_name("__init__.cpython-399-x86_64-linux-gnu.so"))  # built for another Python
    assert not any(ext.with_name("__init__" + s).exists() for s in importlib.machinery.EXTENSION_SUFFIXES)
    for load in ("load", "noload"):
        got = _private(tmp_path, load)
        assert got["file"] == pyfuse3.__file__ and "built for another Python" in str(got["fallback"]), got
