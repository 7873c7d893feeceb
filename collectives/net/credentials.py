"""Run credentials: every call proves it knows the run's secret, and a peer's calls prove who sent them.

Two layers, both carried in each call's metadata:

1. **The run secret** (``--token-file``, or ``LOCONET_TOKEN``). Every call carries
   ``loconet-auth: v1 <ts_ms> <peer id> <hex HMAC-SHA256(secret, run id, peer id, method, ts)>``.
   The server interceptor (``RunAuthInterceptor``) recomputes it, compares in
   constant time and checks the clock skew before the handler runs or a request
   is read, so a caller without the secret, with a wrong one, or with another
   run's, is refused ``UNAUTHENTICATED`` at no cost. Only the standard health
   check is exempt (probes need it).
2. **Peer identity.** Everyone holding the secret could claim any peer id, so the
   secret alone cannot say *which* peer calls. A peer makes an Ed25519 key pair,
   sends its public key with its Join, and the coordinator answers with a
   ``PeerCredential``: run id, peer id, data-plane address and public key, signed
   by the coordinator's own key (which no peer holds). From then on every call
   carries that credential and an Ed25519 signature over (run id, peer id,
   method, timestamp, the address dialled). The coordinator checks that the
   credential is its own and names the peer id of the request
   (``verify_caller``); a peer serving a round or a state fetch checks that the
   credential comes from a coordinator it joined and names the sender's address
   or peer id. Signing the address dialled means a member cannot replay a call it
   received to a third peer.

Without TLS the metadata can be read off the wire and replayed for
``MAX_CLOCK_SKEW_S``: runs across untrusted networks use TLS as well
(``collectives.net.rpc.RpcSecurity``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from collectives.errors import ConfigError, Unauthenticated
from protos import membership_pb2 as pb

log = logging.getLogger(__name__)

AUTH_KEY = "loconet-auth"
CREDENTIAL_KEY = "loconet-credential-bin"
SIGNATURE_KEY = "loconet-signature-bin"
# The address the caller dialled, as it signed it (a peer refuses calls signed for another address).
TARGET_KEY = "loconet-target"
TOKEN_ENV = "LOCONET_TOKEN"
# How far a call's timestamp may be from the server's clock (both ways).
MAX_CLOCK_SKEW_S = 300.0
# A secret shorter than this is refused: it could be guessed.
MIN_SECRET_BYTES = 16
# Calls anyone may make: the standard health check, which load balancers and Kubernetes probes use.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
# Peer ids and addresses longer than this are not ours (the coordinator makes short ids).
MAX_ID_CHARS = 256
# The digits of a call's time in ms (13 until the year 2286; 16 leave room and keep it a float's exact integer).
MAX_TS_DIGITS = 16
# A peer keeps trusting this many coordinator keys (a coordinator restarted without its state file has a new one).
MAX_TRUSTED_ISSUERS = 4


def warn_if_public(path: str, mode: int, what: str) -> None:
    """Log a warning when a secret's file (its st_mode) lets every user of the machine at it."""
    if mode & stat.S_IRWXO:
        # Group access is allowed: a Kubernetes Secret mounted for a non-root user is 0440.
        log.warning("%s %s is readable by every user; chmod 600 (or 640) it", what, path)


def read_secret_file(path: str, what: str) -> bytes:
    """The secret in the file at path, surrounding whitespace stripped (what: how errors name it); ConfigError when
    unreadable, and a warning when every user may read it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}; check the path") from exc
    warn_if_public(path, mode, what)
    return secret


def load_secret(token_file: str | None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The run secret from token_file, else from LOCONET_TOKEN; None when neither is set."""
    environ = os.environ if environ is None else environ
    if token_file:
        secret = read_secret_file(token_file, "the run token file")
        where = f"the run token file {token_file}"
    elif environ.get(TOKEN_ENV):
        secret = environ[TOKEN_ENV].strip().encode()
        where = f"${TOKEN_ENV}"
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{where} holds {len(secret)} bytes; a run secret needs at least {MIN_SECRET_BYTES} "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return secret


def call_mac(secret: bytes, run_id: str, peer_id: str, method: str, ts_ms: int) -> str:
    """The run-secret proof of one call: hex HMAC-SHA256 over run id, peer id, method and timestamp."""
    message = b"\n".join([b"loconet-call/v1", run_id.encode(), peer_id.encode(), method.encode(), str(ts_ms).encode()])
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def call_statement(run_id: str, peer_id: str, method: str, ts_ms: int, target: str) -> bytes:
    """What a peer signs for one call: run, sender, method, time and the address it dialled."""
    return b"\n".join(
        [b"loconet-signed-call/v1", run_id.encode(), peer_id.encode(), method.encode(), str(ts_ms).encode(),
         target.encode()]
    )


