"""Processes and their commands: peer daemon, coordinator and dashboard, local harness, CLI."""
