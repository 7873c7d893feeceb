"""Who calls the coordinator, with a run secret: the credentials it issues, and the checks of every call.

A joiner proves it holds the key it sends (``joiner_key``) and gets a credential binding its peer id and
address to that key, signed with the coordinator's key (``issue``; the key is kept beside the state file, so
a restarted coordinator still recognises its credentials). Heartbeat, Quorum, Commit and Leave must then be
signed by the key the request's peer id is bound to (``caller``, then ``check``; a Session stream is
checked once, as it opens); a forged one is refused UNAUTHENTICATED
and counted. A credential of an earlier coordinator (one restarted without its state file, with a new key)
is answered with "join again". The checks themselves are ``collectives.net.credentials``'; docs/security.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc

from collectives.errors import Unauthenticated
from collectives.net.credentials import (
    CallAuth,
    ForeignCredential,
    Issuer,
    carries_credential,
    load_issuer_key,
    verify_caller,
)
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.quorum import BadRequest
from peer.coordinator.runstate import RunState
from protos import membership_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
FORGED = "forged-identity"


class Rejoin(Exception):
    """A call with a credential of an earlier coordinator: the peer is told to join again."""


@dataclass(frozen=True)
class Caller:
    """Who makes a call, as its credential says (checked): none without a run secret or when it sent none;
    ``foreign`` when an earlier coordinator issued it. A Session stream's caller is checked once, as it opens."""

    credential: pb.PeerCredential | None = None
    foreign: bool = False


class Callers:
    """The coordinator's side of peer identity (every method is a no-op without a run secret)."""

    def __init__(
        self,
        config: CoordinatorConfig,
        auth: CallAuth | None,
        state: RunState,
        refuse: Callable[[str, grpc.StatusCode, str], BadRequest],
    ) -> None:
        self.run_id = config.run_id
        self.auth = auth
        self.state = state
        # refuse(kind, code, why): a BadRequest to raise, counted under kind.
        self.refuse = refuse
        self.issuer: Issuer | None = None
        if auth is not None:
            self.issuer = Issuer(load_issuer_key(config.state_file + ".key") if config.state_file else None)

    def issue(self, peer_id: str, address: str, key: bytes) -> pb.PeerCredential:
        """The credential binding peer_id at address to key (call only with a run secret)."""
        assert self.issuer is not None, "credentials are issued only with a run secret"
        return self.issuer.issue(self.run_id, peer_id, address, key)

    def credential(self, context: grpc.aio.ServicerContext, rpc: str) -> pb.PeerCredential | None:
        """The caller's verified credential (None without a run secret or when it sends none); raises Rejoin for
        a credential of another coordinator, BadRequest(UNAUTHENTICATED) for a bad one."""
        if self.auth is None or self.issuer is None:
            return None
        metadata = context.invocation_metadata()
        if not carries_credential(metadata):
            return None
        method = f"/{SERVICE_NAME}/{rpc}"
        try:
            claim = self.auth.check(method, metadata)
            return verify_caller(metadata, method, self.run_id, (self.issuer.public_key,), claim)
        except ForeignCredential:
            raise Rejoin() from None
        except Unauthenticated as exc:
            raise self.refuse(FORGED, grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None

    def caller(self, context: grpc.aio.ServicerContext, rpc: str) -> Caller:
        """The checked credential of a call (or of a Session stream as it opens); BadRequest(UNAUTHENTICATED) for a
        bad one."""
        try:
            return Caller(self.credential(context, rpc))
        except Rejoin:
            return Caller(foreign=True)

    def check(self, caller: Caller, rpc: str, peer_id: str) -> None:
        """With a run secret: caller (from ``caller``) must hold the key this coordinator bound peer_id to
        (Heartbeat raises Rejoin for an earlier coordinator's credential; the others answer NOT_FOUND, which means
        the same); BadRequest(UNAUTHENTICATED) otherwise."""
        if caller.foreign:
            if rpc == "Heartbeat":
                raise Rejoin()
            raise BadRequest(grpc.StatusCode.NOT_FOUND, "credential of an earlier coordinator: join again")
        cred = caller.credential
        if cred is None:
            if self.auth is not None:
                raise self.refuse(
                    FORGED, grpc.StatusCode.UNAUTHENTICATED, f"{rpc} needs the peer's credential: join first"
                )
            return
        if cred.peer_id != peer_id:
            raise self.refuse(
                FORGED, grpc.StatusCode.UNAUTHENTICATED,
                f"the call's credential is peer {cred.peer_id[:100]!r}'s, not {peer_id[:100]!r}'s",
            )
        record = self.state.peers.get(peer_id)
        if record is not None and record.public_key != cred.public_key:
            # The id was given to another process since (this credential is an old one): not this caller's.
            raise self.refuse(
                FORGED, grpc.StatusCode.UNAUTHENTICATED, f"peer id {peer_id[:100]!r} belongs to another key"
            )

    def joiner_key(self, context: grpc.aio.ServicerContext, req: pb.JoinRequest) -> bytes | None:
        """With a run secret: the key a joiner proves it holds (its request's 32-byte public key), after checking
        that a credential it sends, if any, is valid and for that key; None without a run secret."""
        if self.auth is None:
            return None
        if len(req.public_key) != 32:
            raise self.refuse(
                FORGED, grpc.StatusCode.UNAUTHENTICATED,
                "this run needs the joiner's public key: upgrade the peer, or give it the run's --token-file",
            )
        try:
            cred = self.credential(context, "Join")
        except Rejoin:
            cred = None
        if cred is not None and cred.public_key != req.public_key:
            raise self.refuse(FORGED, grpc.StatusCode.UNAUTHENTICATED, "the join's key is not its credential's")
        return req.public_key
