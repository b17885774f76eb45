"""The FUSE operations: one pyfuse3 session (`ops`), what it keeps per inode (`nodes`), the
catalog of directory objects (`catalog`) and the reader of file content (`content`) it asks,
and what runs beside it (tree packs, bulk and startup read-ahead, prefetch, the hand-over to
the next process)."""
