# shellcheck shell=bash disable=SC2154
# Part of docker/smoke_test.sh (sourced by it, not run on its own): the checks.
#
# The model to bake in, the service image (built with --network none from the local python image
# and the wheel folder, PIP_SOURCE=wheels) and its checks, the same image built from the package index
# (the default PIP_SOURCE=index, when a container reaches it), compose.yaml and compose.gpu.yaml, docker compose up, the
# requests (/readyz, /embed, the gallery across a restart, /neighbors, /healthz), the profile scale
# with its stand-ins (the service image with the milvus extra, also running milvus-lite's server in
# place of milvusdb/milvus; Debian's nginx in place of nginx:alpine), the optional GPU service and
# training images, and docker compose down -v at the end.
#
# Uses from smoke_test.sh (SC2154 above: set there): REPO CACHE LOG_DIR DATA_ROOT PYTHON DOCKER
# PY_TAG SERVICE_TAG SERVICE_INDEX_TAG SERVICE_GPU_TAG SERVICE_MILVUS_TAG LB_TAG SCALE_OVERRIDE
# TRAIN_TAG PROJECT COMPOSE MODEL PORT TEMP_MODEL WORK IN_REPO COMPOSE_UP SCALE_UP, TORCH_PINS,
# build_lb_image, pip_index_settings, index_reachable, INDEX_BUILD_ARGS, PIP_CA, INDEX_PROBE
# (smoke_base_and_wheels.sh); log, die, elapsed, end_phase, compose.

# the lines a build step printed (BuildKit's plain progress: "#12 0.345 TEXT"), for the log
build_output() {   # build_output LOG REGEX
    sed -nE 's/^#[0-9]+ [0-9.]+ //p' "$1" | grep -E "$2" || true
}

# preflight: which model folder gets baked in (MODELS_ARG: models/, or docker/smoke-models/ with --temp-model)
choose_models() {
    MODELS_ARG=models
    if ls "$REPO"/models/*/model.json >/dev/null 2>&1; then
        # shellcheck disable=SC2012,SC2035   # folder names, for the log
        log "models/ holds: $(cd "$REPO/models" && ls -d */ | tr -d / | tr '\n' ' ')"
    elif [ "$TEMP_MODEL" -eq 1 ]; then
        MODELS_ARG=docker/smoke-models
        log "models/ holds no model folder: --temp-model, a tiny temporary model goes into $MODELS_ARG/"
    else
        die "models/ holds no model folder (models/NAME/model.json): add the default model (dino export / dino import), or rerun with --temp-model"
    fi
}

