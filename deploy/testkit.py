"""Helpers of deploy/test-containers.sh that are easier in Python than in bash; each prints JSON on stdout.

- ``compose-file``: a copy of compose.yaml to run, optionally without the run's security flags (until every
  loconet flag it uses exists, the test can run the deployment without TLS and token).
- ``kube-file``: a copy of a Kubernetes manifest that ``podman kube play`` can run on this machine: the local
  image, host ports that are free here, a volume name of the test's own, and the Secret volume as a folder.
- ``wait-rounds``: poll the coordinator's ``/api/status`` until the run has committed some rounds.
- ``status``: the run's figures from ``/api/status`` once.
- ``get``: one GET of a dashboard path (``/healthz``), over TLS when given the CA.
- ``image-key``: a digest of what goes into the image (Dockerfile, health check, the wheels' contents), so an
  image built from the same inputs is not built again.
- ``events``: read the peers' JSON event lines (``loconet peer --events``) and decide, as the harness does,
  whether the peers that finished hold identical parameters.

It reads the run's state only from outside the containers: the published dashboard and the containers' logs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import ssl
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("testkit")

# Flags that take a secret or certificate file; the insecure variant drops them with their value.
SECURITY_FLAGS = ("--token-file", "--tls-cert", "--tls-key", "--tls-ca", "--dashboard-token-file")
SECRETS_MOUNT = "/run/secrets/loconet"
HEALTH_TLS_ENV = ("LOCONET_HEALTH_TLS_CA", "LOCONET_HEALTH_TLS_CERT", "LOCONET_HEALTH_TLS_KEY",
                  "LOCONET_HEALTH_SERVER_NAME")


class _PlainDumper(yaml.SafeDumper):
    """Writes shared values out in full: a file without anchors reads the same to every compose version."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class TestkitError(Exception):
    """Something the test checks did not hold; the message says what."""


def emit(document: dict[str, Any]) -> None:
    """Write one JSON document on stdout (the bash script reads it)."""
    sys.stdout.write(json.dumps(document, sort_keys=True) + "\n")


def strip_security(args: list[str]) -> list[str]:
    """args without the security flags (``--flag=value`` or ``--flag value``)."""
    kept: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in SECURITY_FLAGS:
            skip_next = "=" not in arg
            continue
        kept.append(arg)
    return kept


def split_volume(volume: str) -> tuple[str, str]:
    """HOST and TARGET[:MODE] of a compose volume; HOST may be a ${VAR:-default} with colons of its own."""
    depth, index = 0, 0
    for index, char in enumerate(volume):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == ":" and depth == 0:
            return volume[:index], volume[index + 1:]
    return volume, ""


def compose_file(source: Path, target: Path, secure: bool) -> dict[str, Any]:
    """Write the compose file to run: relative host paths made absolute, and without security unless secure."""
    document = yaml.safe_load(source.read_text())
    base = source.parent
    for service in document["services"].values():
        volumes = []
        for volume in service.get("volumes", []):
            host, rest = split_volume(volume)
            if not secure and (rest.startswith(SECRETS_MOUNT) or "dashboard-token" in rest):
                continue
            if host.startswith("./"):
                volume = f"{base / host[2:]}:{rest}"
            volumes.append(volume)
        if volumes:
            service["volumes"] = volumes
        if not secure:
            if isinstance(service.get("command"), list):
                service["command"] = strip_security(service["command"])
            environment = service.get("environment") or {}
            for key in HEALTH_TLS_ENV:
                environment.pop(key, None)
    # Anchors and merge keys are resolved by the load; the copy holds plain services.
    document = {key: value for key, value in document.items() if not key.startswith("x-")}
    target.write_text(yaml.dump(document, Dumper=_PlainDumper, sort_keys=False))
    return {"compose_file": str(target), "secure": secure, "services": sorted(document["services"])}


