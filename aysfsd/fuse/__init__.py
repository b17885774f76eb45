"""The FUSE operations: one pyfuse3 session, what it keeps per inode, and what runs beside
it (tree loading, bulk and startup read-ahead, prefetch, the hand-over to the next process)."""
