"""The peer's side of the coordinator protocol: its client and Session stream, the answers it holds, the rules it
derives or checks itself (a ``sample`` round's draw)."""
