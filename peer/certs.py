"""``loconet certs``: a certificate authority and per-host certificates for TLS and mutual TLS.

For tests and small deployments that have no PKI of their own. ``DIR/ca.pem`` and
``DIR/ca.key`` are the CA; each ``--host NAME`` gets ``DIR/NAME.pem`` and ``DIR/NAME.key``,
signed by that CA. Every host certificate is valid for both server and client
authentication, so one pair serves a process's gRPC server and its channels
(mutual TLS: each side checks the other against ``ca.pem``).

- Keys are EC P-256 (what gRPC's TLS stack handles everywhere), PKCS#8 PEM without a
  passphrase (gRPC reads no encrypted keys), written with mode 0600.
- A CA already in DIR is reused, so certifying a host later needs only the new name;
  named hosts always get a fresh key and certificate (their old ones stay valid: same CA).
- Subject alternative names: ``NAME`` is a DNS name, or an IP address when it parses as
  one; ``NAME=SAN,SAN...`` adds names or addresses a host is also reached at (its
  ``--advertise`` address, a pod IP). With ``local`` (the default) every host certificate
  also names ``localhost``, ``127.0.0.1`` and ``::1``: one machine's runs (the harness, tests)
  then verify whatever loopback address they dial. Only a process on the same machine can
  answer at a loopback address, so this lets no remote host pass as another; ``--no-local``
  leaves them out.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collectives.errors import ConfigError

log = logging.getLogger(__name__)

CA_STEM = "ca"
CA_CERT = f"{CA_STEM}.pem"
CA_KEY = f"{CA_STEM}.key"
LOCAL_NAMES = ("localhost",)
LOCAL_ADDRESSES = ("127.0.0.1", "::1")
# Certificates start a little in the past, so a peer whose clock runs slightly behind accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS = re.compile(
    r"^(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$"
)


class CertsError(ConfigError):
    """A certificate directory or host name cannot be used (the message says what to change)."""


@dataclass(frozen=True)
class CertsConfig:
    """What ``loconet certs`` writes (one field per option; ``--host`` is repeatable)."""

    out: str = field(default="certs", metadata={"help": "directory to write ca.pem, ca.key, NAME.pem and NAME.key in"})
    hosts: tuple[str, ...] = field(default=(), metadata={"cli": False})  # --host NAME[=SAN,...], added by hand
    days: int = field(default=365, metadata={"help": "days each host certificate is valid"})
    ca_days: int = field(
        default=3650, metadata={"help": "days a new CA is valid (a CA already in the directory is reused as it is)"}
    )
    local: bool = field(
        default=True,
        metadata={"help": "also name localhost, 127.0.0.1 and ::1 in every host certificate, for runs on one machine"},
    )

    def __post_init__(self) -> None:
        for name in ("days", "ca_days"):
            if getattr(self, name) < 1:
                raise CertsError(f"--{name.replace('_', '-')} must be at least 1 day, got {getattr(self, name)}")
        if not self.out:
            raise CertsError("--out must name a directory")


@dataclass(frozen=True)
class HostSpec:
    """One host to certify: its file stem and the DNS names and IP addresses its certificate names."""

    name: str
    dns: tuple[str, ...]
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]

    @property
    def stem(self) -> str:
        """File name stem: the name, with an IPv6 address's colons as underscores."""
        return self.name.replace(":", "_")


