"""A TCP proxy between a test's client and a real server, to make the link fail as links do: a connection reset
before it is taken, or the far process paused (its kernel keeps the connections; nothing answers)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from collectives.net.addresses import split_address


class TcpProxy:
    """Forwards connections at ``address`` to target; resets the first ``resets`` at once, and while paused
    (``pause``) forwards nothing and takes no new connection further than the kernel's accept."""

    def __init__(self, target: str, resets: int = 0) -> None:
        self.target = split_address(target)
        self.resets = resets
        self.reset = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        """From now on, as a paused (SIGSTOPped) server: bytes sent are held, nothing comes back."""
        self._forwarding.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            if self.reset < self.resets:
                self.reset += 1
                # Linger 0: close sends a reset, as a peer's kernel does for a connection it will not take.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            self.sockets.append(conn)
            self._forwarding.wait()
            if self._closed:
                return
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                self._forwarding.wait()
                if self._closed:
                    return
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop forwarding and close every socket (the threads end with them)."""
        self._closed = True
        self._forwarding.set()
        self.listener.close()
        for s in self.sockets:
            s.close()
