"""Upstream servers: the supervised pool, stdio and HTTP links, processes, one-off connections."""
