"""Addresses: parsing ``host:port`` values, and what a server tells others to connect to.

Addresses: a process binds ``host`` (``--host``, an interface) and tells
others ``advertise`` (``--advertise HOST[:PORT]``, default: the bound
address). A peer knows one address every member of its run reaches, its
coordinator's, and uses it so that what it tells others is usable, or says
so at start:

- bound to every interface (0.0.0.0, ::) without ``--advertise``, it
  advertises its own address on the route to the coordinator
  (``route_address``: a UDP socket ``connect`` picks the interface, no packet
  is sent), which is the address the coordinator sees it at
  (``advertised_address``);
- bound to loopback (the safe default) while the coordinator is on another
  machine, it refuses to start (``check_reachable`` raises ``ConfigError``):
  peers there could never connect to 127.0.0.1, and would retry forever.

Without a coordinator to go by (a bare transport), binding every interface
without ``--advertise`` logs a warning and the bound address is what others
get: the user may route it some way we cannot see.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket

from collectives.errors import ConfigError

log = logging.getLogger(__name__)

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
# A bare --coordinator port means a coordinator on this machine (where it listens by default).
LOCAL_HOST = "127.0.0.1"
# The port a coordinator serves on unless told otherwise (``loconet coordinator --port``), and so the one a peer
# looks for it at by default (``loconet peer --coordinator``).
COORDINATOR_PORT = 7070
# The highest TCP port.
MAX_PORT = 65535

# A DNS name or an IPv4 address: letters, digits, dots, hyphens, underscores.
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?")
# Digits and dots only: meant as an IPv4 address, so it must be one (not 10.0.0.256).
_DOTTED = re.compile(r"[0-9.]+")


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def format_address(host: str, port: int) -> str:
    """host:port, with IPv6 hosts bracketed."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a host:port address (IPv6 hosts bracketed); ValueError if it has no port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _split_host_port(value: str, flag: str, usage: str) -> tuple[str, str | None]:
    """(host, port text or None) of HOST[:PORT] with IPv6 hosts bracketed; ConfigError naming flag otherwise."""
    text = value.strip()
    if "://" in text:
        raise ConfigError(f"{flag} {value!r}: give a host and port, not a URL; {usage}")
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"{flag} {value!r}: unclosed '['; {usage}")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise ConfigError(f"{flag} {value!r}: {inside!r} is not an IPv6 address; {usage}") from None
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{flag} {value!r}: unexpected {rest!r} after ']'; {usage}")
        return inside, (rest[1:] if rest else None)
    if text.count(":") > 1:
        raise ConfigError(f"{flag} {value!r}: too many ':' (bracket an IPv6 host); {usage}")
    host, sep, port_text = text.partition(":")
    if not _HOSTNAME.fullmatch(host) or (_DOTTED.fullmatch(host) and not _is_ipv4(host)):
        raise ConfigError(f"{flag} {value!r}: {host!r} is not a host name or address; {usage}")
    return host, (port_text if sep else None)