def kube_file(source: Path, target: Path, image: str, ports: dict[str, int], prefix: str,
              secrets: Path | None) -> dict[str, Any]:
    """Write a manifest ``podman kube play`` runs here: local image, free host ports, own volume names."""
    documents = [d for d in yaml.safe_load_all(source.read_text()) if d]
    claims = {}
    for document in documents:
        if document["kind"] == "PersistentVolumeClaim":
            claims[document["metadata"]["name"]] = f"{prefix}-{document['metadata']['name']}"
            document["metadata"]["name"] = claims[document["metadata"]["name"]]
            # A podman volume starts owned by root; the image's user must write the state file.
            document["metadata"].setdefault("annotations", {}).update(
                {"volume.podman.io/uid": "10001", "volume.podman.io/gid": "10001"})
    played = []
    for document in documents:
        if document["kind"] != "Deployment":
            continue
        spec = document["spec"]["template"]["spec"]
        for container in spec["containers"]:
            container["image"] = image
            for port in container.get("ports", []):
                if port["name"] in ports:
                    port["hostPort"] = ports[port["name"]]
                    port["hostIP"] = "127.0.0.1"
            if secrets is None:
                container["args"] = strip_security(container.get("args", []))
                container["env"] = [e for e in container.get("env", []) if e["name"] not in HEALTH_TLS_ENV]
                container["volumeMounts"] = [m for m in container.get("volumeMounts", [])
                                             if m["mountPath"] != SECRETS_MOUNT]
        volumes = []
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                if secrets is None:
                    continue
                volume = {"name": volume["name"], "hostPath": {"path": str(secrets), "type": "Directory"}}
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]
                claim["claimName"] = claims.get(claim["claimName"], claim["claimName"])
            volumes.append(volume)
        spec["volumes"] = volumes
        played.append(document["metadata"]["name"])
    # Only what kube play runs: a Service would be ignored, with a warning.
    kept = [d for d in documents if d["kind"] in ("PersistentVolumeClaim", "Deployment", "ConfigMap")]
    target.write_text(yaml.dump_all(kept, Dumper=_PlainDumper, sort_keys=False))
    return {"kube_file": str(target), "deployments": played, "volumes": sorted(claims.values())}


def get(url: str, token_file: Path | None, ca_file: Path | None, timeout_s: float = 5) -> bytes:
    """The body of one GET (https verified against ca_file: loconet certs names 127.0.0.1 in every certificate)."""
    request = urllib.request.Request(url)
    if token_file is not None:
        request.add_header("Authorization", f"Bearer {token_file.read_text().strip()}")
    context = ssl.create_default_context(cafile=str(ca_file)) if url.startswith("https:") and ca_file else None
    with urllib.request.urlopen(request, timeout=timeout_s, context=context) as reply:
        return reply.read()


def fetch_status(url: str, token_file: Path | None, ca_file: Path | None) -> dict:
    """The coordinator's /api/status document."""
    return json.loads(get(url.rstrip("/") + "/api/status", token_file, ca_file))


def image_key(files: list[Path], wheels: Path) -> dict[str, str]:
    """A digest of the image's inputs: the files, the wheels, and loconet's wheel by its contents.

    pip rebuilds loconet's wheel on every run, with new timestamps in the archive; the other wheels are
    copied as they were downloaded, so their bytes are stable.
    """
    digest = hashlib.sha256()
    for path in [*files, *sorted(wheels.glob("*.whl"))]:
        digest.update(path.name.encode() + b"\0")
        if not path.name.startswith("loconet-"):
            digest.update(hashlib.sha256(path.read_bytes()).digest())
            continue
        with zipfile.ZipFile(path) as archive:
            for member in sorted(archive.namelist()):
                # RECORD lists the same contents; its bytes vary with nothing the image depends on.
                if not member.endswith(".dist-info/RECORD"):
                    digest.update(member.encode() + b"\0" + hashlib.sha256(archive.read(member)).digest())
    return {"image_key": digest.hexdigest()[:32]}


def run_figures(status: dict) -> dict[str, Any]:
    """What the test reports of a status document."""
    summary = status.get("summary") or {}
    return {
        "rounds_committed": summary.get("rounds_committed", 0),
        "rounds_aborted": summary.get("rounds_aborted", 0),
        "peers_alive": summary.get("peers_alive", 0),
        "last_committed_round": status.get("last_committed_round"),
        "epoch": status.get("epoch"),
    }