# phase "model": the temporary model (--temp-model) and the served model's name and dimension
prepare_model() {
    local tmp_model torch_py
    if [ "$MODELS_ARG" = docker/smoke-models ]; then
        tmp_model=$CACHE/tmp-model/tmp
        if [ ! -f "$tmp_model/model.json" ]; then
            torch_py=${DINO_SMOKE_TORCH_PYTHON:-$REPO/.venv/bin/python}
            [ -x "$torch_py" ] || die "--temp-model needs a python with the train extra ($torch_py; set DINO_SMOKE_TORCH_PYTHON)"
            log "exporting a tiny random vit_tiny (64 px) with $torch_py"
            rm -rf "$tmp_model.part"; mkdir -p "$(dirname "$tmp_model")"
            (cd "$REPO" && nice -n 10 "$torch_py" -c '
import sys
from training.backbone import build_backbone
from training.export import export_backbone
export_backbone(build_backbone("vit_tiny", 16, 64), sys.argv[1], name="tmp", arch="vit_tiny", patch_size=16, image_size=64)
' "$tmp_model.part") >"$LOG_DIR/temp-model.log" 2>&1 || { tail -n 20 "$LOG_DIR/temp-model.log" >&2; die "exporting the temporary model failed"; }
            mv "$tmp_model.part" "$tmp_model"
        fi
        rm -rf "$REPO/docker/smoke-models"; mkdir -p "$REPO/docker/smoke-models"
        IN_REPO+=("$REPO/docker/smoke-models")
        cp -a "$tmp_model" "$REPO/docker/smoke-models/tmp"
    fi
    # shellcheck disable=SC2012   # model folders: plain names
    if [ -n "$MODEL" ]; then SERVED=$REPO/$MODELS_ARG/$MODEL; else SERVED=$(ls -d "$REPO/$MODELS_ARG"/*/model.json | sort | head -n 1 | xargs dirname); fi
    [ -f "$SERVED/model.json" ] || die "no model.json in $SERVED"
    read -r MODEL_NAME EMBED_DIM < <("$PYTHON" -c 'import json, sys; m = json.load(open(sys.argv[1])); print(m["name"], m["embed_dim"])' "$SERVED/model.json")
    log "build context folder $MODELS_ARG/; served model: ${SERVED#"$REPO"/} (name $MODEL_NAME, embedding dim $EMBED_DIM)"
}

# phase "build service image (wheels)": air-gapped, PIP_SOURCE=wheels and --network none, from the
# python image and docker/wheels/serve: the CPU variant (onnxruntime), the image compose up runs
build_service_image() {
    local out
    base_args=(--build-arg "BASE_IMAGE=$PY_TAG" --build-arg "MODELS=$MODELS_ARG")
    if [ -n "$MODEL" ]; then base_args+=(--build-arg "MODEL=$MODEL"); fi
    build_args=("${base_args[@]}" --build-arg PIP_SOURCE=wheels)
    log "docker build --network none --progress plain -f docker/service.Dockerfile ${build_args[*]} -t $SERVICE_TAG (log: $LOG_DIR/build-service.log)"
    "$DOCKER" build --network none --progress plain -f "$REPO/docker/service.Dockerfile" "${build_args[@]}" -t "$SERVICE_TAG" "$REPO" \
        >"$LOG_DIR/build-service.log" 2>&1 || { tail -n 40 "$LOG_DIR/build-service.log" >&2; die "building the service image failed"; }
    out=$(build_output "$LOG_DIR/build-service.log" '^(pip: VARIANT|default model|model folder|onnxruntime)')
    printf '%s\n' "${out:-every step cached}" | sed 's/^/    build: /'
    # the opt-in path without its folder: the build must stop, naming the folder (BuildKit's COPY
    # fails on it; or, when that COPY step is cached from an empty folder, the install step says so)
    if "$DOCKER" build --network none --progress plain -f "$REPO/docker/service.Dockerfile" "${build_args[@]}" \
        --build-arg WHEELS=docker/wheels/missing -t dino-smoke-no-wheels "$REPO" >"$LOG_DIR/build-no-wheels.log" 2>&1; then
        die "PIP_SOURCE=wheels with a missing wheel folder built an image"
    fi
    out=$(grep -m 1 -oE 'docker/wheels/missing: no such file or directory|no wheels in docker/wheels/missing: [^(]*' "$LOG_DIR/build-no-wheels.log") ||
        { tail -n 20 "$LOG_DIR/build-no-wheels.log" >&2; die "PIP_SOURCE=wheels with a missing wheel folder: not the expected error"; }
    log "PIP_SOURCE=wheels without its folder stops the build: ${out% }"
}

# phase "build service image (index)": the build of a connected user, from the package index with the
# Dockerfile's default PIP_SOURCE=index, on the host's network, with this machine's pip settings and
# its CA bundle as the build secret pip_ca; skipped (with the reason) when a container cannot reach the
# index. Checked like the air-gapped image; their package lists are compared (logged, not asserted:
# the index may have newer releases than the cached wheels).
build_service_image_from_index() {
    local secret=() diff_out
    pip_index_settings
    if ! index_reachable; then
        log "a container on the host's network cannot download from the index: ${INDEX_PROBE:-see $LOG_DIR/index-probe.log}"
        end_phase "skipped: index unreachable from a container"
        return 0
    fi
    log "a container on the host's network reaches the index (pip download of setuptools: ok)"
    if [ -n "$PIP_CA" ]; then secret=(--secret "id=pip_ca,src=$PIP_CA"); fi
    log "docker build --network host --progress plain -f docker/service.Dockerfile ${base_args[*]}${secret[*]:+ ${secret[*]}} [pip settings] -t $SERVICE_INDEX_TAG (log: $LOG_DIR/build-service-index.log)"
    "$DOCKER" build --network host --progress plain -f "$REPO/docker/service.Dockerfile" "${base_args[@]}" "${INDEX_BUILD_ARGS[@]}" \
        "${secret[@]}" -t "$SERVICE_INDEX_TAG" "$REPO" >"$LOG_DIR/build-service-index.log" 2>&1 ||
        { tail -n 40 "$LOG_DIR/build-service-index.log" >&2; die "building the service image from the index failed (the probe reached it)"; }
    build_output "$LOG_DIR/build-service-index.log" '^(pip: VARIANT|onnxruntime)' | sed 's/^/    build: /'
    check_service_image "$SERVICE_INDEX_TAG"
    # the CA bundle was a secret: it must not be in any layer of the image
    if [ -n "$PIP_CA" ]; then
        "$DOCKER" run --rm --network none --entrypoint sh "$SERVICE_INDEX_TAG" -c 'test ! -e /run/secrets/pip_ca' || die "the CA bundle is in the image"
        "$DOCKER" history --no-trunc "$SERVICE_INDEX_TAG" | grep -q 'PIP_CERT=/run' && die "PIP_CERT in the image history"
        log "the CA bundle (secret pip_ca) is in no layer and not in the image history"
    fi
    diff_out=$(diff <(image_packages "$SERVICE_TAG") <(image_packages "$SERVICE_INDEX_TAG") | grep -E '^[<>]' | tr '\n' ' ' || true)
    log "installed packages, wheels image vs index image: ${diff_out:-the same $(image_packages "$SERVICE_TAG" | wc -l) packages and versions}"
}

image_packages() {   # image_packages TAG: name==version of every package in the image's venv, sorted
    "$DOCKER" run --rm --network none --entrypoint python "$1" -m pip list --format freeze --disable-pip-version-check 2>/dev/null |
        grep -v '^dino-platform' | sort
}

# phase "check service image": non-root, HEALTHCHECK on /readyz, no torch, no compiler, /data/index
# writable, the CPU variant's onnxruntime (not onnxruntime-gpu, no CUDA libraries); the image TAG
# (default: the air-gapped one)
check_service_image() {
    local img_user tag=${1:-$SERVICE_TAG}
    img_user=$("$DOCKER" image inspect -f '{{.Config.User}}' "$tag")
    [ "$img_user" = "10001:10001" ] || die "the image runs as '$img_user', not 10001:10001"
    log "user: $img_user"
    "$DOCKER" image inspect -f '{{json .Config.Healthcheck.Test}}' "$tag" | grep -q readyz || die "no HEALTHCHECK on /readyz"
    log "healthcheck: $("$DOCKER" image inspect -f '{{json .Config.Healthcheck.Test}}' "$tag" | cut -c1-110)..."
    log "exposed: $("$DOCKER" image inspect -f '{{json .Config.ExposedPorts}}' "$tag"), volumes: $("$DOCKER" image inspect -f '{{json .Config.Volumes}}' "$tag")"
    # shellcheck disable=SC2016   # expanded in the container
    "$DOCKER" run --rm --network none --entrypoint sh "$tag" -c '
        set -e
        python -c "import importlib.util as u, sys; bad = [m for m in (\"torch\", \"torchvision\", \"timm\") if u.find_spec(m)]; sys.exit(\"found \" + \" \".join(bad) if bad else 0)"
        for tool in gcc cc g++ make; do if command -v $tool >/dev/null; then echo "compiler $tool in the image" >&2; exit 1; fi; done
        test -w /data/index
        python -m pip show --quiet onnxruntime-gpu 2>/dev/null && { echo "onnxruntime-gpu in the CPU image" >&2; exit 1; }
        if ls -d /opt/venv/lib/python3*/site-packages/nvidia 2>/dev/null; then echo "CUDA libraries (nvidia-*) in the CPU image" >&2; exit 1; fi
        echo "    in the container: uid $(id -u), no torch/timm, no compiler, /data/index writable, $(python -c "import importlib.metadata as m, onnxruntime as o; print(\"onnxruntime\", m.version(\"onnxruntime\"), o.get_available_providers())"), no onnxruntime-gpu, no CUDA libraries"
    ' || die "service image checks failed ($tag)"
    log "size: $("$DOCKER" image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.0f MB", $1 / 1e6 }') ($tag)"
}

# phase "build scale-out images": compose.yaml's replica image (EXTRAS=serve,milvus, the wheels of
# docker/wheels/serve-milvus; --network none), which also serves as the Milvus stand-in (milvus-lite's
# gRPC server), and the nginx stand-in (build_lb_image, smoke_base_and_wheels.sh)
build_scale_images() {
    log "docker build --network none ... --build-arg EXTRAS=serve,milvus --build-arg WHEELS=docker/wheels/serve-milvus -t $SERVICE_MILVUS_TAG (log: $LOG_DIR/build-service-milvus.log)"
    "$DOCKER" build --network none --progress plain -f "$REPO/docker/service.Dockerfile" "${build_args[@]}" \
        --build-arg EXTRAS=serve,milvus --build-arg WHEELS=docker/wheels/serve-milvus -t "$SERVICE_MILVUS_TAG" "$REPO" \
        >"$LOG_DIR/build-service-milvus.log" 2>&1 || { tail -n 40 "$LOG_DIR/build-service-milvus.log" >&2; die "building the milvus service image failed"; }
    # shellcheck disable=SC2016   # expanded in the container
    "$DOCKER" run --rm --network none --entrypoint sh "$SERVICE_MILVUS_TAG" -c '
        set -e
        command -v milvus-lite >/dev/null || { echo "no milvus-lite command in the image" >&2; exit 1; }
        python -c "import importlib.util as u, sys; sys.exit(\"torch in the image\" if u.find_spec(\"torch\") else 0)"
        echo "    in the container: uid $(id -u), no torch, $(python -c "from importlib.metadata import version as v; print(\"pymilvus\", v(\"pymilvus\") + \", milvus-lite\", v(\"milvus-lite\"))") ($(command -v milvus-lite): the Milvus stand-in)"
    ' || die "milvus service image checks failed"
    log "$SERVICE_MILVUS_TAG: size $("$DOCKER" image inspect -f '{{.Size}}' "$SERVICE_MILVUS_TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
    build_lb_image
}

# phase "validate compose files": compose.yaml (with its train profile) and compose.gpu.yaml on top;
# the defaults of a fresh clone (PIP_SOURCE unset): the CPU variant from the index
validate_compose_files() {
    local config gpu_config want services
    config=$(PIP_SOURCE='' compose config)
    for want in "PIP_SOURCE: index" "VARIANT: cpu"; do
        grep -q "$want" <<<"$config" || die "compose.yaml: '$want' missing in the service's build arguments"
    done
    log "compose.yaml: valid; services: $(compose config --services | tr '\n' ' '); build defaults: PIP_SOURCE index, VARIANT cpu"
    # captured first: grep -q stops reading at the match, and the writer's SIGPIPE would fail the pipe
    services=$(compose --profile train --profile scale config --services)
    grep -qx train <<<"$services" || die "compose.yaml has no train service in the train profile"
    for want in milvus replica-a replica-b lb; do
        grep -qx "$want" <<<"$services" || die "compose.yaml has no $want service in the scale profile"
    done
    log "compose.yaml profile scale: valid; services: $(grep -E '^(milvus|replica-.|lb)$' <<<"$services" | tr '\n' ' ')"
    gpu_config=$("${COMPOSE[@]}" --project-name "$PROJECT" --project-directory "$REPO" -f "$REPO/compose.yaml" -f "$REPO/compose.gpu.yaml" --profile train config)
    for want in "driver: nvidia" "capabilities:" "DINO_PROVIDER: cuda" "VARIANT: gpu" "dino-service:gpu"; do
        grep -q "$want" <<<"$gpu_config" || die "compose.yaml + compose.gpu.yaml: '$want' missing"
    done
    log "compose.yaml + compose.gpu.yaml: valid; VARIANT gpu (dino-service:gpu); NVIDIA device reservations: $(grep -c 'driver: nvidia' <<<"$gpu_config")"
    compose --profile scale -f "$SCALE_OVERRIDE" config -q
    log "compose.yaml + ${SCALE_OVERRIDE#"$REPO"/} (the smoke test's stand-ins for the profile scale): valid"
}

free_port() {   # free_port PREFERRED: PREFERRED when 127.0.0.1 has it free, else a free port
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
for port in (int(sys.argv[1]), 0):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1])
        break
