"""A harness run's credentials: a run secret and a CA with one certificate for every process (``--token``, ``--tls``).

Made in the harness's work dir before anything starts, and handed to the coordinator and every peer as
``--token-file`` and ``--tls-cert/--tls-key/--tls-ca`` (mutual TLS), as a real deployment would
(docs/deploy.md). The harness's own Status calls use the same files.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from collectives.net.credentials import CallAuth
from collectives.net.rpc import RpcSecurity, RpcSettings
from peer.certs import CertsConfig, make_certs
from peer.options import option_args

# The one certificate every harness process serves and dials with (names: localhost, 127.0.0.1, and the hosts').
HARNESS_HOST = "harness"


def prepare_security(workdir: Path, token: bool, tls: bool, hosts: tuple[str, ...] = ()) -> RpcSecurity:
    """Write the run secret (token) and the CA and certificate (tls, valid for hosts too) in workdir."""
    token_file = ""
    if token:
        path = workdir / "run.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        token_file = str(path)
    if not tls:
        return RpcSecurity(token_file=token_file)
    spec = HARNESS_HOST + ("=" + ",".join(hosts) if hosts else "")
    made = make_certs(CertsConfig(out=str(workdir / "certs"), hosts=(spec,), local=True))
    cert, key = made.hosts[0]
    return RpcSecurity(token_file=token_file, tls_cert=str(cert), tls_key=str(key), tls_ca=str(made.ca_cert))


def security_args(security: RpcSecurity) -> list[str]:
    """The command-line options that give a coordinator or peer these credentials (the files that are set)."""
    args = option_args(security)
    return [a for flag, value in zip(args[::2], args[1::2], strict=True) if value for a in (flag, value)]


def tool_channel_settings(security: RpcSecurity, run_id: str) -> tuple[RpcSettings, CallAuth | None]:
    """What the harness's own calls to the coordinator (Status) connect with."""
    return RpcSettings(security=security), security.call_auth(run_id)
