"""The coordinator of a run: its gRPC service and server, the protocol's rules and quorum policies (``policies/``),
its soft state, state file and dashboard."""
