from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.slowlink import SlowLink
from tests.harness import LINK_DELAY_MS, force_unmount_under
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


@pytest.fixture
def stor_link(stor_proxy: ForwardProxy, tmp_path: Path) -> Iterator[SlowLink]:
    """`stor_proxy` behind a simulated network link (bench/slowlink.py: 10 ms each way, one
    round trip per new connection, 1 Gbit): a daemon given `proxy = stor_link.url` reaches its
    stor as across a network, and `stor_proxy` still counts (and sees the concurrency of) what
    it asks."""
    with SlowLink(stor_proxy.server_address[1], tmp_path / "link", delay_ms=LINK_DELAY_MS) as link:
        yield link
