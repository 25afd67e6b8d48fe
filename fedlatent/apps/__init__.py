"""Applications over the library: the run drivers the CLI commands wrap (:mod:`.distill`)."""