@dataclass(frozen=True)
class CertsResult:
    """What a run wrote: the CA (and whether it was new) and each host's certificate and key."""

    ca_cert: Path
    ca_key: Path
    ca_created: bool
    hosts: tuple[tuple[Path, Path], ...]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def parse_host(spec: str) -> HostSpec:
    """Read ``NAME`` or ``NAME=SAN,SAN...``: NAME names the files and is itself a DNS name or an IP address."""
    name, _, extra = spec.partition("=")
    name = name.strip().strip("[]")
    entries = [name] + [e.strip() for e in extra.split(",") if e.strip()] if extra else [name]
    if not name or (_ip(name) is None and not _STEM.match(name)):
        raise CertsError(
            f"host {spec!r}: NAME must be an IP address or a host name of letters, digits, '.', '-' and '_' "
            "(give other names after '=', e.g. --host peer1=peer1.example.org,10.0.0.5)"
        )
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for entry in entries:
        address = _ip(entry)
        if address is None and re.fullmatch(r"[0-9.]+", entry):
            # A mistyped IPv4 address is a valid DNS name: the certificate would name a host nobody dials.
            raise CertsError(f"host {spec!r}: {entry!r} looks like an IPv4 address but is not one; correct it")
        if address is not None:
            if address not in ips:
                ips.append(address)
        elif _DNS.match(entry) and len(entry) <= 253:
            if entry.lower() not in dns:
                dns.append(entry.lower())
        else:
            raise CertsError(
                f"host {spec!r}: {entry!r} is neither an IP address nor a DNS name (ASCII, e.g. a.example.org)"
            )
    return HostSpec(name=name, dns=tuple(dns), ips=tuple(ips))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write data to path with mode, atomically (a reader never sees half a key; a key is never world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask and ignored for an existing file
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _create_ca(days: int, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    # A random suffix tells two CAs apart in an error message ("issued by loconet CA 1a2b3c4d").
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "loconet"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"loconet CA {os.urandom(4).hex()}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _load_ca(
    cert_path: Path, key_path: Path, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    fix = f"delete {cert_path} and {key_path} to make a new CA (then re-issue every host), or choose another --out"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertsError(f"cannot read the CA in {cert_path.parent} ({exc}); {fix}") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertsError(f"{cert_path} is not a CA certificate; {fix}")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertsError(f"{key_path} is not the key of {cert_path}; {fix}")
    if cert.not_valid_after_utc <= now:
        raise CertsError(f"the CA {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; {fix}")
    return cert, key


def issue(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, host: HostSpec, days: int, local: bool,
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and a certificate for host signed by the CA, for server and client auth (ends no later than the CA)."""
    key = _new_key()
    dns = list(host.dns) + [n for n in (LOCAL_NAMES if local else ()) if n not in host.dns]
    ips = list(host.ips) + [a for a in map(ipaddress.ip_address, LOCAL_ADDRESSES if local else ()) if a not in host.ips]
    ends = now + datetime.timedelta(days=days)
    if ends > ca_cert.not_valid_after_utc:
        log.warning("%s: the CA expires on %s, so its certificate ends then, not in %d days", host.name,
                    f"{ca_cert.not_valid_after_utc:%Y-%m-%d}", days)
        ends = ca_cert.not_valid_after_utc
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(ends)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(
            x509.SubjectAlternativeName([*map(x509.DNSName, dns), *map(x509.IPAddress, ips)]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _hosts(specs: tuple[str, ...]) -> list[HostSpec]:
    """Parsed hosts, each stem once (the same spec twice is one host; two different ones are an error)."""
    hosts: dict[str, HostSpec] = {}
    for spec in specs:
        host = parse_host(spec)
        if host.stem == CA_STEM:
            raise CertsError(f"host {spec!r} would overwrite the CA's files ({CA_CERT}, {CA_KEY}); name it otherwise")
        seen = hosts.get(host.stem)
        if seen is not None and seen != host:
            raise CertsError(f"host {host.name} is given twice with different names; give it once with all of them")
        hosts[host.stem] = host
    return list(hosts.values())


def make_certs(config: CertsConfig, now: datetime.datetime | None = None) -> CertsResult:
    """Create (or reuse) the CA in config.out and a certificate and key for each host; return what was written."""
    now = now or datetime.datetime.now(datetime.UTC)
    hosts = _hosts(config.hosts)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise CertsError(f"--out {out} is a file; name a directory (it is created if missing)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = out / CA_CERT, out / CA_KEY
    have = [p.exists() for p in (ca_cert_path, ca_key_path)]
    if any(have) and not all(have):
        present, missing = (ca_cert_path, ca_key_path) if have[0] else (ca_key_path, ca_cert_path)
        raise CertsError(
            f"{present} exists but {missing} does not: restore it, or delete {present} to make a new CA "
            "(then re-issue every host)"
        )
    created = not all(have)
    if created:
        ca_cert, ca_key = _create_ca(config.ca_days, now)
        _write(ca_key_path, _key_pem(ca_key), 0o600)
        _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        log.info("created a CA in %s, valid for %d days", out, config.ca_days)
    else:
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path, now)
        log.info("reusing the CA in %s", out)
    written = []
    for host in hosts:
        cert, key = issue(ca_cert, ca_key, host, config.days, config.local, now)
        cert_path, key_path = out / f"{host.stem}.pem", out / f"{host.stem}.key"
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written.append((cert_path, key_path))
    return CertsResult(ca_cert_path, ca_key_path, created, tuple(written))


# -- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``loconet certs`` (CertsConfig's fields, and a repeatable --host)."""
    from peer.options import add_options

    add_options(parser, CertsConfig)
    parser.add_argument(
        "--host", dest="hosts", action="append", default=[], metavar="NAME[=SAN,...]",
        help="a host to certify: NAME.pem/NAME.key for the DNS name or IP address NAME, plus any names or addresses "
             "after '=' (repeatable; default: none, only the CA is made or kept)",
    )


def read_config(ns: argparse.Namespace) -> CertsConfig:
    """The CertsConfig the parsed options describe."""
    import dataclasses

    from peer.options import read_options

    return dataclasses.replace(read_options(CertsConfig, ns), hosts=tuple(ns.hosts))


def main(ns: argparse.Namespace) -> int:
    """Write the CA and host certificates; say what was written and how a process uses it."""
    result = make_certs(read_config(ns))
    lines = [f"{'created' if result.ca_created else 'kept'} CA {result.ca_cert} (key {result.ca_key})"]
    for cert, key in result.hosts:
        lines.append(f"certificate {cert} (key {key})")
    if result.hosts:
        cert, key = result.hosts[0]
        lines.append(f"use: --tls-cert {cert} --tls-key {key} --tls-ca {result.ca_cert}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
