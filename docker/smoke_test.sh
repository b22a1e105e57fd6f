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
#      docker/wheels/serve, and with the milvus extra into docker/wheels/serve-milvus
#   5. builds docker/service.Dockerfile (BuildKit) air-gapped: PIP_SOURCE=wheels and --network none
#      (wheels + local base: no network at all), the CPU variant (onnxruntime); the image that
#      compose up runs. Also with EXTRAS=serve,milvus (dino-service-milvus), and an nginx image from
#      Debian's package
#   6. checks the image (non-root, HEALTHCHECK, no torch, no compiler, onnxruntime and not
#      onnxruntime-gpu); builds it once more the way a connected user does, from the package index
#      (PIP_SOURCE=index, the default; --network host, pip's index settings and CA bundle of this
#      machine: `pip config`, the CA as the build secret pip_ca), when a container reaches the index
#      (else the phase says why and is skipped); validates compose.yaml, the GPU override (docker
#      compose -f compose.yaml -f compose.gpu.yaml config) and the scale-out one
#   7. compose builds the service image from its own build section (PIP_SOURCE=wheels, build network
#      none: cached from step 5), docker compose up; waits for /readyz and the container's health; posts a photo to /embed and
#      checks the answer; adds it to the gallery, restarts the service and finds it again (the
#      gallery index lives on the named volume)
#   8. the profile scale of compose.yaml, brought up with local stand-ins for the two images that
#      cannot be pulled (docker/compose.smoke-scale.yaml): Milvus Lite's gRPC server (the service
#      image built with the milvus extra, from docker/wheels/serve-milvus) for milvusdb/milvus,
#      Debian's nginx (dino-nginx:bookworm) for nginx:alpine; adds a photo through replica-a, finds
#      it through replica-b and fetches its image through the load balancer
#   9. tears everything down, also on failure: docker compose --profile scale down -v, dockerd stopped by its PID,
#      leftover mounts, processes (also its containers', by their cgroup), network links and iptables rules of this run removed, and the
#      wheel folders (hard links into the cache) and temporary model it put into the working tree
#
# The debootstrap tarball, the wheels, the temporary model and the daemon's data-root (with the
# images, so that a rerun reuses them) are cached in $DINO_DOCKER_CACHE (default ~/.cache/dino-docker).
#
# Usage: docker/smoke_test.sh [--temp-model] [--with-train] [--with-gpu-image] [--no-index-build] [--model NAME] [--fresh] [--port N]
#   --with-train      also build the training image (downloads torch with CUDA: several GB)
#   --with-gpu-image  also build the GPU service image (VARIANT=gpu: onnxruntime-gpu and its CUDA
#                     libraries, ~1.6 GB of wheels in docker/wheels/serve-gpu); it is checked but not run (no GPU needed)
#   --no-index-build  skip the build from the package index (step 6)
#   --temp-model      when models/ holds no model folder, export a tiny temporary model (vit_tiny,
#                     64 px, random weights; needs the train extra in .venv) into docker/smoke-models/
#   --model NAME      the model folder of models/ to ship (build argument MODEL; default: all of them,
#                     the first one is served)
#   --fresh           delete the cache first (base tarball, wheels, images): a full run from scratch
#   --port N          host port for the service (default 8000, or a free one when 8000 is taken)
# Environment: DINO_DOCKER_CACHE, DINO_DEBIAN_MIRROR (default: the Debian archive of this machine's apt sources),
#   DINO_WHEEL_GLIBC_MINOR (newest manylinux_2_N tag of the downloaded wheels; default 36, bookworm),
#   PYTHON (host python with pip, for pip download; default python3), DINO_SMOKE_PHOTO (a JPEG/PNG
#   to post; default: matplotlib's sample photo from .venv, else a generated image),
#   DINO_PIP_CA (the CA bundle for the build from the index; default: pip's `cert` setting, if any).
set -euo pipefail
#
# This file holds the options, the progress log, the teardown and the order of the phases; the parts
# it sources (functions only, run from here):
#   docker/smoke_dockerd.sh          the private dockerd: packages, start, stop, leftovers of killed runs
#   docker/smoke_base_and_wheels.sh  the local base, python and nginx images (debootstrap), the wheels (pip download)
#   docker/smoke_checks.sh           the model, the service images and their checks, compose up, the
#                                    requests, the scale-out profile, the GPU/training images, compose down
#   docker/compose.smoke-scale.yaml  the override of compose.yaml's profile scale for the stand-ins

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${DINO_DOCKER_CACHE:-$HOME/.cache/dino-docker}
RUN_DIR=/run/dino-docker-smoke
DATA_ROOT=$CACHE/docker
LOG_DIR=$CACHE/logs
MIRROR=${DINO_DEBIAN_MIRROR:-}          # default: this machine's apt sources (preflight)
PYTHON=${PYTHON:-python3}
DOCKER=/usr/bin/docker                # Debian's client, the same release as the daemon started here
DOCKERD=/usr/sbin/dockerd
PY_VERSION=3.11                       # python of the images (Debian bookworm's python3, python:3.11-slim)
BASE_TAG=dino-debian:bookworm
PY_TAG=dino-python:$PY_VERSION
SERVICE_TAG=dino-service:latest
SERVICE_GPU_TAG=dino-service:gpu
SERVICE_INDEX_TAG=dino-service:index   # the same image, built from the package index
TRAIN_TAG=dino-train:latest
# the profile scale: the service with the milvus extra (also the Milvus stand-in: milvus-lite's
# server), the nginx stand-in, and the override that runs them in place of milvusdb/milvus and nginx
SERVICE_MILVUS_TAG=dino-service-milvus:latest
LB_TAG=dino-nginx:bookworm
SCALE_OVERRIDE=$REPO/docker/compose.smoke-scale.yaml
PROJECT=dino-smoke
CGROUP_PARENT=dino-docker-smoke       # the cgroup of this run's containers (found again after a killed run)
# created by dockerd/containerd/runc outside the exec-root (shim sockets, plugin sockets, runc state)
RUN_PATHS="/run/containerd /run/docker /run/runc"

