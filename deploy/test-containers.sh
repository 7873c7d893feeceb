#!/usr/bin/env bash
# Tests deploy/ end to end with podman on this machine (../shared/CONTAINERS.md says what works here):
#
#   1. podman, runc, podman-compose and debootstrap (installed with apt when missing and possible);
#   2. a containers.conf of its own (CONTAINERS_CONF, in a work folder; /etc is left alone);
#   3. when missing, a stand-in for python:3.11-slim: Debian bookworm with its python3, made with
#      debootstrap (no registry is reachable here), so deploy/Dockerfile builds unchanged;
#   4. loconet and its dependencies as wheels in deploy/.wheels, then the image, built with no network
#      (skipped when an image of the same inputs exists);
#   5. compose: a coordinator and 3 peers train a short run, with the run token and mutual TLS (certificates
#      from `loconet certs` in the image); once rounds commit, one peer container is SIGKILLed; the run must
#      go on committing with the other two, and the peers that finish must hold identical parameters (their
#      JSON events, read from the container logs);
#   6. kubernetes-validate --strict of deploy/k8s/*.yaml;
#   7. podman kube play of the coordinator's manifest, health-checked, then kube down.
#
# It prints one JSON summary on stdout (progress goes to stderr) and exits 0 when every check holds,
# 1 when one does not, 77 when it cannot run here (the reason is in the JSON's "skipped").
# It removes what it started (containers, volumes, network, work folder) on every exit; the images stay,
# so a second run skips steps 3 and 4. LOCONET_CONTAINERS_KEEP=1 keeps the work folder and its logs.
#
# Environment: PYTHON (the interpreter that wheels loconet; default python3), LOCONET_CONTAINERS_BUDGET_S
# (the whole budget, default 600), LOCONET_CONTAINERS_PREPARE_ONLY=1 (stop once the tools, the base image, the
# wheels and the image are ready: .ci/run does that beside the test suite), LOCONET_DEPLOY_SECURE (1: token and TLS, 0: without them, auto (default):
# with them when the image has `loconet certs`), LOCONET_TORCH (default torch==2.13.0), LOCONET_DEBIAN_MIRROR.
set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$DEPLOY")
PYTHON=${PYTHON:-python3}
BUDGET_S=${LOCONET_CONTAINERS_BUDGET_S:-600}
SECURE=${LOCONET_DEPLOY_SECURE:-auto}
TORCH=${LOCONET_TORCH:-torch==2.13.0}
IMAGE=localhost/loconet:test
PY_IMAGE=docker.io/library/python:3.11-slim
PROJECT=loconettest$$
KILLED=peer3
SURVIVORS=(peer1 peer2)
ROUNDS_BEFORE_KILL=3
KIT=("$PYTHON" "$DEPLOY/testkit.py")
T0=$(date +%s.%N)

log() { echo "test-containers: $*" >&2; }
since() { echo "$(date +%s.%N) $1" | awk '{printf "%.1f", $1 - $2}'; }
remaining() { echo "$(date +%s.%N) $T0 $BUDGET_S" | awk '{r = $3 - ($1 - $2); printf "%d", (r > 0 ? r : 0)}'; }
skip() {
    log "skipped: $1"
    printf '{"skipped": "%s"}\n' "$1"
    exit 77
}
FAILURES=()
fail() {
    log "FAILED: $*"
    FAILURES+=("$*")
}
# Give up (exit 1) with the tail of a log.
abort() {
    log "FAILED: $1"
    [ -z "${2:-}" ] || tail -20 "$2" >&2
    exit 1
}
# Run a command within what is left of the budget (and at most $1 seconds). In the background, so that a
# SIGTERM or Ctrl-C is handled at once (bash runs traps only between commands), and cleanup stops it.
CHILDREN=()
bounded() {
    local limit=$1 left
    shift
    left=$(remaining)
    [ "$left" -gt 0 ] || { log "out of time (budget ${BUDGET_S} s) before: $*"; return 124; }
    [ "$limit" -lt "$left" ] || limit=$left
    timeout --kill-after=10 "$limit" "$@" &
    CHILDREN+=($!)
    wait $!
}
declare -A PHASE=()
PHASE_T=$T0
phase_done() {  # the seconds since the previous phase ended, under $1
    PHASE[$1]=$(since "$PHASE_T")
    PHASE_T=$(date +%s.%N)
    log "$1: ${PHASE[$1]} s"
}
json_field() { "$PYTHON" -c "import json, sys; print(json.loads(sys.argv[1] or '{}').get('$1', ''))" "$2"; }

