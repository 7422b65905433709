"""The gateway as a downstream sees it: catalogue, calls through the pipeline, approvals, reloads."""
