"""Debug mode: edited files kept in Redis, shown over the published tree."""