WITH_TRAIN=0 WITH_GPU=0 INDEX_BUILD=1 TEMP_MODEL=0 FRESH=0 MODEL="" PORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --with-train) WITH_TRAIN=1 ;;
        --with-gpu-image) WITH_GPU=1 ;;
        --no-index-build) INDEX_BUILD=0 ;;
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
end_phase() {   # end_phase [status]: the phase's line in the summary (default ok)
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

# shellcheck source=docker/smoke_dockerd.sh
source "$REPO/docker/smoke_dockerd.sh"
# shellcheck source=docker/smoke_base_and_wheels.sh
source "$REPO/docker/smoke_base_and_wheels.sh"
# shellcheck source=docker/smoke_checks.sh
source "$REPO/docker/smoke_checks.sh"

# ---------------------------------------------------------------------------------------------
# teardown (runs on success, failure and interruption)
# ---------------------------------------------------------------------------------------------
LOCKED=0 DOCKERD_PID="" COMPOSE_UP=0 SCALE_UP=0 LINKS_BEFORE="" IPT_BEFORE="" IP_FORWARD_BEFORE="" RUN_PATHS_BEFORE=""
COMPOSE=()
IN_REPO=()   # folders this run put into the working tree (wheels, temporary model): removed at the end
WORK=$(mktemp -d /tmp/dino-smoke.XXXXXX)

compose() {
    "${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$REPO" -f "$REPO/compose.yaml" "$@"
}

teardown() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [ $rc -ne 0 ] && end_phase "FAILED"
    phase "teardown"
    teardown_compose "$rc"    # smoke_checks.sh: compose [--profile scale] down -v
    # only once this run holds the lock: before that, $RUN_DIR, the processes naming it and the mounts
    # under it belong to the run it waits for
    if [ "$LOCKED" -eq 1 ]; then
        teardown_dockerd "$rc"    # smoke_dockerd.sh: dockerd, its processes, mounts, network links, iptables
        rm -rf "$RUN_DIR" "$CACHE/base/rootfs"
    fi
    rm -rf "$WORK"
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
LOCKED=1   # (dockerd is started without fd 9: the lock ends with this script, also when it is killed)
[ "$(uname -m)" = x86_64 ] || die "x86_64 only (the wheels are manylinux x86_64)"
[ -n "$MIRROR" ] || MIRROR=$(debian_mirror_from_apt bookworm)
[ -n "$MIRROR" ] || die "no Debian archive for bookworm in /etc/apt/sources.list*: set DINO_DEBIAN_MIRROR to one"
log "repository: $REPO"
log "cache:      $CACHE"
log "mirror:     $MIRROR"
cleanup_previous_run          # a killed run's dockerd, processes, mounts, /run directories
if [ $FRESH -eq 1 ]; then log "--fresh: deleting $CACHE"; rm -rf "$CACHE"; fi
mkdir -p "$CACHE" "$LOG_DIR"
choose_models                 # models/, or docker/smoke-models/ with --temp-model

# ---------------------------------------------------------------------------------------------
# the phases (smoke_dockerd.sh, smoke_base_and_wheels.sh, smoke_checks.sh)
# ---------------------------------------------------------------------------------------------
phase "packages (apt)";             install_packages
phase "start dockerd";              start_dockerd
phase "base image (debootstrap)";   build_base_image
phase "python image";               build_python_image
phase "wheels (pip download)";      download_wheels
phase "model";                      prepare_model
phase "build service image (wheels)"; build_service_image
phase "check service image";        check_service_image
if [ $INDEX_BUILD -eq 1 ]; then
    phase "build service image (index)"; build_service_image_from_index
fi
phase "build scale-out images";     build_scale_images
phase "validate compose files";     validate_compose_files
phase "docker compose up";          compose_up
phase "requests";                   check_requests
phase "scale-out (profile scale)";  check_scale_out
if [ $WITH_GPU -eq 1 ]; then
    phase "build + check GPU service image"; check_gpu_image
fi
if [ $WITH_TRAIN -eq 1 ]; then
    phase "build + check training image"; check_train_image
fi
phase "images";                     list_images
end_phase