def wait_rounds(url: str, at_least: int, timeout_s: float, token_file: Path | None,
                ca_file: Path | None) -> dict[str, Any]:
    """Poll /api/status until at_least rounds committed; the figures then, or TestkitError at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            figures = run_figures(fetch_status(url, token_file, ca_file))
        except (OSError, ValueError, urllib.error.URLError) as exc:
            last_error = str(exc)
        else:
            if figures["rounds_committed"] >= at_least:
                return figures
            last_error = f"{figures['rounds_committed']} rounds committed"
        time.sleep(0.5)
    raise TestkitError(f"{url}: fewer than {at_least} rounds committed within {timeout_s:g} s ({last_error})")


def read_events(path: Path) -> list[dict]:
    """The JSON event lines of one peer's stdout (other lines, if any, are skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def identical(per_peer: dict[str, list[dict]]) -> dict[str, Any]:
    """Whether the peers that finished hold the same parameters after the last round they all committed.

    The harness's rule (peer/harness/outcome.py): compare the digests of each finished peer's committed
    events at the latest (round, epoch) all of them committed.
    """
    finished = {name: events for name, events in per_peer.items() if any(e["event"] == "finished" for e in events)}
    digests = [
        {(e["round"], e.get("epoch", 0)): e["digest"] for e in events if e["event"] == "committed"}
        for events in finished.values()
    ]
    same, at_round = False, None
    if digests:
        common = set.intersection(*(set(d) for d in digests))
        if common:
            last = max(common)
            at_round, same = last[0], len({d[last] for d in digests}) == 1
        else:
            same = len(digests) == 1
    return {
        "finished": sorted(finished),
        "identical": same,
        "identical_at_round": at_round,
        "committed_per_peer": {n: sum(e["event"] == "committed" for e in ev) for n, ev in per_peer.items()},
        "final_eval_loss": {n: next(e.get("eval_loss") for e in ev if e["event"] == "finished")
                            for n, ev in finished.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The subcommands and their options."""
    parser = argparse.ArgumentParser(prog="testkit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    compose = commands.add_parser("compose-file")
    compose.add_argument("source", type=Path)
    compose.add_argument("target", type=Path)
    compose.add_argument("--secure", action=argparse.BooleanOptionalAction, default=True)

    kube = commands.add_parser("kube-file")
    kube.add_argument("source", type=Path)
    kube.add_argument("target", type=Path)
    kube.add_argument("--image", required=True)
    kube.add_argument("--port", action="append", default=[], metavar="NAME=HOSTPORT")
    kube.add_argument("--prefix", required=True, help="prefix of the podman volumes the claims become")
    kube.add_argument("--secrets", type=Path, help="folder standing in for the Secret (default: no security)")

    for name in ("wait-rounds", "status", "get"):
        status = commands.add_parser(name)
        status.add_argument("url")
        status.add_argument("--token-file", type=Path)
        status.add_argument("--ca-file", type=Path)
        if name == "wait-rounds":
            status.add_argument("--at-least", type=int, required=True)
            status.add_argument("--timeout", type=float, required=True)

    key = commands.add_parser("image-key")
    key.add_argument("wheels", type=Path)
    key.add_argument("files", nargs="+", type=Path)

    events = commands.add_parser("events")
    events.add_argument("files", nargs="+", type=Path, help="NAME.events files, one per peer")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; exit 1 with the reason on stderr when a check does not hold."""
    logging.basicConfig(level=logging.INFO, format="testkit: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        if args.command == "compose-file":
            emit(compose_file(args.source, args.target, args.secure))
        elif args.command == "kube-file":
            ports = {name: int(port) for name, _, port in (p.partition("=") for p in args.port)}
            emit(kube_file(args.source, args.target, args.image, ports, args.prefix, args.secrets))
        elif args.command == "wait-rounds":
            emit(wait_rounds(args.url, args.at_least, args.timeout, args.token_file, args.ca_file))
        elif args.command == "status":
            emit(run_figures(fetch_status(args.url, args.token_file, args.ca_file)))
        elif args.command == "get":
            emit({"url": args.url, "body": get(args.url, args.token_file, args.ca_file).decode(errors="replace")})
        elif args.command == "image-key":
            emit(image_key(args.files, args.wheels))
        elif args.command == "events":
            emit(identical({path.stem: read_events(path) for path in args.files}))
    except (TestkitError, OSError, ValueError, KeyError, urllib.error.URLError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
