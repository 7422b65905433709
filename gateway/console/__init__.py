"""The console in the browser: the audit log and the approval queue, live, with approve/deny and pins.

One Starlette app mounted at `/console`: standalone (`mcp-armor console`, a random access token in the
URL it prints) or inside `serve --http` (for principals with `role:approver` or `role:viewer`). It
reads the audit log and the queue read-only and writes only what a person decides there, recorded in
the audit log first.
"""
