from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import force_unmount_under
from tests.servers import ForwardProxy


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A temp dir for a test that mounts things; every mount below it is removed afterwards."""
    os.chmod(tmp_path, 0o755)
    yield tmp_path
    force_unmount_under(tmp_path)


@pytest.fixture
def stor_proxy() -> Iterator[ForwardProxy]:
    """A real HTTP proxy to put in front of a stor (`proxy = ...`), counting the requests."""
    p = ForwardProxy()
    t = threading.Thread(target=p.serve_forever, daemon=True)
    t.start()
    yield p
    p.shutdown()
    p.server_close()
