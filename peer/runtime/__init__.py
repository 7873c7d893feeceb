"""A training peer's runtime: the ``loconet peer`` daemon, its training loop and its checkpoints."""
