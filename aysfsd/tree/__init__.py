"""The tree format: directory objects, tree packs, refs and their signatures, startup
profiles, and publish, which writes them."""