EOF
}

wait_ready() {   # wait_ready SECONDS
    local t0
    t0=$(date +%s.%N)
    for _ in $(seq 1 "$1"); do
        if curl -fsS --max-time 2 "$URL/readyz" -o "$WORK/readyz.json" 2>/dev/null; then
            log "/readyz after $(elapsed "$t0") s: $(cat "$WORK/readyz.json")"
            return 0
        fi
        [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$CID")" = true ] || die "the service container stopped"
        sleep 1
    done
    die "/readyz did not answer 200 within $1 s"
}

# phase "docker compose up": compose.yaml builds the service image itself (its build section and
# arguments, as `docker compose up` does on a fresh clone), air-gapped: PIP_SOURCE=wheels, the local
# python image, and an override that builds with --network none (the stages are cached from the
# docker build above: same Dockerfile, same argument values); then up on 127.0.0.1:PORT (8000 or a
# free one); waits for /readyz and the health
compose_up() {
    local t0 health pip_line
    if [ -z "$PORT" ]; then PORT=$(free_port 8000); fi
    export DINO_PUBLISH=127.0.0.1:$PORT DINO_SERVICE_IMAGE=$SERVICE_TAG
    unset DINO_API_KEY
    URL=http://127.0.0.1:$PORT
    printf 'services:\n  service:\n    build:\n      network: none\n' > "$WORK/compose.build-offline.yaml"
    log "PIP_SOURCE=wheels BASE_IMAGE=$PY_TAG compose build service, build network none (log: $LOG_DIR/compose-build.log)"
    # compose 1.x runs `docker build` from PATH: this daemon's client first (BuildKit without buildx)
    PATH=$(dirname "$DOCKER"):$PATH PIP_SOURCE=wheels BASE_IMAGE=$PY_TAG DINO_MODELS=$MODELS_ARG DINO_MODEL=$MODEL \
        compose -f "$WORK/compose.build-offline.yaml" build service >"$LOG_DIR/compose-build.log" 2>&1 ||
        { tail -n 40 "$LOG_DIR/compose-build.log" >&2; die "compose build service failed"; }
    pip_line=$(build_output "$LOG_DIR/compose-build.log" '^pip: VARIANT' | head -n 1)
    log "compose build: $SERVICE_TAG $("$DOCKER" image inspect -f '{{.Id}}' "$SERVICE_TAG" | cut -c8-19); ${pip_line:-the install step cached from the docker build}"
    COMPOSE_UP=1
    compose up -d --no-build service 2>&1 | sed 's/^/    /'
    CID=$(compose ps -q service)
    [ -n "$CID" ] || die "no service container"
    log "container ${CID:0:12}, published on $URL, volume $("$DOCKER" volume ls -q | grep dino-index | tr '\n' ' ')"
    wait_ready 180
    t0=$(date +%s.%N)
    for _ in $(seq 1 60); do
        health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CID")
        [ "$health" = healthy ] && break
        sleep 1
    done
    [ "$health" = healthy ] || die "the container's health is '$health', not healthy"
    log "container health: healthy after another $(elapsed "$t0") s (HEALTHCHECK on /readyz)"
    end_phase "ok: $SERVICE_TAG, built by compose with PIP_SOURCE=wheels, network none"
}

