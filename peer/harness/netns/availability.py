"""Whether --netns can work here: root, iproute2, and namespaces, veth, bridges and tbf in this kernel."""

from __future__ import annotations

import logging
import os
import secrets
import shutil

from collectives.errors import LoconetError
from peer.harness.netns.commands import NetnsError, netns_exists, run

log = logging.getLogger(__name__)


class NetnsUnavailable(LoconetError, RuntimeError):
    """Network namespaces cannot be used here (not root, no iproute2, no kernel support)."""


_WITHOUT = (
    "Run without --netns instead: every process then listens on 127.0.0.1 and --bandwidth is enforced by "
    "the transport's own token buckets (link cuts need --netns)."
)


def check_available() -> None:
    """Raise NetnsUnavailable, saying what is missing, unless namespaces, veth, bridges and tbf all work here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            f"--netns needs root (uid 0; you are uid {os.geteuid()}): creating network namespaces, veth links, "
            f"a bridge and tc qdiscs needs CAP_SYS_ADMIN and CAP_NET_ADMIN. Run it as root "
            f"(e.g. `sudo -E` before this command). {_WITHOUT}"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(
                f"`{tool}` is not on PATH: --netns needs iproute2 (`apt-get install -y iproute2`, "
                f"`dnf install iproute iproute-tc`). {_WITHOUT}"
            )
    probe = f"loconet-probe-{os.getpid()}-{secrets.token_hex(2)}"
    steps = [
        (["ip", "netns", "add", probe],
         "network namespaces cannot be created "
         "(a container without CAP_SYS_ADMIN, or a kernel without CONFIG_NET_NS?)"),
        (["ip", "netns", "exec", probe, "true"], "`ip netns exec` does not work (mount namespaces?)"),
        (["ip", "-n", probe, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1"],
         "veth links are not available (kernel module `veth`)"),
        (["ip", "-n", probe, "link", "add", "name", "b0", "type", "bridge"],
         "bridges are not available (kernel module `bridge`)"),
        (["tc", "-n", probe, "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "10mbit", "burst", "12500",
          "limit", "125000"], "the tbf qdisc is not available (kernel module `sch_tbf`)"),
    ]
    try:
        for cmd, meaning in steps:
            try:
                run(cmd)
            except NetnsError as e:
                if "Operation not permitted" in str(e):  # EPERM: a capability is missing, not a kernel feature
                    meaning = "this process lacks CAP_NET_ADMIN (or CAP_SYS_ADMIN), which --netns needs"
                raise NetnsUnavailable(f"{meaning}: {e}. {_WITHOUT}") from None
    finally:
        if netns_exists(probe):
            try:
                run(["ip", "netns", "del", probe])
            except NetnsError as e:
                log.warning("could not delete probe namespace %s: %s", probe, e)
