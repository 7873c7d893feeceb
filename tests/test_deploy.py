"""deploy/: the container image, the compose file and the Kubernetes manifests.

The quick tests read the files: every manifest parses and passes ``kubernetes-validate --strict`` (when it
is installed), every loconet command they hold is one the CLI accepts, and the image runs as a non-root
user. The slow test, marked ``containers``, runs ``deploy/test-containers.sh``: it builds the image with
podman, runs the compose deployment of a coordinator and 3 peers through a SIGKILL of one peer, validates
the manifests and plays the coordinator's under ``podman kube play``; it asserts on the script's JSON summary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peer.cli import build_parser

try:
    import yaml
except ImportError:  # kubernetes-validate brings it; without it the file checks skip
    yaml = None

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
SCRIPT = DEPLOY / "test-containers.sh"
# The script's own budget is 600 s (a fresh machine takes about 3 minutes); this leaves it time to clean up.
SCRIPT_TIMEOUT_S = 700
CONTAINER_TOOLS = ("podman", "runc", "podman-compose", "debootstrap")
# What kubelet puts in $(NAME) of a peer's args, from the fieldRefs of its env (any pod's values will do).
FIELD_EXAMPLES = {"metadata.name": "loconet-peer-0", "status.podIP": "10.1.2.3",
                  "metadata.labels['apps.kubernetes.io/pod-index']": "0"}


def _documents(path: Path) -> list[dict]:
    if yaml is None:
        pytest.skip("PyYAML is not installed (pip install kubernetes-validate brings it)")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _loconet_commands() -> list[tuple[str, list[str]]]:
    """Every loconet command line of compose.yaml and the manifests: (where, arguments); none without PyYAML."""
    if yaml is None:
        return []
    found = []
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if "loconet" in service.get("image", ""):
            found.append((f"compose.yaml:{name}", service["command"]))
    for path in MANIFESTS:
        for document in _documents(path):
            template = document.get("spec", {}).get("template", {}).get("spec", {})
            for container in template.get("containers", []):
                found.append((f"{path.name}:{container['name']}", _expand(container)))
    return found


def _expand(container: dict) -> list[str]:
    """The container's args with each $(VAR) replaced as kubelet would; an undefined VAR fails the test."""
    values = {}
    for env in container.get("env", []):
        field = env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        values[env["name"]] = FIELD_EXAMPLES[field] if field else env.get("value", "")
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg) for arg in container["args"]]


def test_the_manifests_are_where_the_docs_say():
    assert [p.name for p in MANIFESTS] == ["coordinator.yaml", "peers.yaml", "policies.yaml", "secret.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_parses_into_named_kubernetes_objects(path):
    documents = _documents(path)
    assert documents
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document)
        assert document["metadata"]["name"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_passes_strict_validation(path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for document in _documents(path):
        # Raises ValidationError on a wrong type or, strict, an unknown field.
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_the_image_runs_as_a_non_root_user():
    users = [line.split(None, 1)[1].strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()
             if line.startswith("USER ")]
    assert users, "the Dockerfile sets no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("0", "root")
    # Numeric, so Kubernetes' runAsNonRoot can verify it, and the manifests' runAsUser is that user.
    assert users[-1].split(":")[0].isdigit()
    for path in ("coordinator.yaml", "peers.yaml"):
        (workload,) = [d for d in _documents(DEPLOY / "k8s" / path) if d["kind"] in ("Deployment", "StatefulSet")]
        context = workload["spec"]["template"]["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True
        assert str(context["runAsUser"]) == users[-1].split(":")[0]


def test_the_wheels_and_secrets_stay_out_of_git():
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert ".wheels/" in ignored and "secrets/" in ignored


@pytest.mark.parametrize("args", [pytest.param(args, id=where) for where, args in _loconet_commands()])
def test_every_command_in_the_deployment_is_one_the_cli_accepts(args):
    # argparse exits (SystemExit 2) on an unknown flag or a value of the wrong type.
    build_parser(args[0]).parse_args(args)


def _container_skip_reason() -> str | None:
    if sys.platform != "linux":
        return "podman containers need Linux"
    if os.geteuid() != 0:
        return "needs root: rootful podman and debootstrap"
    missing = [tool for tool in CONTAINER_TOOLS if shutil.which(tool) is None]
    if missing and shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install them"
    return None


@pytest.mark.containers
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)
def test_the_compose_deployment_survives_a_killed_peer_and_the_manifests_run(capsys):
    reason = _container_skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, PYTHON=sys.executable)
    process = subprocess.Popen([str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = process.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the script remove its containers, volumes and network before it exits.
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"deploy/test-containers.sh ran over {SCRIPT_TIMEOUT_S} s:\n{stderr[-3000:]}")
    if process.returncode == 77:
        pytest.skip(json.loads(stdout)["skipped"])
    assert "{" in stdout, f"no summary (exit {process.returncode}):\n{stderr[-3000:]}"
    summary = json.loads(stdout[stdout.index("{"):])
    with capsys.disabled():  # the figures, in CI's log (BENCHMARKS.md records them)
        print(json.dumps(summary, sort_keys=True))
    assert summary["failures"] == [], stderr[-3000:]
    assert process.returncode == 0
    assert summary["rounds_before_kill"] >= 3
    assert summary["rounds_after_kill"] >= 2
    assert summary["peers_finished"] == ["peer1", "peer2"]
    assert summary["identical"] is True
    assert summary["container_healthcheck"] is True
    assert summary["manifests_valid"] is True
    assert summary["kube_play_healthy"] is True
    assert summary["image_user"].split(":")[0] not in ("0", "root")
    # With the run token and mutual TLS, unless LOCONET_DEPLOY_SECURE=0 asked for a run without them.
    assert summary["secure"] is (os.environ.get("LOCONET_DEPLOY_SECURE") != "0")


def test_the_health_check_refuses_a_malformed_timeout_from_its_environment_in_one_line():
    # It ended in a traceback (a probe saw only "unhealthy").
    import os
    import subprocess
    import sys

    env = {**os.environ, "LOCONET_HEALTH_TIMEOUT": "abc"}
    result = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], capture_output=True, text=True,
                            env=env, timeout=60, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "loconet-health: error: argument --timeout: invalid float value: 'abc'"
    )