# the photo the requests post (PHOTO): DINO_SMOKE_PHOTO, matplotlib's sample photo, else a drawn one
choose_photo() {
    local photo
    photo=${DINO_SMOKE_PHOTO:-}
    if [ -z "$photo" ]; then
        # shellcheck disable=SC2012   # the first match of a glob, or none
        photo=$(ls "$REPO"/.venv/lib/python3*/site-packages/matplotlib/mpl-data/sample_data/grace_hopper.jpg 2>/dev/null | head -n 1 || true)
    fi
    if [ -z "$photo" ]; then   # no photo at hand: draw one with the image's Pillow
        photo=$WORK/photo.jpg
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
buf = io.BytesIO(); img.save(buf, "JPEG", quality=90); sys.stdout.buffer.write(buf.getvalue())' > "$photo"
    fi
    log "photo: $photo ($(du -h "$photo" | cut -f1))"
    PHOTO=$photo
}

# phase "requests": /embed, the gallery (/index) across a restart of the service, /neighbors, /healthz
check_requests() {
    local photo image_id
    choose_photo
    photo=$PHOTO

    curl -fsS --max-time 60 -F "images=@$photo" "$URL/embed" -o "$WORK/embed.json" || die "POST /embed failed"
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

    curl -fsS --max-time 60 -F "images=@$photo" -F "labels=smoke-photo" "$URL/index" -o "$WORK/add.json" || die "POST /index failed"
    image_id=$("$PYTHON" -c 'import json, sys; ids = json.load(open(sys.argv[1]))["ids"]; assert len(ids) == 1; print(ids[0])' "$WORK/add.json")
    log "POST /index: gallery image id $image_id"
    curl -fsS "$URL/index" -o "$WORK/index.json"
    "$PYTHON" -c 'import json, sys; i = json.load(open(sys.argv[1])); assert i["size"] == 1 and i["persistent"], i; print("    GET /index:", i)' "$WORK/index.json" ||
        die "GET /index: expected a persistent gallery of 1 image"

    log "restarting the service: the gallery must survive on the volume"
    compose restart --timeout 20 service 2>&1 | sed 's/^/    /'
    wait_ready 180
    curl -fsS "$URL/index" -o "$WORK/index2.json"
    "$PYTHON" -c 'import json, sys; i = json.load(open(sys.argv[1])); assert i["size"] == 1, i; print("    GET /index after the restart: size", i["size"])' "$WORK/index2.json" ||
        die "the gallery did not survive the restart"
    curl -fsS --max-time 60 -F "image=@$photo" "$URL/neighbors?k=1" -o "$WORK/neighbors.json" || die "POST /neighbors failed"
    "$PYTHON" - "$WORK/neighbors.json" "$image_id" <<'EOF' || die "the /neighbors answer is wrong"
import json, sys
found = json.load(open(sys.argv[1]))["neighbors"]
assert found and found[0]["id"] == sys.argv[2], f"expected {sys.argv[2]} first, got {found}"
assert found[0]["score"] > 0.99, f"similarity of the photo with itself: {found[0]['score']}"
assert found[0]["label"] == "smoke-photo", found[0]
print(f"    POST /neighbors: {found[0]['id']} ({found[0]['label']}), cosine similarity {found[0]['score']:.4f}")
EOF
    # a failing /healthz is reported by curl (stderr) but does not fail the run
    if curl -fsS "$URL/healthz" >/dev/null; then log "GET /healthz: ok"; fi
}

