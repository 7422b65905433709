"""Putting the gateway in front of what a user runs: agent clients' files, import, starter files."""
