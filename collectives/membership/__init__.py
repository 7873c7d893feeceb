"""The peer's side of the coordinator protocol: its client, the answers it holds, the rules it checks."""