def _port(value: str, flag: str, port_text: str, usage: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= MAX_PORT:
        raise ConfigError(f"{flag} {value!r}: the port must be a number in 1..{MAX_PORT}, got {port_text!r}; {usage}")
    return int(port_text)


def parse_advertise(value: str) -> tuple[str, int | None]:
    """(host, port or None) of an ``--advertise HOST[:PORT]`` value; ConfigError saying what is wrong."""
    usage = "expected HOST or HOST:PORT, with IPv6 hosts bracketed ([::1] or [::1]:7070)"
    host, port_text = _split_host_port(value, "--advertise", usage)
    if host in WILDCARD_HOSTS:
        raise ConfigError(
            f"--advertise {value!r}: nobody can connect to {host}; "
            "give this machine's address or name as others reach it"
        )
    return host, (None if port_text is None else _port(value, "--advertise", port_text, usage))


def coordinator_address(value: str) -> str:
    """The host:port a ``--coordinator`` value names (a bare port: this machine); ConfigError saying what is wrong."""
    usage = "give HOST:PORT (e.g. 127.0.0.1:7070, [::1]:7070), or a port alone for a coordinator on this machine"
    if re.fullmatch(r"\s*[0-9]+\s*", value):
        return format_address(LOCAL_HOST, _port(value, "--coordinator", value.strip(), usage))
    host, port_text = _split_host_port(value, "--coordinator", usage)
    if port_text is None:
        raise ConfigError(f"--coordinator {value!r}: no port; {usage}")
    return format_address(host, _port(value, "--coordinator", port_text, usage))


def _resolve(host: str, family: int = socket.AF_UNSPEC) -> list[tuple[int, str]]:
    """(family, address) of every address host resolves to; OSError (socket.gaierror) if none."""
    infos = socket.getaddrinfo(host.strip("[]"), None, family, socket.SOCK_DGRAM)
    return [(fam, str(sockaddr[0])) for fam, _, _, _, sockaddr in infos]


def _loopback_ip(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def is_loopback(host: str) -> bool:
    """Whether host is a loopback address (127.0.0.0/8, ::1) or a name that resolves to loopback addresses only."""
    try:
        return _loopback_ip(host.strip("[]"))
    except ValueError:
        pass
    try:
        addresses = _resolve(host)
    except OSError:
        return False
    return bool(addresses) and all(_loopback_ip(address) for _, address in addresses)


def is_this_machine(host: str) -> bool:
    """Whether host names this machine: a loopback address, or an address of one of its interfaces.

    An address is this machine's when a UDP socket can bind it (else EADDRNOTAVAIL).
    Raises OSError when host does not resolve.
    """
    for family, address in _resolve(host):
        if _loopback_ip(address):
            return True
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
            except OSError:
                continue
            return True
    return False


def route_address(host: str, family: int = socket.AF_UNSPEC) -> str:
    """This machine's address on its route to host: the source address the kernel picks to reach it.

    A UDP socket's ``connect`` chooses the route and the source address without
    sending a packet. For a host on this machine, that is the host's own address.
    Raises OSError when host does not resolve or no route leads there.
    """
    error: OSError = OSError(errno.EHOSTUNREACH, f"no route to {host}")
    for fam, address in _resolve(host, family):
        with socket.socket(fam, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((address, 9))  # any port: nothing is sent
            except OSError as exc:
                error = exc
                continue
            return str(probe.getsockname()[0])
    raise error


def check_reachable(host: str, advertise: str | None, coordinator: str) -> None:
    """Refuse (ConfigError) a server that would tell its run a loopback address while the coordinator is elsewhere.

    host: what the server binds; advertise: what it tells others (None: host);
    coordinator: HOST:PORT every member of the run reaches. Peers on the
    coordinator's machine could never connect to this one's 127.0.0.1: they
    would retry "connection refused" forever. Binding loopback while
    advertising another address (a port forwarded to it) only warns.
    """
    try:
        coordinator_host, _ = split_address(coordinator)
        remote = not is_this_machine(coordinator_host)
    except (ValueError, OSError):  # malformed or unresolvable: joining says so, with its own retries
        return
    if not remote:
        return
    told = parse_advertise(advertise)[0] if advertise is not None else host
    if not is_loopback(told):
        if is_loopback(host):
            log.warning(
                "this peer listens on %s only but tells others %s: peers on other machines reach it only "
                "through a port forwarded to it; listen on an interface they reach (host=\"0.0.0.0\", "
                "--host 0.0.0.0) unless that is what you mean",
                host, told,
            )
        return
    try:
        example = route_address(coordinator_host)
    except OSError:
        example = "10.0.0.7"
    raise ConfigError(
        f"this peer would tell the others to reach it at {told}, a loopback address, but its coordinator "
        f"{coordinator} is on another machine, whose peers cannot connect there; listen on an interface they "
        f"reach and give its address: ElasticConfig(..., transport=TransportConfig(host=\"0.0.0.0\", "
        f"advertise=\"{example}\")) in Python, --host 0.0.0.0 --advertise {example} on the command line"
    )


# Roles already warned about binding every interface: a process (an in-process harness too)
# says it once, not for every transport it starts.
_warned_wildcard: set[str] = set()


def _warn_once(role: str, message: str, *args: object) -> None:
    if role not in _warned_wildcard:
        _warned_wildcard.add(role)
        log.warning(message, *args)


def advertised_address(
    host: str, bound_port: int, advertise: str | None, *, role: str, coordinator: str | None = None
) -> str:
    """The address others reach a server at: advertise (its port, or the bound one), else the bound address.

    A server bound to every interface (0.0.0.0, ::) with nothing advertised gives
    its address on the route to coordinator (HOST:PORT), the address the
    coordinator sees it at. Without a coordinator, or no route to it, it gives the
    bound address and warns once per role: other machines cannot connect to 0.0.0.0.
    """
    if advertise is not None:
        adv_host, adv_port = parse_advertise(advertise)
        return format_address(adv_host, bound_port if adv_port is None else adv_port)
    address = format_address(host, bound_port)
    bare = host.strip("[]")
    if bare not in WILDCARD_HOSTS:
        return address
    if coordinator is not None:
        try:
            # An IPv4 wildcard accepts IPv4 only, so its route must be IPv4; "::" accepts both.
            family = socket.AF_INET if bare == "0.0.0.0" else socket.AF_UNSPEC
            routed = route_address(split_address(coordinator)[0], family)
        except (ValueError, OSError) as exc:
            _warn_once(
                role,
                "the %s listens on every interface and found no route to its coordinator %s (%s), so it tells "
                "others %s, which they cannot connect to; pass --advertise HOST[:PORT] (TransportConfig.advertise)",
                role, coordinator, exc, address,
            )
            return address
        address = format_address(routed, bound_port)
        if is_loopback(routed):
            _warn_once(
                role,
                "the %s listens on every interface and tells others %s, its address on the route to its "
                "coordinator %s: only this machine can connect there; pass --advertise HOST[:PORT] "
                "(TransportConfig.advertise) with the address other machines reach this one at",
                role, address, coordinator,
            )
        else:
            log.info(
                "the %s tells others %s, its address on the route to its coordinator %s", role, address, coordinator
            )
        return address
    _warn_once(
        role,
        "the %s listens on every interface and tells others %s, which they cannot connect to; "
        "pass --advertise HOST[:PORT] with the address other machines reach this one at",
        role, address,
    )
    return address
