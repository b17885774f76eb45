from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import force_unmount_under


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A temp dir for a test that mounts things; every mount below it is removed afterwards."""
    os.chmod(tmp_path, 0o755)
    yield tmp_path
    force_unmount_under(tmp_path)
