"""``loconet harness --progress``: a live status table of the peers on stderr (rich)."""

from __future__ import annotations

from collections.abc import Mapping

from peer.harness.processes import Proc


class Display:
    """A live status line on stderr (rich), when asked for."""

    def __init__(self, enabled: bool) -> None:
        self._live = None
        if enabled:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, peers: Mapping[str, Proc], rounds: int, elapsed: float) -> None:
        """Redraw the status table."""
        if self._live is None:
            return
        from rich.table import Table

        table = Table(title=f"loconet harness - {elapsed:5.1f} s - {rounds} rounds committed", expand=False)
        for col in ("peer", "state", "step", "loss", "last round"):
            table.add_column(col)
        for name, p in peers.items():
            steps = [e for e in p.events if e["event"] == "committed"]
            last = steps[-1] if steps else {}
            done = any(e["event"] == "finished" for e in p.events)
            state = "finished" if done else ("running" if p.alive else "dead")
            loss = last.get("loss")
            table.add_row(
                name, state, str(last.get("step", 0)), f"{loss:.3f}" if loss else "-", str(last.get("round", "-"))
            )
        self._live.update(table)

    def close(self) -> None:
        """Stop drawing."""
        if self._live is not None:
            self._live.stop()
