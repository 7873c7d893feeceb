"""Peers that share a host: who they are, their grouping and shared memory, and the hierarchical round."""