def credential_bytes(cred: pb.PeerCredential) -> bytes:
    """The bytes a coordinator signs for a credential: its fields but the signature, length-prefixed."""
    parts = [b"loconet-credential/v1", cred.run_id.encode(), cred.peer_id.encode(), cred.address.encode(),
             cred.public_key, cred.issuer_key]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str | bytes]:
    found: dict[str, str | bytes] = {}
    for key, value in metadata or ():
        found.setdefault(key, value)  # the first of repeated keys (a caller cannot override by repeating)
    return found


class ForeignCredential(Unauthenticated):
    """A credential signed by a coordinator key this process does not trust (a coordinator restarted without its
    state file has a new key): the peer should join again."""


def load_issuer_key(path: str) -> bytes:
    """The coordinator's private key kept at path (made, mode 0600, when missing), so a restart keeps credentials."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            key = f.read()
    except FileNotFoundError:
        return _make_issuer_key(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the coordinator key {path} (kept beside --state-file): {exc.strerror}") from exc
    if len(key) != 32:
        raise ConfigError(f"{path} is not a coordinator key (32 bytes); remove it to make a new one")
    warn_if_public(path, mode, "the coordinator key")
    return key


def _make_issuer_key(path: str) -> bytes:
    """A new coordinator key written to path (mode 0600, never over an existing file or link); ConfigError naming it."""
    what = f"the coordinator key {path} (made beside --state-file, so a restart keeps the credentials it issued)"
    if os.path.islink(path):
        # open() followed the link to nothing; O_EXCL refuses to create through it ("File exists").
        raise ConfigError(
            f"{what} is a symbolic link to {os.readlink(path)}, which does not exist; remove the link or restore "
            "its target"
        )
    key = Ed25519PrivateKey.generate().private_bytes_raw()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    except OSError as exc:
        raise ConfigError(
            f"cannot create {what}: {exc.strerror}; check that --state-file's folder exists and is writable"
        ) from exc
    return key


@dataclass(frozen=True)
class RunClaim:
    """A call's run-secret proof, checked: who it says it is and when it was made."""

    peer_id: str
    ts_ms: int


def check_run_auth(
    secret: bytes, run_id: str, method: str, metadata: Iterable[tuple[str, str | bytes]] | None, now_s: float
) -> RunClaim:
    """Check a call's run-secret proof; raise Unauthenticated saying why (no secret, wrong, stale)."""
    value = _metadata(metadata).get(AUTH_KEY)
    if not isinstance(value, str) or not value:
        raise Unauthenticated("this run needs a credential: start the peer with the run's --token-file")
    fields = value.split(" ")
    if len(fields) != 4 or fields[0] != "v1" or len(fields[3]) != 64 or len(fields[2]) > MAX_ID_CHARS:
        raise Unauthenticated("malformed credential")
    # Milliseconds since 1970 in ASCII digits: a 400-digit time with a valid MAC overflowed the clock check.
    if not (0 < len(fields[1]) <= MAX_TS_DIGITS and fields[1].isascii() and fields[1].isdigit()):
        raise Unauthenticated("malformed credential")
    ts_ms = int(fields[1])
    expected = call_mac(secret, run_id, fields[2], method, ts_ms)
    # Constant time, and before the clock check, so a probe learns nothing from timing.
    if not hmac.compare_digest(expected, fields[3]):
        raise Unauthenticated(
            f"wrong credential: this server serves run {run_id!r} with its own secret; give the caller --run "
            f"{run_id} and the run's --token-file"
        )
    if abs(ts_ms / 1000.0 - now_s) > MAX_CLOCK_SKEW_S:
        raise Unauthenticated(f"the call's clock is more than {MAX_CLOCK_SKEW_S:g} s off this server's: sync clocks")
    return RunClaim(fields[2], ts_ms)


class Issuer:
    """The coordinator's signing key: issues credentials and recognises its own."""

    def __init__(self, private_key: bytes | None = None) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(private_key) if private_key else Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes_raw()

    def issue(self, run_id: str, peer_id: str, address: str, public_key: bytes) -> pb.PeerCredential:
        """A credential binding peer_id (at address, in run_id) to public_key, signed by this coordinator."""
        if len(public_key) != 32:
            raise Unauthenticated("a peer's public key is a 32-byte Ed25519 key")
        cred = pb.PeerCredential(
            run_id=run_id, peer_id=peer_id, address=address, public_key=public_key, issuer_key=self.public_key
        )
        cred.signature = self._key.sign(credential_bytes(cred))
        return cred


