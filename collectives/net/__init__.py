"""The gRPC endpoint of a peer: servers and channels, framing, admission of calls, credentials, pacing."""
