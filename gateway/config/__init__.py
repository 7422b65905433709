"""upstreams.toml: the file as written, its typed models, in-place edits, and what a child inherits."""