scale_compose() {   # compose.yaml's profile scale with the stand-ins of docker/compose.smoke-scale.yaml
    compose --profile scale -f "$SCALE_OVERRIDE" "$@"
}

wait_replica_ready() {   # wait_replica_ready SERVICE CONTAINER URL SECONDS: /readyz answers "ready" (gallery available)
    local name=$1 cid=$2 url=$3 t0 running restarts
    t0=$(date +%s.%N)
    for _ in $(seq 1 "$4"); do
        if curl -fsS --max-time 2 "$url/readyz" -o "$WORK/readyz-$name.json" 2>/dev/null &&
            grep -q '"status": *"ready"' "$WORK/readyz-$name.json"; then
            log "$name (container ${cid:0:12}, $url): /readyz after $(elapsed "$t0") s: $(cat "$WORK/readyz-$name.json")"
            return 0
        fi
        # restart: unless-stopped would hide a crash behind a restart loop
        read -r running restarts < <("$DOCKER" inspect -f '{{.State.Running}} {{.RestartCount}}' "$cid")
        if [ "$running" != true ] || [ "$restarts" -ne 0 ]; then die "the $name container stopped (running: $running, restarts: $restarts)"; fi
        sleep 1
    done
    die "$name: /readyz did not answer \"ready\" within $4 s (last answer: $(cat "$WORK/readyz-$name.json" 2>/dev/null))"
}

