"""The policy: the sans-IO engine, policy files, lint, and secret masking."""
