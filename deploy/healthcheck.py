#!/opt/venv/bin/python
"""``loconet-health``: the container health check of a loconet coordinator or peer.

It asks the process's gRPC server for the standard health status (grpc.health.v1, which every loconet server
answers without the run's token) and exits 0 when it is SERVING, 1 otherwise, with the reason on stderr. The
image's HEALTHCHECK runs it, and so do the Kubernetes exec probes: kubelet's built-in ``grpc:`` probe speaks
plaintext only, so it cannot check a server that has TLS on.

Everything comes from the command line or, so that the image's HEALTHCHECK needs no arguments, the
environment: LOCONET_HEALTH_ADDRESS (default 127.0.0.1:7070, the coordinator's port), LOCONET_HEALTH_TIMEOUT,
LOCONET_HEALTH_TLS_CA (TLS on), LOCONET_HEALTH_TLS_CERT and LOCONET_HEALTH_TLS_KEY (mutual TLS: the process's
own certificate serves as a client certificate) and LOCONET_HEALTH_SERVER_NAME (the name the server's
certificate is for, when the address is 127.0.0.1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("loconet-health")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The check's options; each default comes from its LOCONET_HEALTH_* environment variable."""
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="loconet-health", description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=env("LOCONET_HEALTH_ADDRESS", "127.0.0.1:7070"),
                        help="HOST:PORT of the gRPC server to check (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=env("LOCONET_HEALTH_TIMEOUT", "5"),
                        help="seconds to wait for the answer (default: %(default)s)")
    parser.add_argument("--tls-ca", default=env("LOCONET_HEALTH_TLS_CA"),
                        help="CA certificate that signed the server's: connect with TLS (default: plaintext)")
    parser.add_argument("--tls-cert", default=env("LOCONET_HEALTH_TLS_CERT"),
                        help="client certificate, for a server that wants mutual TLS")
    parser.add_argument("--tls-key", default=env("LOCONET_HEALTH_TLS_KEY"), help="the client certificate's key")
    parser.add_argument("--server-name", default=env("LOCONET_HEALTH_SERVER_NAME"),
                        help="name the server's certificate is for, when the address does not carry it")
    return parser.parse_args(argv)


def make_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the checked server: plaintext, TLS, or mutual TLS, as the options say."""
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("give both --tls-cert and --tls-key (mutual TLS), or neither")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes(),
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def check(args: argparse.Namespace) -> str | None:
    """None when the server answers SERVING; otherwise why it is not healthy."""
    try:
        channel = make_channel(args)
    except (OSError, ValueError) as exc:
        return f"cannot set up the check: {exc}"
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            return f"{args.address} did not answer the health check: {exc.code().name} {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{args.address} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the check once: exit status 0 when healthy, 1 when not."""
    logging.basicConfig(level=logging.INFO, format="loconet-health: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    problem = check(args)
    if problem is not None:
        log.error("%s", problem)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
