#!/usr/bin/env bash
# Smoke test of the Docker images and compose.yaml on a machine without any image registry.
#
# What it does, as root, on Debian (bookworm):
#   1. installs Debian's docker.io, docker-compose (or uses `docker compose`), debootstrap and curl
#   2. starts its own dockerd (own socket, exec-root and data-root; no docker0 bridge, no iptables
#      rules: --bridge=none --iptables=false); containers are reached only through 127.0.0.1
#   3. makes a local base image: debootstrap --variant=minbase bookworm + docker import, then a
#      python image on top of it (Debian's python3, python3-venv, python3-pip from the Debian mirror)
#   4. downloads the service's wheels on the host (pip download, cp311 manylinux x86_64) into
#      docker/wheels/serve
#   5. builds docker/service.Dockerfile with --network none (wheels + local base: no network at all)
#   6. checks the image (non-root, HEALTHCHECK, no torch, no compiler), validates compose.yaml and the
#      GPU override (docker compose -f compose.yaml -f compose.gpu.yaml config)
#   7. docker compose up; waits for /readyz and the container's health; posts a photo to /embed and
#      checks the answer; adds it to the gallery, restarts the service and finds it again (the
#      gallery index lives on the named volume)
#   8. tears everything down, also on failure: docker compose down -v, dockerd stopped by its PID,
#      leftover mounts, processes, network links and iptables rules of this run removed, and the
#      wheel folders (hard links into the cache) and temporary model it put into the working tree
#
# The debootstrap tarball, the wheels, the temporary model and the daemon's data-root (with the
# images, so that a rerun reuses them) are cached in $DINO_DOCKER_CACHE (default ~/.cache/dino-docker).
#
# Usage: docker/smoke_test.sh [--temp-model] [--with-train] [--with-gpu-image] [--model NAME] [--fresh] [--port N]
#   --with-train      also build the training image (downloads torch with CUDA: several GB)
#   --with-gpu-image  also build the GPU service image (CUDA_LIBS=true, ~2 GB of CUDA wheels); it is
#                     checked but not run (no GPU needed)
#   --temp-model      when models/ holds no model folder, export a tiny temporary model (vit_tiny,
#                     64 px, random weights; needs the train extra in .venv) into docker/smoke-models/
#   --model NAME      the model folder of models/ to ship (build argument MODEL; default: all of them,
#                     the first one is served)
#   --fresh           delete the cache first (base tarball, wheels, images): a full run from scratch
#   --port N          host port for the service (default 8000, or a free one when 8000 is taken)
# Environment: DINO_DOCKER_CACHE, DINO_DEBIAN_MIRROR (default http://deb.debian.org/debian),
#   DINO_WHEEL_GLIBC_MINOR (newest manylinux_2_N tag of the downloaded wheels; default 36, bookworm),
#   PYTHON (host python with pip, for pip download; default python3), DINO_SMOKE_PHOTO (a JPEG/PNG
#   to post; default: matplotlib's sample photo from .venv, else a generated image),
#   DOCKER_BUILDKIT (0 or 1; default 0: the classic builder of Debian's docker.io).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DINO_DOCKER_CACHE:-$HOME/.cache/dino-docker}
RUN_DIR=/run/dino-docker-smoke
DATA_ROOT=$CACHE/docker
LOG_DIR=$CACHE/logs
MIRROR=${DINO_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}
DOCKER=/usr/bin/docker                # Debian's client, the same release as the daemon started here
DOCKERD=/usr/sbin/dockerd
PY_VERSION=3.11                       # python of the images (Debian bookworm's python3, python:3.11-slim)
BASE_TAG=dino-debian:bookworm
PY_TAG=dino-python:$PY_VERSION
SERVICE_TAG=dino-service:latest
SERVICE_GPU_TAG=dino-service:gpu
TRAIN_TAG=dino-train:latest
PROJECT=dino-smoke
# created by dockerd/containerd/runc outside the exec-root (shim sockets, plugin sockets, runc state)
RUN_PATHS="/run/containerd /run/docker /run/runc"

WITH_TRAIN=0 WITH_GPU=0 TEMP_MODEL=0 FRESH=0 MODEL="" PORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --with-train) WITH_TRAIN=1 ;;
        --with-gpu-image) WITH_GPU=1 ;;
        --temp-model) TEMP_MODEL=1 ;;
        --model) MODEL=${2:?--model needs a name}; shift ;;
        --fresh) FRESH=1 ;;
        --port) PORT=${2:?--port needs a number}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "smoke_test.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# ---------------------------------------------------------------------------------------------