# phase "scale-out (profile scale)": compose.yaml's profile scale, brought up with the stand-ins
# (docker/compose.smoke-scale.yaml, compose.yaml's image variables): milvus = milvus-lite's gRPC server
# in the dino-service-milvus image, lb = Debian's nginx. Both replicas must find Milvus by its service
# name and the load balancer both replicas; a photo added through replica-a is found through replica-b
# (one gallery), and its stored image comes back through the load balancer on 127.0.0.1:8080 (or a
# free port).
#
# The network: the project network of compose is a user-defined bridge (br-...), which dockerd creates
# also with --bridge=none (that only skips the default docker0 bridge); containers on it reach each
# other over the bridge, and compose's service names resolve through dockerd's embedded DNS
# (127.0.0.11), which needs no iptables rules of the host (--iptables=false). Published ports go
# through docker-proxy on 127.0.0.1, as in the requests phase.
check_scale_out() {
    local lb_port lb_url a_url b_url image_id hits_a hits_b forward name
    local -A cid
    lb_port=$(free_port 8080)
    lb_url=http://127.0.0.1:$lb_port
    export MILVUS_IMAGE=$SERVICE_MILVUS_TAG DINO_SERVICE_MILVUS_IMAGE=$SERVICE_MILVUS_TAG DINO_LB_IMAGE=$LB_TAG \
        DINO_SCALE_PUBLISH=127.0.0.1:$lb_port
    log "stand-ins: milvus = $SERVICE_MILVUS_TAG running milvus-lite's gRPC server, lb = $LB_TAG (Debian's nginx); override ${SCALE_OVERRIDE#"$REPO"/}"
    # with br_netfilter on, traffic between containers on a bridge passes the host's FORWARD chain,
    # which this dockerd (--iptables=false) does not open: a DROP policy there would cut the replicas
    # off Milvus (they would stay "degraded") and nginx off the replicas
    forward=$(iptables -S FORWARD 2>/dev/null || true)
    if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ] && grep -qx -- '-P FORWARD DROP' <<<"$forward"; then
        log "warning: br_netfilter is on and the host's iptables FORWARD policy is DROP: containers may not reach each other"
    fi
    SCALE_UP=1
    scale_compose up -d --no-build lb 2>&1 | sed 's/^/    /' || die "compose --profile scale up -d lb failed"
    for name in milvus replica-a replica-b lb; do
        cid[$name]=$(scale_compose ps -q "$name")
        [ -n "${cid[$name]}" ] || die "no $name container"
    done
    log "milvus (container ${cid[milvus]:0:12}): $("$DOCKER" inspect -f '{{.State.Health.Status}}' "${cid[milvus]}"), volume $("$DOCKER" volume ls -q | grep milvus-data | tr '\n' ' ')"
    a_url=http://$(scale_compose port replica-a 8000)
    b_url=http://$(scale_compose port replica-b 8000)
    wait_replica_ready replica-a "${cid[replica-a]}" "$a_url" 180
    wait_replica_ready replica-b "${cid[replica-b]}" "$b_url" 180
    "$DOCKER" exec "${cid[replica-a]}" python -c '
