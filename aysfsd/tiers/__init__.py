"""The tiered fetch: local cache, then grid caches in order, then stors in order, each blob verified.

One fetch per blob is in flight at a time (single-flight): concurrent readers of a
missing blob wait for the same download. A blob that fails its hash check is an error
of that source (logged, next source tried), never data for a reader.

Modules, one idea each:
- `fetcher`: the Fetcher: single-flight, read-ahead, the whole fetch bounded by `fetch_timeout`;
- `sources`: a grid cache or stor with its health; the search through them with failover;
- `packs`: a directory's small files fetched as one pack blob, each member verified alone;
- `keep`: what is fetched goes to the local cache (a background write queue) and back to
  the grid caches that missed it;
- `memory`, `flight`, `counters`, `verify`: the in-memory LRU, the in-flight record and the
  error a failed fetch raises, the counters `aysctl status` shows, SHA-256 off the loop.
"""

from .fetcher import Fetcher
from .flight import FetchError
from .sources import Source

__all__ = ["FetchError", "Fetcher", "Source"]