# progress and timings
# ---------------------------------------------------------------------------------------------
PHASES=()
PHASE="" PHASE_T0=0
T0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '    %s\n' "$*"; }
end_phase() {   # end_phase [status]
    if [ -n "$PHASE" ]; then
        PHASES+=("$(printf '%-34s %7ss  %s' "$PHASE" "$(elapsed "$PHASE_T0")" "${1:-ok}")")
        PHASE=""
    fi
}
phase() {
    end_phase
    PHASE=$1 PHASE_T0=$(date +%s.%N)
    printf '\n==> [%s +%ss] %s\n' "$(date +%T)" "$(elapsed "$T0")" "$PHASE"
}
die() { echo "ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# teardown (runs on success, failure and interruption)
# ---------------------------------------------------------------------------------------------
DOCKERD_PID="" COMPOSE_UP=0 LINKS_BEFORE="" IPT_BEFORE="" IP_FORWARD_BEFORE="" RUN_PATHS_BEFORE=""
COMPOSE=()
IN_REPO=()   # folders this run put into the working tree (wheels, temporary model): removed at the end
WORK=$(mktemp -d /tmp/dino-smoke.XXXXXX)

compose() {
    "${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$REPO" -f "$REPO/compose.yaml" "$@"
}

# processes whose command line names this run's exec-root (containerd, shims): ours by construction
our_pids() {
    local pid
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [ "$pid" = "$$" ] && continue
        { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qF "$RUN_DIR/" && echo "$pid"
    done
    return 0
}

stop_dockerd() {   # stop_dockerd PID
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "dockerd $pid did not stop in 30 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
    log "dockerd (pid $pid) stopped"
}

iptables_state() {   # the rules of the filter and nat tables, if iptables is installed
    if command -v iptables-save >/dev/null 2>&1; then
        { iptables-save -t filter; iptables-save -t nat; } 2>/dev/null | grep -E '^(\*|:|-A)' || true
    fi
}

remove_new_iptables_rules() {   # delete the rules and chains that appeared since IPT_BEFORE
    command -v iptables-save >/dev/null 2>&1 || return 0
    local table line chain
    for table in filter nat; do
        local before after
        before=$(printf '%s\n' "$IPT_BEFORE" | awk -v t="*$table" '/^\*/ { on = ($0 == t); next } on')
        after=$(iptables-save -t "$table" 2>/dev/null | grep -E '^(:|-A)' || true)
        # rules first (last added first), then the chains
        printf '%s\n' "$after" | grep '^-A' | grep -vxF -f <(printf '%s\n' "$before" | grep '^-A' || true) | tac |
            while read -r line; do
                [ -n "$line" ] || continue
                log "iptables -t $table: removing rule ${line}"
                eval "iptables -t $table -D ${line#-A }" || true
            done
        printf '%s\n' "$after" | grep '^:' | awk '{ print $1 }' | sed 's/^://' |
            grep -vxF -f <(printf '%s\n' "$before" | grep '^:' | awk '{ print $1 }' | sed 's/^://' || true) |
            while read -r chain; do
                [ -n "$chain" ] || continue
                log "iptables -t $table: removing chain $chain"
                iptables -t "$table" -F "$chain" || true
                iptables -t "$table" -X "$chain" || true
            done
    done
}

unmount_under() {   # unmount everything mounted below the given directories (deepest first)
    local dir target
    for dir in "$@"; do
        [ -n "$dir" ] || continue
        awk '{ print $5 }' /proc/self/mountinfo | grep -E "^${dir}(/|$)" | sort -r |
            while read -r target; do umount -l "$target" 2>/dev/null && log "unmounted $target"; done || true
    done
    return 0
}

teardown() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [ $rc -ne 0 ] && end_phase "FAILED"
    phase "teardown"
    if [ $COMPOSE_UP -eq 1 ]; then
        if [ $rc -ne 0 ]; then
            log "service logs (last 60 lines):"
            compose logs --no-color --tail 60 service 2>&1 | sed 's/^/      /'
        fi
        compose down -v --remove-orphans --timeout 20 2>&1 | sed 's/^/    /'
    fi
    if [ -n "$DOCKERD_PID" ]; then
        if [ $rc -ne 0 ] && [ -f "$LOG_DIR/dockerd.log" ]; then
            log "dockerd log (last 20 lines):"; tail -n 20 "$LOG_DIR/dockerd.log" | sed 's/^/      /'
        fi
        stop_dockerd "$DOCKERD_PID"
    fi
    # containerd and shims started by that dockerd, if any survived it
    local pid
    for pid in $(our_pids); do log "stopping leftover process $pid: $({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | cut -c1-100)"; kill -TERM "$pid" 2>/dev/null; done
    sleep 0.5
    for pid in $(our_pids); do kill -KILL "$pid" 2>/dev/null; done
    unmount_under "$RUN_DIR" "$DATA_ROOT" "$CACHE/base/rootfs"
    # network: links (bridges, veths) and iptables rules that appeared during this run
    if [ -n "$LINKS_BEFORE" ]; then
        local link
        for link in $(ip -o link show | awk -F': ' '{ print $2 }' | sed 's/@.*//'); do
            if ! grep -qxF "$link" <<<"$LINKS_BEFORE" && [[ $link =~ ^(docker0|br-[0-9a-f]{12}|veth[0-9a-f]+)$ ]]; then
                ip link delete "$link" && log "deleted network link $link"
            fi
        done
        remove_new_iptables_rules
        if [ -n "$IP_FORWARD_BEFORE" ] && [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$IP_FORWARD_BEFORE" ]; then
            echo "$IP_FORWARD_BEFORE" > /proc/sys/net/ipv4/ip_forward && log "net.ipv4.ip_forward restored to $IP_FORWARD_BEFORE"
        fi
    fi
    # runtime directories the daemon created outside its exec-root (containerd's shim sockets)
    local path
    for path in $RUN_PATHS; do
        if [ -e "$path" ] && ! grep -qxF "$path" <<<"$RUN_PATHS_BEFORE" && [ -n "$DOCKERD_PID" ]; then
            rm -rf "$path" && log "removed $path"
        fi
    done
    rm -rf "$RUN_DIR" "$CACHE/base/rootfs" "$WORK"
    # the working tree as it was: the wheel folders (hard links into the cache) and the temporary model
    if [ ${#IN_REPO[@]} -gt 0 ]; then
        rm -rf "${IN_REPO[@]}"
        rmdir "$REPO/docker/wheels" 2>/dev/null
        log "removed from the working tree: ${IN_REPO[*]#"$REPO"/}"
    fi
    end_phase
    printf '\n==> summary (%s, total %ss)\n' "$(date +%T)" "$(elapsed "$T0")"
    printf '    %s\n' "${PHASES[@]}"
    if [ $rc -eq 0 ]; then
        printf '\nSMOKE TEST PASSED\n'
    else
        printf '\nSMOKE TEST FAILED (exit %s)\n' "$rc"
    fi
    exit $rc
}
trap teardown EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
phase "preflight"
# ---------------------------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "run as root (it starts dockerd and debootstrap)"
# one smoke test at a time on a machine (they share the daemon's runtime directory and the cache)
exec 9>/run/lock/dino-docker-smoke.lock
if ! flock -n 9; then log "another smoke test is running: waiting for it (up to 30 min)"; flock -w 1800 9 || die "still locked"; fi
[ "$(uname -m)" = x86_64 ] || die "x86_64 only (the wheels are manylinux x86_64)"
log "repository: $REPO"
log "cache:      $CACHE"
# a previous run that was killed may have left its daemon behind: stop it first (rerunnable)
if [ -f "$RUN_DIR/dockerd.pid" ]; then
    old=$(cat "$RUN_DIR/dockerd.pid")
    if kill -0 "$old" 2>/dev/null && { tr '\0' ' ' < "/proc/$old/cmdline"; } 2>/dev/null | grep -qF "$RUN_DIR"; then
        log "stopping the dockerd of a previous run (pid $old)"
        stop_dockerd "$old"
    fi
fi
for pid in $(our_pids); do log "stopping leftover process $pid of a previous run"; kill -KILL "$pid" 2>/dev/null || true; done
unmount_under "$RUN_DIR" "$DATA_ROOT" "$CACHE/base/rootfs"
if [ -f "$RUN_DIR/run-paths-before" ]; then   # that run's daemon created these outside its exec-root
    for path in $RUN_PATHS; do
        if [ -e "$path" ] && ! grep -qxF "$path" "$RUN_DIR/run-paths-before"; then rm -rf "$path"; log "removed $path (previous run)"; fi
    done
fi
rm -rf "$RUN_DIR" "$CACHE/base/rootfs"
if [ $FRESH -eq 1 ]; then log "--fresh: deleting $CACHE"; rm -rf "$CACHE"; fi
mkdir -p "$CACHE" "$LOG_DIR"

# which model folder gets baked in
MODELS_ARG=models
if ls "$REPO"/models/*/model.json >/dev/null 2>&1; then
    log "models/ holds: $(cd "$REPO/models" && ls -d */ | tr -d / | tr '\n' ' ')"
elif [ $TEMP_MODEL -eq 1 ]; then
    MODELS_ARG=docker/smoke-models
    log "models/ holds no model folder: --temp-model, a tiny temporary model goes into $MODELS_ARG/"
else
    die "models/ holds no model folder (models/NAME/model.json): add the default model (dino export / dino import), or rerun with --temp-model"
fi

# ---------------------------------------------------------------------------------------------
phase "packages (apt)"
# ---------------------------------------------------------------------------------------------
need=()
[ -x "$DOCKERD" ] && [ -x "$DOCKER" ] || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v curl >/dev/null || need+=(curl)
if ! "$DOCKER" compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then need+=(docker-compose); fi
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    # keep the packages' init scripts from starting a system-wide dockerd
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1; fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >"$LOG_DIR/apt.log" 2>&1 ||
        { tail -n 30 "$LOG_DIR/apt.log"; [ $made_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install failed"; }
    [ $made_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
else
    log "docker.io, debootstrap, curl and compose are installed"
fi
if "$DOCKER" compose version >/dev/null 2>&1; then COMPOSE=("$DOCKER" compose); else COMPOSE=(docker-compose); fi
log "docker:  $("$DOCKER" --version)"
log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -n 1))"

# ---------------------------------------------------------------------------------------------
phase "start dockerd"
# ---------------------------------------------------------------------------------------------
LINKS_BEFORE=$(ip -o link show | awk -F': ' '{ print $2 }' | sed 's/@.*//')
IPT_BEFORE=$(iptables_state)
IP_FORWARD_BEFORE=$(cat /proc/sys/net/ipv4/ip_forward)
RUN_PATHS_BEFORE=$(for p in $RUN_PATHS; do [ -e "$p" ] && echo "$p"; done; true)
mkdir -p "$RUN_DIR" "$DATA_ROOT"
printf '%s\n' "$RUN_PATHS_BEFORE" > "$RUN_DIR/run-paths-before"   # for the next run, should this one be killed
echo '{}' > "$RUN_DIR/daemon.json"       # ignore /etc/docker/daemon.json
export DOCKER_HOST=unix://$RUN_DIR/docker.sock
export DOCKER_CONFIG=$CACHE/docker-cli   # the client's config too: nothing written to ~/.docker
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
export COMPOSE_DOCKER_CLI_BUILD=0
"$DOCKERD" --config-file "$RUN_DIR/daemon.json" \
    --host "$DOCKER_HOST" --pidfile "$RUN_DIR/dockerd.pid" \
    --exec-root "$RUN_DIR/exec" --data-root "$DATA_ROOT" \
    --storage-driver overlay2 --bridge none --iptables=false --ip-forward=false --ip-masq=false \
    --log-level warn >"$LOG_DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
log "dockerd pid $DOCKERD_PID, socket $DOCKER_HOST, data-root $DATA_ROOT (log: $LOG_DIR/dockerd.log)"
for i in $(seq 1 120); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 30 "$LOG_DIR/dockerd.log" >&2; die "dockerd exited"; }
    sleep 0.5
done
"$DOCKER" version >/dev/null 2>&1 || die "dockerd did not answer within 60 s"
log "engine $("$DOCKER" version -f '{{.Server.Version}}'), storage driver $("$DOCKER" info -f '{{.Driver}}')"
# leftovers of an interrupted run (containers, the volume) go before the test starts
compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------------
phase "base image (debootstrap)"
# ---------------------------------------------------------------------------------------------
TARBALL=$CACHE/base/debian-bookworm-minbase.tar
if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    log "$BASE_TAG is in the daemon's cache"
else
    if [ -s "$TARBALL" ]; then
        log "using the cached $TARBALL"
    else
        log "debootstrap --variant=minbase bookworm from $MIRROR (log: $LOG_DIR/debootstrap.log)"
        mkdir -p "$CACHE/base"
        ROOTFS=$CACHE/base/rootfs
        debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$LOG_DIR/debootstrap.log" 2>&1 ||
            { tail -n 30 "$LOG_DIR/debootstrap.log" >&2; die "debootstrap failed"; }
        rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/tmp/*
        tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.part" .
        mv "$TARBALL.part" "$TARBALL"
        rm -rf "$ROOTFS"
        log "cached $TARBALL ($(du -h "$TARBALL" | cut -f1))"
    fi
    "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase bookworm" "$TARBALL" "$BASE_TAG" >/dev/null
    log "imported $BASE_TAG"
fi

# ---------------------------------------------------------------------------------------------
phase "python image"
# ---------------------------------------------------------------------------------------------
if "$DOCKER" image inspect "$PY_TAG" >/dev/null 2>&1; then
    log "$PY_TAG is in the daemon's cache"
else
    log "building $PY_TAG: Debian's python3 from the Debian mirror (the only step with network: the host's)"
    "$DOCKER" build --network host -t "$PY_TAG" - >"$LOG_DIR/python-image.log" 2>&1 <<EOF ||
FROM $BASE_TAG
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1
CMD ["python3"]
EOF
        { tail -n 30 "$LOG_DIR/python-image.log" >&2; die "building $PY_TAG failed"; }
fi
log "$PY_TAG: $("$DOCKER" run --rm --network none "$PY_TAG" python3 -c 'import sys, venv; print("python", sys.version.split()[0])')"

# ---------------------------------------------------------------------------------------------
# wheels: pip download on the host for the images' python (cp311, manylinux x86_64)
# ---------------------------------------------------------------------------------------------
# every manylinux tag up to the images' glibc (2.36: Debian bookworm; pip does not expand the list)
GLIBC_MINOR=${DINO_WHEEL_GLIBC_MINOR:-36}
PLATFORM_ARGS=()
for minor in $(seq "$GLIBC_MINOR" -1 5); do PLATFORM_ARGS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORM_ARGS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

requirements() {   # requirements EXTRA...: the project's requirements (and its build backend)
    "$PYTHON" - "$REPO/pyproject.toml" "$@" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
reqs = list(project["project"]["dependencies"])
for extra in sys.argv[2:]:
    reqs += project["project"]["optional-dependencies"][extra]
reqs += project["build-system"]["requires"]
print("\n".join(reqs))
EOF
}

wheels() {   # wheels NAME REQUIREMENT...: cached download, linked to docker/wheels/NAME
    local name=$1; shift
    local key cached target
    key=$(printf '%s\n' "$@" "$PY_VERSION" "${PLATFORM_ARGS[@]}" | sha256sum | cut -c1-12)
    cached=$CACHE/wheels/$name-$key
    target=$REPO/docker/wheels/$name
    if [ -f "$cached/.complete" ]; then
        log "$name: cached in $cached"
    else
        log "$name: pip download $* (log: $LOG_DIR/pip-$name.log)"
        rm -rf "$cached"; mkdir -p "$cached"
        "$PYTHON" -m pip download --disable-pip-version-check --dest "$cached" --only-binary=:all: \
            --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}" --abi abi3 --abi none \
            "${PLATFORM_ARGS[@]}" "$@" >"$LOG_DIR/pip-$name.log" 2>&1 ||
            { grep -v 'is ignored' "$LOG_DIR/pip-$name.log" | tail -n 20 >&2; die "pip download ($name) failed"; }
        touch "$cached/.complete"
        # older downloads of the same folder (other requirements) are not needed any more
        find "$CACHE/wheels" -mindepth 1 -maxdepth 1 -name "$name-*" ! -name "$name-$key" -exec rm -rf {} +
    fi
    rm -rf "$target"; mkdir -p "$(dirname "$target")"
    IN_REPO+=("$target")
    cp -al "$cached" "$target" 2>/dev/null || cp -a "$cached" "$target"
    rm -f "$target/.complete"
    log "$name: docker/wheels/$name: $(ls "$target" | wc -l) wheels, $(du -sh "$target" | cut -f1)"
}

phase "wheels (pip download)"
mapfile -t SERVE_REQS < <(requirements serve)
wheels serve "${SERVE_REQS[@]}"
if [ $WITH_GPU -eq 1 ]; then wheels serve-gpu "${SERVE_REQS[@]}" "onnxruntime-gpu[cuda,cudnn]"; fi
TORCH_PINS=$(sed -n 's/^TORCH_PINS *:= *//p' "$REPO/Makefile")
if [ $WITH_TRAIN -eq 1 ]; then
    mapfile -t TRAIN_REQS < <(requirements train)
    # shellcheck disable=SC2206
    wheels train "${TRAIN_REQS[@]}" $TORCH_PINS
fi

# ---------------------------------------------------------------------------------------------
phase "model"
# ---------------------------------------------------------------------------------------------
if [ "$MODELS_ARG" = docker/smoke-models ]; then
    TMP_MODEL=$CACHE/tmp-model/tmp
    if [ ! -f "$TMP_MODEL/model.json" ]; then
        TORCH_PY=${DINO_SMOKE_TORCH_PYTHON:-$REPO/.venv/bin/python}
        [ -x "$TORCH_PY" ] || die "--temp-model needs a python with the train extra ($TORCH_PY; set DINO_SMOKE_TORCH_PYTHON)"
        log "exporting a tiny random vit_tiny (64 px) with $TORCH_PY"
        rm -rf "$TMP_MODEL.part"; mkdir -p "$(dirname "$TMP_MODEL")"
        (cd "$REPO" && nice -n 10 "$TORCH_PY" -c '
import sys
from training.backbone import build_backbone
from training.export import export_backbone
export_backbone(build_backbone("vit_tiny", 16, 64), sys.argv[1], name="tmp", arch="vit_tiny", patch_size=16, image_size=64)
' "$TMP_MODEL.part") >"$LOG_DIR/temp-model.log" 2>&1 || { tail -n 20 "$LOG_DIR/temp-model.log" >&2; die "exporting the temporary model failed"; }
        mv "$TMP_MODEL.part" "$TMP_MODEL"
    fi
    rm -rf "$REPO/docker/smoke-models"; mkdir -p "$REPO/docker/smoke-models"
    IN_REPO+=("$REPO/docker/smoke-models")
    cp -a "$TMP_MODEL" "$REPO/docker/smoke-models/tmp"
fi
if [ -n "$MODEL" ]; then SERVED=$REPO/$MODELS_ARG/$MODEL; else SERVED=$(ls -d "$REPO/$MODELS_ARG"/*/model.json | sort | head -n 1 | xargs dirname); fi
[ -f "$SERVED/model.json" ] || die "no model.json in $SERVED"
read -r MODEL_NAME EMBED_DIM < <("$PYTHON" -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["name"], m["embed_dim"])' "$SERVED/model.json")
log "build context folder $MODELS_ARG/; served model: ${SERVED#"$REPO"/} (name $MODEL_NAME, embedding dim $EMBED_DIM)"

# ---------------------------------------------------------------------------------------------
phase "build service image"
# ---------------------------------------------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$PY_TAG" --build-arg "MODELS=$MODELS_ARG")
[ -n "$MODEL" ] && build_args+=(--build-arg "MODEL=$MODEL")
log "docker build --network none -f docker/service.Dockerfile ${build_args[*]} -t $SERVICE_TAG (log: $LOG_DIR/build-service.log)"
"$DOCKER" build --network none -f "$REPO/docker/service.Dockerfile" "${build_args[@]}" -t "$SERVICE_TAG" "$REPO" \
    >"$LOG_DIR/build-service.log" 2>&1 || { tail -n 40 "$LOG_DIR/build-service.log" >&2; die "building the service image failed"; }
grep -E '^(default model|model folder):' "$LOG_DIR/build-service.log" | sed 's/^/    build: /' || true

# ---------------------------------------------------------------------------------------------
phase "check service image"
# ---------------------------------------------------------------------------------------------
img_user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$SERVICE_TAG")
[ "$img_user" = "10001:10001" ] || die "the image runs as '$img_user', not 10001:10001"
log "user: $img_user"
"$DOCKER" image inspect -f '{{json .Config.Healthcheck.Test}}' "$SERVICE_TAG" | grep -q readyz || die "no HEALTHCHECK on /readyz"
log "healthcheck: $("$DOCKER" image inspect -f '{{json .Config.Healthcheck.Test}}' "$SERVICE_TAG" | cut -c1-110)..."
log "exposed: $("$DOCKER" image inspect -f '{{json .Config.ExposedPorts}}' "$SERVICE_TAG"), volumes: $("$DOCKER" image inspect -f '{{json .Config.Volumes}}' "$SERVICE_TAG")"
"$DOCKER" run --rm --network none --entrypoint sh "$SERVICE_TAG" -c '
    set -e
    python -c "import importlib.util as u, sys; bad = [m for m in (\"torch\", \"torchvision\", \"timm\") if u.find_spec(m)]; sys.exit(\"found \" + \" \".join(bad) if bad else 0)"
    for tool in gcc cc g++ make; do if command -v $tool >/dev/null; then echo "compiler $tool in the image" >&2; exit 1; fi; done
    test -w /data/index
    echo "    in the container: uid $(id -u), no torch/timm, no compiler, /data/index writable, onnxruntime $(python -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())")"
' || die "service image checks failed"
log "size: $("$DOCKER" image inspect -f '{{.Size}}' "$SERVICE_TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')"

# ---------------------------------------------------------------------------------------------
phase "validate compose files"
# ---------------------------------------------------------------------------------------------
compose config -q
log "compose.yaml: valid; services: $(compose config --services | tr '\n' ' ')"
compose --profile train config --services | grep -qx train || die "compose.yaml has no train service in the train profile"
gpu_config=$("${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$REPO" -f "$REPO/compose.yaml" -f "$REPO/compose.gpu.yaml" --profile train config)
for want in "driver: nvidia" "capabilities:" "DINO_PROVIDER: cuda" "CUDA_LIBS:"; do
    grep -q "$want" <<<"$gpu_config" || die "compose.yaml + compose.gpu.yaml: '$want' missing"
done
log "compose.yaml + compose.gpu.yaml: valid; NVIDIA device reservations: $(grep -c 'driver: nvidia' <<<"$gpu_config")"

# ---------------------------------------------------------------------------------------------
phase "docker compose up"
# ---------------------------------------------------------------------------------------------
if [ -z "$PORT" ]; then
    PORT=$("$PYTHON" -c '
import socket
for port in (8000, 0):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break')
fi
export DINO_PUBLISH=127.0.0.1:$PORT DINO_SERVICE_IMAGE=$SERVICE_TAG
unset DINO_API_KEY
URL=http://127.0.0.1:$PORT
COMPOSE_UP=1
compose up -d --no-build service 2>&1 | sed 's/^/    /'
CID=$(compose ps -q service)
[ -n "$CID" ] || die "no service container"
log "container ${CID:0:12}, published on $URL, volume $("$DOCKER" volume ls -q | grep dino-index | tr '\n' ' ')"

wait_ready() {   # wait_ready SECONDS
    local t0 i
    t0=$(date +%s.%N)
    for i in $(seq 1 "$1"); do
        if curl -fsS --max-time 2 "$URL/readyz" -o "$WORK/readyz.json" 2>/dev/null; then
            log "/readyz after $(elapsed "$t0") s: $(cat "$WORK/readyz.json")"
            return 0
        fi
        [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$CID")" = true ] || die "the service container stopped"
        sleep 1
    done
    die "/readyz did not answer 200 within $1 s"
}
wait_ready 180
t0=$(date +%s.%N)
for i in $(seq 1 60); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CID")
    [ "$health" = healthy ] && break
    sleep 1
done
[ "$health" = healthy ] || die "the container's health is '$health', not healthy"
log "container health: healthy after another $(elapsed "$t0") s (HEALTHCHECK on /readyz)"

# ---------------------------------------------------------------------------------------------
phase "requests"
# ---------------------------------------------------------------------------------------------
PHOTO=${DINO_SMOKE_PHOTO:-}
if [ -z "$PHOTO" ]; then
    PHOTO=$(ls "$REPO"/.venv/lib/python3*/site-packages/matplotlib/mpl-data/sample_data/grace_hopper.jpg 2>/dev/null | head -n 1 || true)
fi
if [ -z "$PHOTO" ]; then   # no photo at hand: draw one with the image's Pillow
    PHOTO=$WORK/photo.jpg
    "$DOCKER" run --rm --network none --entrypoint python "$SERVICE_TAG" -c '
import io, sys
from PIL import Image, ImageDraw
img = Image.new("RGB", (320, 240))
px = img.load()
for y in range(240):
    for x in range(320):
        px[x, y] = (x * 255 // 320, y * 255 // 240, 128)
d = ImageDraw.Draw(img)
d.ellipse((90, 50, 230, 190), fill=(240, 200, 40))
d.rectangle((20, 150, 110, 230), fill=(30, 90, 200))
buf = io.BytesIO(); img.save(buf, "JPEG", quality=90); sys.stdout.buffer.write(buf.getvalue())' > "$PHOTO"
fi
log "photo: $PHOTO ($(du -h "$PHOTO" | cut -f1))"

curl -fsS --max-time 60 -F "images=@$PHOTO" "$URL/embed" -o "$WORK/embed.json" || die "POST /embed failed"
"$PYTHON" - "$WORK/embed.json" "$MODEL_NAME" "$EMBED_DIM" <<'EOF' || die "the /embed answer is wrong"
import json, math, sys
answer = json.load(open(sys.argv[1]))
name, dim = sys.argv[2], int(sys.argv[3])
assert answer["model"] == name, f"model {answer['model']!r}, expected {name!r}"
assert answer["dim"] == dim, f"dim {answer['dim']}, expected {dim}"
assert len(answer["embeddings"]) == 1, f"{len(answer['embeddings'])} embeddings for 1 image"
vector = answer["embeddings"][0]
assert len(vector) == dim, f"embedding of length {len(vector)}"
assert all(math.isfinite(v) for v in vector), "non-finite values"
norm = math.sqrt(sum(v * v for v in vector))
assert abs(norm - 1) < 1e-3, f"norm {norm} (expected L2-normalised)"
assert max(abs(v) for v in vector) > 0, "all zeros"
print(f"    POST /embed: model {answer['model']}, dim {answer['dim']}, norm {norm:.4f}, first values {[round(v, 4) for v in vector[:4]]}")
EOF

curl -fsS --max-time 60 -F "images=@$PHOTO" -F "labels=smoke-photo" "$URL/index" -o "$WORK/add.json" || die "POST /index failed"
IMAGE_ID=$("$PYTHON" -c 'import json, sys; ids = json.load(open(sys.argv[1]))["ids"]; assert len(ids) == 1; print(ids[0])' "$WORK/add.json")
log "POST /index: gallery image id $IMAGE_ID"
curl -fsS "$URL/index" -o "$WORK/index.json"
"$PYTHON" -c 'import json, sys; i = json.load(open(sys.argv[1])); assert i["size"] == 1 and i["persistent"], i; print("    GET /index:", i)' "$WORK/index.json" ||
    die "GET /index: expected a persistent gallery of 1 image"

log "restarting the service: the gallery must survive on the volume"
compose restart --timeout 20 service 2>&1 | sed 's/^/    /'
wait_ready 180
curl -fsS "$URL/index" -o "$WORK/index2.json"
"$PYTHON" -c 'import json, sys; i = json.load(open(sys.argv[1])); assert i["size"] == 1, i; print("    GET /index after the restart: size", i["size"])' "$WORK/index2.json" ||
    die "the gallery did not survive the restart"
curl -fsS --max-time 60 -F "image=@$PHOTO" "$URL/neighbors?k=1" -o "$WORK/neighbors.json" || die "POST /neighbors failed"
"$PYTHON" - "$WORK/neighbors.json" "$IMAGE_ID" <<'EOF' || die "the /neighbors answer is wrong"
import json, sys
found = json.load(open(sys.argv[1]))["neighbors"]
assert found and found[0]["id"] == sys.argv[2], f"expected {sys.argv[2]} first, got {found}"
assert found[0]["score"] > 0.99, f"similarity of the photo with itself: {found[0]['score']}"
assert found[0]["label"] == "smoke-photo", found[0]
print(f"    POST /neighbors: {found[0]['id']} ({found[0]['label']}), cosine similarity {found[0]['score']:.4f}")
EOF
curl -fsS "$URL/healthz" >/dev/null && log "GET /healthz: ok"

# ---------------------------------------------------------------------------------------------
if [ $WITH_GPU -eq 1 ]; then
    phase "build + check GPU service image"
    log "docker build ... CUDA_LIBS=true WHEELS=docker/wheels/serve-gpu -t $SERVICE_GPU_TAG (log: $LOG_DIR/build-service-gpu.log)"
    "$DOCKER" build --network none -f "$REPO/docker/service.Dockerfile" "${build_args[@]}" \
        --build-arg CUDA_LIBS=true --build-arg WHEELS=docker/wheels/serve-gpu -t "$SERVICE_GPU_TAG" "$REPO" \
        >"$LOG_DIR/build-service-gpu.log" 2>&1 || { tail -n 40 "$LOG_DIR/build-service-gpu.log" >&2; die "building the GPU service image failed"; }
    "$DOCKER" run --rm --network none --entrypoint sh "$SERVICE_GPU_TAG" -c '
        set -e
        for lib in libcudart.so libcublas.so libcudnn.so libcufft.so libcurand.so; do
            ldconfig -p | grep -q "$lib" || { echo "$lib is not known to the dynamic loader" >&2; exit 1; }
        done
        python -c "import onnxruntime as o; p = o.get_available_providers(); assert \"CUDAExecutionProvider\" in p, p; print(\"    GPU image: CUDA libraries registered; onnxruntime providers\", p)"
    ' || die "GPU service image checks failed"
    log "size: $("$DOCKER" image inspect -f '{{.Size}}' "$SERVICE_GPU_TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
fi

if [ $WITH_TRAIN -eq 1 ]; then
    phase "build + check training image"
    log "docker build --network none -f docker/train.Dockerfile -t $TRAIN_TAG (log: $LOG_DIR/build-train.log)"
    "$DOCKER" build --network none -f "$REPO/docker/train.Dockerfile" --build-arg "BASE_IMAGE=$PY_TAG" \
        --build-arg "TORCH_PINS=$TORCH_PINS" -t "$TRAIN_TAG" "$REPO" \
        >"$LOG_DIR/build-train.log" 2>&1 || { tail -n 40 "$LOG_DIR/build-train.log" >&2; die "building the training image failed"; }
    grep -E '^torch ' "$LOG_DIR/build-train.log" | sed 's/^/    build: /' || true
    mkdir -p "$WORK/images"
    DINO_TRAIN_DATA=$WORK/images DINO_TRAIN_IMAGE=$TRAIN_TAG compose run --rm --no-deps train --help >"$WORK/train-help.txt" 2>&1 ||
        { cat "$WORK/train-help.txt" >&2; die "docker compose run train --help failed"; }
    grep -q -- '--data' "$WORK/train-help.txt" || die "docker compose run train --help: no --data option"
    log "docker compose run train --help: ok ($(wc -l < "$WORK/train-help.txt") lines of usage)"
    log "size: $("$DOCKER" image inspect -f '{{.Size}}' "$TRAIN_TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
fi

phase "images"
"$DOCKER" images --filter dangling=false --format 'table {{.Repository}}:{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}' | sed 's/^/    /'
log "(+ $("$DOCKER" images -q --filter dangling=true | wc -l) untagged build-stage images, kept in $DATA_ROOT as build cache)"
end_phase