# -- 1. tools --------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || skip "needs root: rootful podman and debootstrap (run as root, or in CI)"
need=()
for tool in podman runc podman-compose debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
[ -x /usr/libexec/podman/catatonit ] || need+=(catatonit)   # compose's init: true
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || skip "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]} with apt"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; } \
        || skip "missing ${need[*]}, and apt-get could not install them"
fi
"$PYTHON" -c "import kubernetes_validate, yaml" 2>/dev/null \
    || "$PYTHON" -m pip install --quiet kubernetes-validate >&2 \
    || skip "kubernetes-validate is not installed and pip could not install it for $PYTHON"
phase_done tools

# -- 2. podman's configuration, in a work folder; cleanup on every exit ----------------------------
WORK=$(mktemp -d /tmp/loconet-containers.XXXXXX)
mkdir -p "$WORK/logs"
COMPOSE=""
KUBE_FILE=""
KUBE_VOLUMES=()
compose_down() {
    podman-compose -p "$PROJECT" -f "$COMPOSE" down -v >/dev/null 2>&1
    # podman-compose 1.0.3 can leave the project's containers, volumes and network behind.
    podman ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman rm -f >/dev/null 2>&1
    podman volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r podman volume rm -f \
        >/dev/null 2>&1
    podman network rm -f "${PROJECT}_default" >/dev/null 2>&1
    COMPOSE=""
}
KUBE_NETWORK=""
kube_down() {
    podman kube down "$KUBE_FILE" >/dev/null 2>&1
    local volume
    for volume in ${KUBE_VOLUMES[@]+"${KUBE_VOLUMES[@]}"}; do podman volume rm -f "$volume" >/dev/null 2>&1; done
    [ -z "$KUBE_NETWORK" ] || podman network rm -f "$KUBE_NETWORK" >/dev/null 2>&1
    KUBE_FILE=""
}
cleanup() {
    local code=$? pid
    set +e
    for pid in ${CHILDREN[@]+"${CHILDREN[@]}"}; do kill -TERM "$pid" 2>/dev/null && wait "$pid"; done
    [ -z "$COMPOSE" ] || compose_down
    [ -z "$KUBE_FILE" ] || kube_down
    if [ "${LOCONET_CONTAINERS_KEEP:-0}" = 1 ] || { [ "$code" -ne 0 ] && [ "$code" -ne 77 ]; }; then
        log "work folder (logs, files played) kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

NOFILE=$(ulimit -Hn)
NPROC=$(ulimit -Hu)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
{ [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; } && NPROC=32768
cat >"$WORK/containers.conf" <<CONF
# crun cannot raise RLIMIT_NOFILE here (root lacks CAP_SYS_RESOURCE) and refuses hybrid cgroups; runc works.
[containers]
default_ulimits = ["nofile=${NOFILE}:${NOFILE}", "nproc=${NPROC}:${NPROC}"]
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$WORK/containers.conf"   # podman-compose inherits it
phase_done configure

# -- 3. the python:3.11-slim stand-in (while the wheels are made) ----------------------------------
mkdir -p "$DEPLOY/.wheels"
extra=()
[ -n "${LOCONET_IMAGE_PACKAGES:-}" ] && read -ra extra <<<"$LOCONET_IMAGE_PACKAGES"
bounded 300 "$PYTHON" -m pip wheel --quiet --wheel-dir "$DEPLOY/.wheels" "$ROOT" "$TORCH" ${extra[@]+"${extra[@]}"} \
    >"$WORK/logs/wheels.log" 2>&1 &
WHEELS_PID=$!
CHILDREN+=("$WHEELS_PID")
if ! podman image exists "$PY_IMAGE"; then
    # The Debian mirror apt uses here (the first .../debian URI of its sources).
    mirror=${LOCONET_DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -E '^[[:space:]]*(URIs:|deb[[:space:]])' \
        | grep -oE 'https?://[^[:space:]]+/debian/?([[:space:]]|$)' | head -1 | tr -d '[:space:]' || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    log "no $PY_IMAGE: making a stand-in with debootstrap (Debian's python3, from $mirror)"
    rootfs="$WORK/rootfs"
    bounded 300 debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$WORK/logs/debootstrap.log" 2>&1 \
        || abort "debootstrap" "$WORK/logs/debootstrap.log"
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/lib/python3.11/EXTERNALLY-MANAGED
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    : >"$rootfs/etc/resolv.conf"
    tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' \
        --message "stand-in for python:3.11-slim made by deploy/test-containers.sh" - "$PY_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi
phase_done base_image
wait "$WHEELS_PID" || abort "pip wheel" "$WORK/logs/wheels.log"
phase_done wheels

# -- 4. the image ----------------------------------------------------------------------------------
KEY=$(json_field image_key "$("${KIT[@]}" image-key "$DEPLOY/.wheels" "$DEPLOY/Dockerfile" "$DEPLOY/healthcheck.py")")
BUILT=false
if [ "$(podman image inspect --format '{{index .Labels "org.loconet.inputs"}}' "$IMAGE" 2>/dev/null)" != "$KEY" ]; then
    old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    packages=loconet
    [ ${#extra[@]} -eq 0 ] || packages="loconet ${extra[*]}"
    # --layers=false: one commit at the end; the inputs' digest, not layer caching, decides whether to build.
    bounded 400 podman build --pull=never --network=none --format docker --layers=false \
        --build-arg "PACKAGES=$packages" --label "org.loconet.inputs=$KEY" -t "$IMAGE" "$DEPLOY" \
        >"$WORK/logs/build.log" 2>&1 || abort "podman build" "$WORK/logs/build.log"
    [ -z "$old" ] || podman rmi "$old" >/dev/null 2>&1 || true
    BUILT=true
fi
IMAGE_MB=$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f", $1 / 1e6}')
BASE_MB=$(podman image inspect --format '{{.Size}}' "$PY_IMAGE" | awk '{printf "%.0f", $1 / 1e6}')
IMAGE_USER=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
log "image $IMAGE: ${IMAGE_MB} MB (${BASE_MB} MB of it the base image), user $IMAGE_USER"
case $IMAGE_USER in 0 | 0:* | root | root:* | "") fail "the image runs as root (user '$IMAGE_USER')" ;; esac
phase_done image_build
if [ "${LOCONET_CONTAINERS_PREPARE_ONLY:-0}" = 1 ]; then
    # CI starts this part (downloads, unpacking, the build) beside the test suite; the test proper runs after.
    log "prepared the tools, the base image, the wheels and the image"
    exit 0
fi

# -- 5. compose: 3 peers, one SIGKILLed ------------------------------------------------------------
if [ "$SECURE" = auto ]; then
    SECURE=0
    podman run --rm --network=none "$IMAGE" certs --help >/dev/null 2>&1 && SECURE=1
fi
STATUS_AUTH=()
SECRETS=""
SCHEME=http
if [ "$SECURE" = 1 ]; then
    SECRETS="$WORK/secrets"
    mkdir -p "$SECRETS"
    podman run --rm --user 0 --network=none -v "$SECRETS:/out" "$IMAGE" certs --out /out \
        --host coordinator --host peer1 --host peer2 --host peer3 --host loconet-coordinator \
        >"$WORK/logs/certs.log" 2>&1 || abort "loconet certs" "$WORK/logs/certs.log"
    "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$SECRETS/token"
    "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$SECRETS/dashboard-token"
    rm -f "$SECRETS/ca.key"   # nothing here signs certificates later
    chown -R 10001:10001 "$SECRETS"
    chmod 0400 "$SECRETS"/*
    STATUS_AUTH=(--token-file "$SECRETS/dashboard-token" --ca-file "$SECRETS/ca.pem")
    SCHEME=https
    COMPOSE_FILE="$DEPLOY/compose.yaml"
else
    # Until the image has every security flag: the same file without them.
    COMPOSE_FILE="$WORK/compose.yaml"
    "${KIT[@]}" compose-file "$DEPLOY/compose.yaml" "$COMPOSE_FILE" --no-secure >/dev/null
fi
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DASHBOARD_PORT=$(free_port)
URL=$SCHEME://127.0.0.1:$DASHBOARD_PORT
export LOCONET_IMAGE=$IMAGE LOCONET_DASHBOARD_PORT=$DASHBOARD_PORT LOCONET_SECRETS=${SECRETS:-/nonexistent}
export LOCONET_PEER_RESTART=no   # the killed peer stays down: the test is that the run goes on without it
COMPOSE=$COMPOSE_FILE
bounded 120 podman-compose -p "$PROJECT" -f "$COMPOSE" up -d coordinator peer1 peer2 peer3 \
    >"$WORK/logs/compose-up.log" 2>&1 || abort "podman-compose up" "$WORK/logs/compose-up.log"
phase_done compose_up

container() {  # the container of compose service $1
    podman ps -a --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}
running() { [ "$(podman inspect --format '{{.State.Status}}' "$(container "$1")" 2>/dev/null)" = running ]; }
collect_logs() {
    local service name
    for service in coordinator peer1 peer2 peer3; do
        name=$(container "$service")
        [ -n "$name" ] || continue
        podman logs "$name" >"$WORK/logs/$service.events" 2>"$WORK/logs/$service.log" || true
    done
}
status() { "${KIT[@]}" status "$URL" ${STATUS_AUTH[@]+"${STATUS_AUTH[@]}"} 2>/dev/null || echo '{}'; }
# Wait until $1 rounds committed, within $2 seconds, while the services after them run; the status then.
wait_rounds() {
    local want=$1 deadline=$(($(date +%s) + $2)) service current
    shift 2
    while [ "$(date +%s)" -lt "$deadline" ] && [ "$(remaining)" -gt 30 ]; do
        current=$(status)
        [ "$(json_field rounds_committed "$current")" -ge "$want" ] 2>/dev/null && { echo "$current"; return 0; }
        for service in "$@"; do
            running "$service" || { log "$service is not running"; return 1; }
        done
        sleep 1
    done
    log "fewer than $want rounds committed in time: $(status)"
    return 1
}

BEFORE=$(wait_rounds "$ROUNDS_BEFORE_KILL" 180 coordinator peer1 peer2 peer3) \
    || { collect_logs; abort "no rounds committed (logs in $WORK/logs)"; }
phase_done first_rounds
HEALTHY=false
if podman healthcheck run "$(container coordinator)" >/dev/null 2>&1 \
    && podman healthcheck run "$(container peer1)" >/dev/null 2>&1; then
    HEALTHY=true
else
    fail "a container health check (loconet-health) failed"
fi
AT_KILL=$(json_field rounds_committed "$(status)")
log "$AT_KILL rounds committed; SIGKILL $KILLED"
podman kill -s KILL "$(container "$KILLED")" >/dev/null
KILLED_AT=$(date +%s.%N)
RECOVERY_S=null
if wait_rounds $((AT_KILL + 2)) 120 coordinator "${SURVIVORS[@]}" >/dev/null; then
    RECOVERY_S=$(since "$KILLED_AT")
else
    fail "the run did not commit 2 more rounds after the kill"
fi
phase_done kill_recovery

# The survivors train to the end of their steps and exit.
for service in "${SURVIVORS[@]}"; do
    while running "$service" && [ "$(remaining)" -gt 60 ]; do sleep 1; done
    code=$(podman inspect --format '{{.State.ExitCode}}' "$(container "$service")")
    running "$service" && fail "$service still running near the end of the budget"
    running "$service" || [ "$code" = 0 ] || fail "$service exited with $code"
done
FINAL=$(status)
collect_logs
PEERS=$("${KIT[@]}" events "$WORK/logs/peer1.events" "$WORK/logs/peer2.events" "$WORK/logs/$KILLED.events") \
    || PEERS='{}'
phase_done run_end
compose_down
phase_done compose_down

# -- 6. the manifests ------------------------------------------------------------------------------
VALID=true
"$PYTHON" -m kubernetes_validate --strict --quiet "$DEPLOY"/k8s/*.yaml >&2 || { VALID=false; fail "kubernetes-validate"; }
phase_done validate

# -- 7. podman kube play of the coordinator --------------------------------------------------------
KUBE_FILE="$WORK/coordinator.yaml"
GRPC_PORT=$(free_port)
METRICS_PORT=$(free_port)
KUBE=$("${KIT[@]}" kube-file "$DEPLOY/k8s/coordinator.yaml" "$KUBE_FILE" --image "$IMAGE" \
    --port "grpc=$GRPC_PORT" --port "metrics=$METRICS_PORT" --prefix "$PROJECT" ${SECRETS:+--secrets "$SECRETS"})
mapfile -t KUBE_VOLUMES < <("$PYTHON" -c 'import json, sys; print(*json.loads(sys.argv[1])["volumes"], sep="\n")' "$KUBE")
KUBE_NETWORK=podman-default-kube-network
podman network exists "$KUBE_NETWORK" && KUBE_NETWORK=""   # not ours to remove
KUBE_HEALTHY=false
if bounded 120 podman kube play "$KUBE_FILE" >"$WORK/logs/kube-play.log" 2>&1; then
    pod_container=$(podman ps --format '{{.Names}}' | grep -E '^loconet-coordinator-pod-[0-9]+-coordinator$' | head -1 || true)
    for _ in $(seq 60); do
        if [ -n "$pod_container" ] && podman exec "$pod_container" loconet-health >/dev/null 2>&1 \
            && "${KIT[@]}" get "$SCHEME://127.0.0.1:$METRICS_PORT/healthz" \
                ${SECRETS:+--ca-file "$SECRETS/ca.pem"} >/dev/null 2>&1; then
            KUBE_HEALTHY=true
            break
        fi
        sleep 0.5
    done
    [ "$KUBE_HEALTHY" = true ] || { podman logs "$pod_container" >"$WORK/logs/kube-coordinator.log" 2>&1
        fail "kube play: the coordinator did not become healthy (logs in $WORK/logs)"; }
else
    fail "podman kube play (see $WORK/logs/kube-play.log)"
fi
kube_down
phase_done kube_play

# -- checks and summary ----------------------------------------------------------------------------
[ "$(json_field identical "$PEERS")" = True ] || fail "the peers that finished do not report identical parameters"
[ "$(json_field finished "$PEERS")" = "['peer1', 'peer2']" ] \
    || fail "peer1 and peer2 should finish and $KILLED not; finished: $(json_field finished "$PEERS")"
phases=$(for k in "${!PHASE[@]}"; do printf '"%s": %s\n' "$k" "${PHASE[$k]}"; done | paste -sd, -)
"$PYTHON" - "$BEFORE" "$FINAL" "$PEERS" ${FAILURES[@]+"${FAILURES[@]}"} <<EOF
import json, sys
before, final, peers = (json.loads(a or "{}") for a in sys.argv[1:4])
print(json.dumps({
    "secure": $([ "$SECURE" = 1 ] && echo True || echo False),
    "image": "$IMAGE", "image_mb": $IMAGE_MB, "base_image_mb": $BASE_MB, "image_user": "$IMAGE_USER",
    "image_built": $([ "$BUILT" = true ] && echo True || echo False),
    "rounds_before_kill": $AT_KILL,
    "rounds_after_kill": final.get("rounds_committed", 0) - $AT_KILL,
    "rounds_aborted": final.get("rounds_aborted", 0),
    "recovery_s": $RECOVERY_S,
    "killed": "$KILLED",
    "peers_finished": peers.get("finished", []),
    "identical": peers.get("identical", False),
    "identical_at_round": peers.get("identical_at_round"),
    "committed_per_peer": peers.get("committed_per_peer", {}),
    "final_eval_loss": peers.get("final_eval_loss", {}),
    "container_healthcheck": $([ "$HEALTHY" = true ] && echo True || echo False),
    "manifests_valid": $([ "$VALID" = true ] && echo True || echo False),
    "kube_play_healthy": $([ "$KUBE_HEALTHY" = true ] && echo True || echo False),
    "seconds": {$phases},
    "total_s": $(since "$T0"),
    "failures": sys.argv[4:],
}, indent=2, sort_keys=True))
EOF
[ ${#FAILURES[@]} -eq 0 ] || exit 1
