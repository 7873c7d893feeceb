"""The peer's side of the coordinator protocol: its client and Session stream, the answers it holds, the rules it
checks (a sample's draw, NoLoCo's pairs)."""