def _verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def carries_credential(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    """Whether a call's metadata holds a peer credential (checked or not)."""
    return CREDENTIAL_KEY in _metadata(metadata)


def verify_caller(
    metadata: Iterable[tuple[str, str | bytes]] | None,
    method: str,
    run_id: str,
    issuers: Sequence[bytes],
    claim: RunClaim,
    target: str | None = None,
) -> pb.PeerCredential:
    """The caller's credential, if it is signed by one of issuers, for run_id and claim's peer id, and the call is
    signed with its key (for target, when given: a peer; the coordinator takes any, as nobody else sees the calls
    peers make to it); raise Unauthenticated otherwise."""
    found = _metadata(metadata)
    raw, signature = found.get(CREDENTIAL_KEY), found.get(SIGNATURE_KEY)
    if not isinstance(raw, bytes) or not isinstance(signature, bytes):
        raise Unauthenticated("this call needs the peer's credential: join the run first")
    cred = pb.PeerCredential()
    try:
        cred.ParseFromString(raw)
    except DecodeError:
        raise Unauthenticated("malformed peer credential") from None
    if cred.issuer_key not in issuers:
        raise ForeignCredential("the peer credential was issued by another coordinator (restarted?): join again")
    if not _verify(cred.issuer_key, cred.signature, credential_bytes(cred)):
        raise Unauthenticated("the peer credential's signature is not its coordinator's")
    if cred.run_id != run_id or cred.peer_id != claim.peer_id:
        raise Unauthenticated("the peer credential is for another run or peer")
    signed_for = found.get(TARGET_KEY, "")
    if not isinstance(signed_for, str) or (target is not None and signed_for != target):
        raise Unauthenticated(f"the call was signed for {str(signed_for)[:100]!r}, not this peer ({target})")
    statement = call_statement(run_id, claim.peer_id, method, claim.ts_ms, signed_for)
    if not _verify(cred.public_key, signature, statement):
        raise Unauthenticated("the call is not signed by the peer its credential names")
    return cred


@dataclass
class CallAuth:
    """One process's run credentials: the secret, its peer key and credential, and the coordinators it trusts.

    The client side (``metadata``) signs every call; the server side (``check``) is used by the interceptor.
    The credential and trusted issuers change at each join (set from the membership client's thread or loop;
    each assignment is atomic).
    """

    secret: bytes
    run_id: str
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    credential: pb.PeerCredential | None = None
    issuers: tuple[bytes, ...] = ()
    # The peer id calls claim ("" before the first join).
    peer_id: str = ""

    @property
    def public_key(self) -> bytes:
        """This process's Ed25519 public key (sent with Join)."""
        return self.key.public_key().public_bytes_raw()

    def adopt(self, credential: pb.PeerCredential) -> None:
        """Use credential for every later call, and trust the coordinator that issued it."""
        if credential.public_key != self.public_key:
            raise Unauthenticated("the coordinator answered with a credential for another key")
        self.peer_id = credential.peer_id
        self.credential = credential
        if credential.issuer_key not in self.issuers:
            self.issuers = (*self.issuers, credential.issuer_key)[-MAX_TRUSTED_ISSUERS:]

    def metadata(self, method: str, target: str, peer_id: str | None = None) -> list[tuple[str, str | bytes]]:
        """The credential metadata of one call to target (peer_id: the id to claim; default: this peer's)."""
        ts_ms = int(time.time() * 1000)
        pid = self.peer_id if peer_id is None else peer_id
        pairs: list[tuple[str, str | bytes]] = [
            (AUTH_KEY, f"v1 {ts_ms} {pid} {call_mac(self.secret, self.run_id, pid, method, ts_ms)}")
        ]
        cred = self.credential
        if cred is not None and cred.peer_id == pid:
            pairs.append((CREDENTIAL_KEY, cred.SerializeToString()))
            pairs.append((TARGET_KEY, target))
            pairs.append((SIGNATURE_KEY, self.key.sign(call_statement(self.run_id, pid, method, ts_ms, target))))
        return pairs

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> RunClaim:
        """The run-secret check of an incoming call (raises Unauthenticated)."""
        return check_run_auth(self.secret, self.run_id, method, metadata, time.time())


def verify_peer_call(
    context: grpc.aio.ServicerContext, auth: CallAuth | None, method: str, target: str | None
) -> pb.PeerCredential | None:
    """The verified credential behind an incoming call to a peer (None without a run secret); raises Unauthenticated
    unless the call carries a credential from a coordinator this peer joined, signed for target."""
    if auth is None:
        return None
    metadata = context.invocation_metadata()
    claim = auth.check(method, metadata)
    return verify_caller(metadata, method, auth.run_id, auth.issuers, claim, target)


async def refuse_unauthenticated(context: grpc.aio.ServicerContext, exc: Unauthenticated) -> None:
    """End the call with UNAUTHENTICATED and exc's message (never returns)."""
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
