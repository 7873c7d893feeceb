"""A whole network on this machine: child processes, fault scenarios, network namespaces, worker groups."""