import socket
resolver = [line.split()[1] for line in open("/etc/resolv.conf") if line.startswith("nameserver")][0]
names = ", ".join(f"{name} {socket.gethostbyname(name)}" for name in ("milvus", "replica-b", "lb"))
print(f"    service names from replica-a: {names} (resolver {resolver}: the embedded DNS of dockerd)")' ||
        die "replica-a cannot resolve the service names"

    curl -fsS --max-time 60 -F "images=@$PHOTO" -F "labels=smoke-scale" "$a_url/index" -o "$WORK/scale-add.json" ||
        die "POST /index on replica-a failed"
    image_id=$("$PYTHON" -c 'import json, sys; ids = json.load(open(sys.argv[1]))["ids"]; assert len(ids) == 1; print(ids[0])' "$WORK/scale-add.json")
    log "POST /index on replica-a: gallery image id $image_id"
    curl -fsS --max-time 60 -F "image=@$PHOTO" "$b_url/neighbors?k=1" -o "$WORK/scale-neighbors.json" || die "POST /neighbors on replica-b failed"
    "$PYTHON" - "$WORK/scale-neighbors.json" "$image_id" <<'EOF' || die "replica-b did not find the image added through replica-a"
import json, sys
found = json.load(open(sys.argv[1]))["neighbors"]
assert found and found[0]["id"] == sys.argv[2], f"expected {sys.argv[2]} first, got {found}"
assert found[0]["score"] > 0.99, f"similarity of the photo with itself: {found[0]['score']}"
assert found[0]["label"] == "smoke-scale", found[0]
print(f"    POST /neighbors?k=1 on replica-b: {found[0]['id']} ({found[0]['label']}), cosine similarity {found[0]['score']:.4f}")
EOF
    curl -fsS "$b_url/index" -o "$WORK/scale-index.json" || die "GET /index on replica-b failed"
    "$PYTHON" - "$WORK/scale-index.json" <<'EOF' ||
import json, sys
i = json.load(open(sys.argv[1]))
assert i["size"] == 1 and i["backend"] == "milvus", i
print(f"    GET /index on replica-b: size {i['size']}, backend {i['backend']}, collection {i['collection']}, index {i['index_type']}")
EOF
        die "GET /index on replica-b: expected the Milvus gallery with 1 image"

    # the load balancer: four requests, answered by both replicas in turn (their access logs), then the
    # image. One connection (curl's URL range): nginx keeps the round robin of an upstream without a
    # zone per worker process, so requests on separate connections may each start a worker's turn anew
    curl -fsS --fail-early --max-time 20 "$lb_url/healthz?smoke=lb-[1-4]" -o "$WORK/lb-healthz-#1.json" ||
        die "GET /healthz through the load balancer failed"
    hits_a=$("$DOCKER" logs "${cid[replica-a]}" 2>&1 | grep -c 'GET /healthz?smoke=lb-' || true)
    hits_b=$("$DOCKER" logs "${cid[replica-b]}" 2>&1 | grep -c 'GET /healthz?smoke=lb-' || true)
    log "4 x GET /healthz through the load balancer ($lb_url): replica-a answered $hits_a, replica-b $hits_b"
    if [ "$hits_a" -eq 0 ] || [ "$hits_b" -eq 0 ]; then die "the load balancer did not use both replicas"; fi
    curl -fsS --max-time 30 -D "$WORK/scale-image.headers" "$lb_url/index/$image_id/image" -o "$WORK/scale-image.jpg" ||
        die "GET /index/$image_id/image through the load balancer failed"
    grep -qi '^content-type: image/jpeg' "$WORK/scale-image.headers" || die "GET /index/$image_id/image through the load balancer: not image/jpeg"
    [ "$(head -c 3 "$WORK/scale-image.jpg" | od -An -tx1 | tr -d ' ')" = ffd8ff ] || die "GET /index/$image_id/image through the load balancer: not a JPEG"
    log "GET /index/$image_id/image through the load balancer ($(grep -i '^server:' "$WORK/scale-image.headers" | tr -d '\r' | cut -d' ' -f2-)): $(wc -c < "$WORK/scale-image.jpg") bytes of JPEG"
}

