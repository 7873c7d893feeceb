"""torch.distributed listeners of the benchmarks and worker groups, bound to 127.0.0.1 only.

The benchmarks compare loconet with torch's own collectives (gloo, DDP) on
this machine, and nothing they start may be reachable from the network:

- torch's ``TCPStore`` server listens on every interface, whatever host it is
  given (the host only tells clients where to connect). So the store's socket
  is made here, bound to 127.0.0.1, and handed to torch (``master_listen_fd``).
- gloo's own connections listen on the interface ``GLOO_SOCKET_IFNAME`` names;
  it is set to the loopback interface, overriding a value the user's
  environment may carry for other jobs.
- Process groups are always started from such a store (``store=``), never from
  an ``init_method`` URL or ``MASTER_ADDR``, with which torch would make its own
  store (on every interface).
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"
# Pending connections the store's socket queues (torch's own default).
STORE_BACKLOG = 2048


def use_loopback_for_gloo(interface: str = LOOPBACK_INTERFACE) -> None:
    """Make gloo (in this process and the children it starts) listen and connect on one interface only.

    The loopback interface, except inside a benchmark's own network namespace, whose one veth is private to it.
    """
    os.environ["GLOO_SOCKET_IFNAME"] = interface


def loopback_store(
    world_size: int, timeout: datetime.timedelta, port: int = 0, wait_for_workers: bool = False,
    host: str = LOOPBACK,
) -> Any:
    """A torch ``TCPStore`` server listening on host:port only (port 0: any free port; see ``store.port``).

    host is 127.0.0.1, or a benchmark's address inside a network namespace it made (reachable from nothing else).
    """
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(STORE_BACKLOG)
        store = dist.TCPStore(
            host, sock.getsockname()[1], world_size, is_master=True, timeout=timeout,
            wait_for_workers=wait_for_workers, master_listen_fd=sock.fileno(),
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now (it closes it)
    return store
