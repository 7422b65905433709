"""The audit log: the recorder (group commit), the journal ahead of it, the SQLite store."""