# phase "build + check GPU service image" (--with-gpu-image): VARIANT=gpu from docker/wheels/serve-gpu
# (--network none), built and checked, not run
check_gpu_image() {
    log "docker build --network none ... --build-arg VARIANT=gpu --build-arg WHEELS=docker/wheels/serve-gpu -t $SERVICE_GPU_TAG (log: $LOG_DIR/build-service-gpu.log)"
    "$DOCKER" build --network none --progress plain -f "$REPO/docker/service.Dockerfile" "${build_args[@]}" \
        --build-arg VARIANT=gpu --build-arg WHEELS=docker/wheels/serve-gpu -t "$SERVICE_GPU_TAG" "$REPO" \
        >"$LOG_DIR/build-service-gpu.log" 2>&1 || { tail -n 40 "$LOG_DIR/build-service-gpu.log" >&2; die "building the GPU service image failed"; }
    build_output "$LOG_DIR/build-service-gpu.log" '^(pip: VARIANT|onnxruntime)' | sed 's/^/    build: /'
    # shellcheck disable=SC2016   # expanded in the container
    "$DOCKER" run --rm --network none --entrypoint sh "$SERVICE_GPU_TAG" -c '
        set -e
        for lib in libcudart.so libcublas.so libcudnn.so libcufft.so libcurand.so; do
            ldconfig -p | grep -q "$lib" || { echo "$lib is not known to the dynamic loader" >&2; exit 1; }
        done
        python -m pip show --quiet onnxruntime 2>/dev/null && { echo "onnxruntime (CPU) next to onnxruntime-gpu" >&2; exit 1; }
        python -c "import importlib.metadata as m, onnxruntime as o; p = o.get_available_providers(); assert \"CUDAExecutionProvider\" in p, p; print(\"    GPU image: CUDA libraries registered; onnxruntime-gpu\", m.version(\"onnxruntime-gpu\"), \"alone, providers\", p)"
    ' || die "GPU service image checks failed"
    log "size: $("$DOCKER" image inspect -f '{{.Size}}' "$SERVICE_GPU_TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }') ($SERVICE_GPU_TAG; $SERVICE_TAG: $("$DOCKER" image inspect -f '{{.Size}}' "$SERVICE_TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
}

# phase "build + check training image" (--with-train): built, then `docker compose run train --help`
check_train_image() {
    log "docker build --network none -f docker/train.Dockerfile -t $TRAIN_TAG (log: $LOG_DIR/build-train.log)"
    "$DOCKER" build --network none --progress plain -f "$REPO/docker/train.Dockerfile" --build-arg "BASE_IMAGE=$PY_TAG" \
        --build-arg PIP_SOURCE=wheels --build-arg "TORCH_PINS=$TORCH_PINS" -t "$TRAIN_TAG" "$REPO" \
        >"$LOG_DIR/build-train.log" 2>&1 || { tail -n 40 "$LOG_DIR/build-train.log" >&2; die "building the training image failed"; }
    build_output "$LOG_DIR/build-train.log" '^torch ' | sed 's/^/    build: /'
    mkdir -p "$WORK/images"
    DINO_TRAIN_DATA=$WORK/images DINO_TRAIN_IMAGE=$TRAIN_TAG compose run --rm --no-deps train --help >"$WORK/train-help.txt" 2>&1 ||
        { cat "$WORK/train-help.txt" >&2; die "docker compose run train --help failed"; }
    grep -q -- '--data' "$WORK/train-help.txt" || die "docker compose run train --help: no --data option"
    log "docker compose run train --help: ok ($(wc -l < "$WORK/train-help.txt") lines of usage)"
    log "size: $("$DOCKER" image inspect -f '{{.Size}}' "$TRAIN_TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
}

# phase "images": what the daemon holds now (kept in the cache for the next run); the images that a
# rebuild untagged are removed (BuildKit keeps its build cache apart, bounded by the daemon's GC)
list_images() {
    log "removing untagged images: $("$DOCKER" image prune -f 2>&1 | tail -n 1)"
    # the daemon's GC (daemon.json) runs in the background; bound the build cache now as well
    log "BuildKit build cache above 10 GB: $("$DOCKER" builder prune -f --keep-storage 10GB 2>&1 | tail -n 1)"
    "$DOCKER" images --filter dangling=false --format 'table {{.Repository}}:{{.Tag}}\t{{.ID}}\t{{.CreatedSince}}\t{{.Size}}' | sed 's/^/    /'
    log "BuildKit build cache in $DATA_ROOT: $("$DOCKER" system df --format '{{.Type}} {{.Size}}' 2>/dev/null | awk '/Build Cache/ { print $3 }')"
}

# teardown: the logs when the run failed, then docker compose down -v (containers, network, volumes),
# with the profile scale and its override once the scale-out phase has started
teardown_compose() {   # teardown_compose EXIT_STATUS
    local rc=$1 name
    if [ "$COMPOSE_UP" -eq 1 ] && [ "$rc" -ne 0 ]; then
        log "service logs (last 60 lines):"
        compose logs --no-color --tail 60 service 2>&1 | sed 's/^/      /'
    fi
    if [ "$SCALE_UP" -eq 1 ]; then
        if [ "$rc" -ne 0 ]; then
            scale_compose ps 2>&1 | sed 's/^/      /'
            for name in milvus replica-a replica-b lb; do
                log "$name logs (last 40 lines):"
                scale_compose logs --no-color --tail 40 "$name" 2>&1 | sed 's/^/      /'
            done
        fi
        scale_compose down -v --remove-orphans --timeout 20 2>&1 | sed 's/^/    /'
    elif [ "$COMPOSE_UP" -eq 1 ]; then
        compose down -v --remove-orphans --timeout 20 2>&1 | sed 's/^/    /'
    fi
}
