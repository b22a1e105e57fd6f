# shellcheck shell=bash disable=SC2154
# Part of docker/smoke_test.sh (sourced by it, not run on its own): what the images are built from,
# without an image registry.
#
#   - the base image $BASE_TAG: debootstrap --variant=minbase bookworm from $MIRROR, docker import
#     (the tarball is cached in $CACHE/base)
#   - the python image $PY_TAG on top of it: Debian's python3, python3-venv, python3-pip
#   - the nginx image $LB_TAG on top of it: Debian's nginx, the stand-in for nginx:alpine (the
#     load balancer of compose.yaml's profile scale)
#   - the wheels: pip download on the host for the images' python (cp311, manylinux x86_64), cached
#     in $CACHE/wheels and hard-linked into docker/wheels/NAME (removed again by the teardown)
#   - the package index for the build from the index: this machine's pip settings (pip config and
#     PIP_* variables: index URLs, trusted hosts, the CA bundle), and whether a container reaches it
#
# Uses from smoke_test.sh (SC2154 above: set there): REPO CACHE LOG_DIR MIRROR PYTHON DOCKER
# PY_VERSION BASE_TAG PY_TAG LB_TAG WITH_GPU WITH_TRAIN IN_REPO WORK; log, die.

# The Debian archive that this machine's apt uses for the suite $1 (deb822 .sources stanzas, then
# one-line .list entries), so that the repository names no package host. Prints nothing if none.
debian_mirror_from_apt() {
    local suite=$1 uri
    uri=$(awk -v suite="$suite" '
        BEGIN { RS = ""; FS = "\n" }
        {
            types = ""; uris = ""; suites = ""
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^Types:/) types = $i
                if ($i ~ /^URIs:/) uris = $i
                if ($i ~ /^Suites:/) suites = " " $i " "
            }
            if (types ~ /[[:space:]]deb([[:space:]]|$)/ && index(suites, " " suite " ") && uris != "") {
                split(uris, parts, /[[:space:]]+/); print parts[2]; exit
            }
        }' /etc/apt/sources.list.d/*.sources 2>/dev/null)
    if [ -z "$uri" ]; then
        uri=$(awk -v suite="$suite" '
            $1 == "deb" {
                for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { if ($(i + 1) == suite) { print $i; exit } break }
            }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null)
    fi
    printf '%s' "$uri"
}

# phase "base image (debootstrap)"
build_base_image() {
    local tarball=$CACHE/base/debian-bookworm-minbase.tar rootfs
    if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
        log "$BASE_TAG is in the daemon's cache"
    else
        if [ -s "$tarball" ]; then
            log "using the cached $tarball"
        else
            log "debootstrap --variant=minbase bookworm from $MIRROR (log: $LOG_DIR/debootstrap.log)"
            mkdir -p "$CACHE/base"
            rootfs=$CACHE/base/rootfs
            debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$LOG_DIR/debootstrap.log" 2>&1 ||
                { tail -n 30 "$LOG_DIR/debootstrap.log" >&2; die "debootstrap failed"; }
            rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
            tar --numeric-owner -C "$rootfs" -cf "$tarball.part" .
            mv "$tarball.part" "$tarball"
            rm -rf "$rootfs"
            log "cached $tarball ($(du -h "$tarball" | cut -f1))"
        fi
        "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
            --message "debootstrap --variant=minbase bookworm" "$tarball" "$BASE_TAG" >/dev/null
        log "imported $BASE_TAG"
    fi
}

# phase "python image": the only build with network (the host's, for the Debian mirror)
build_python_image() {
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
}

# phase "build scale-out images": the stand-in for nginx:alpine, Debian's nginx from the Debian mirror
# (network: the host's, as for the python image; the layers stay in the daemon's cache, so a rerun
# needs none). compose.yaml's lb command writes /etc/nginx/conf.d/default.conf and execs
# `nginx -g 'daemon off;'`: Debian's nginx.conf includes conf.d/*.conf like the official image's, and
# sites-enabled/* too, whose default site (ports 80 and [::]:80) is removed: in the official image that
# default.conf replaces the port-80 site, so that both serve port 8080 only. The logs go to the
# container's stdout and stderr (compose logs), as in the official image.
build_lb_image() {
    log "$LB_TAG: Debian's nginx on $BASE_TAG (docker build --network host; log: $LOG_DIR/lb-image.log)"
    "$DOCKER" build --network host -t "$LB_TAG" - >"$LOG_DIR/lb-image.log" 2>&1 <<EOF ||
FROM $BASE_TAG
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* \\
 && rm -f /etc/nginx/sites-enabled/default \\
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 8080
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
EOF
        { tail -n 30 "$LOG_DIR/lb-image.log" >&2; die "building $LB_TAG failed"; }
    "$DOCKER" run --rm --network none "$LB_TAG" sh -c 'nginx -v && nginx -t' >"$WORK/nginx-t.txt" 2>&1 ||
        { cat "$WORK/nginx-t.txt" >&2; die "$LB_TAG: nginx -t failed"; }
    log "$LB_TAG: $(grep -o 'nginx/[0-9.]*' "$WORK/nginx-t.txt" | head -n 1), nginx -t: ok, size $("$DOCKER" image inspect -f '{{.Size}}' "$LB_TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
}

# ---------------------------------------------------------------------------------------------
# wheels: pip download on the host for the images' python (cp311, manylinux x86_64)
# ---------------------------------------------------------------------------------------------
platform_args() {   # sets PLATFORM_ARGS: pip download's --platform list
    local minor
    # every manylinux tag up to the images' glibc (2.36: Debian bookworm; pip does not expand the list)
    GLIBC_MINOR=${DINO_WHEEL_GLIBC_MINOR:-36}
    PLATFORM_ARGS=()
    for minor in $(seq "$GLIBC_MINOR" -1 5); do PLATFORM_ARGS+=(--platform "manylinux_2_${minor}_x86_64"); done
    PLATFORM_ARGS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
}

requirements() {   # requirements EXTRA...: the project's requirements (and its build backend)
    "$PYTHON" - "$REPO/pyproject.toml" "$@" <<'EOF'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
name, extras = project["project"]["name"], project["project"]["optional-dependencies"]
reqs, seen = list(project["project"]["dependencies"]), set()
def add(extra):   # an extra's requirements; the project's own extras in it (serve -> serve-core) expanded
    if extra in seen:
        return
    seen.add(extra)
    for req in extras[extra]:
        own = re.fullmatch(re.escape(name) + r"\[([^\]]+)\]", req.strip())
        if own:
            for sub in own.group(1).split(","):
                add(sub.strip())
        else:
            reqs.append(req)
for extra in sys.argv[2:]:
    add(extra)
reqs += project["build-system"]["requires"]
print("\n".join(reqs))
EOF
}

wheels() {   # wheels NAME REQUIREMENT...: cached download, linked to docker/wheels/NAME (after platform_args)
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
    # shellcheck disable=SC2012   # a folder of wheel files: the count is all we want
    log "$name: docker/wheels/$name: $(ls "$target" | wc -l) wheels, $(du -sh "$target" | cut -f1)"
}

# phase "wheels (pip download)": docker/wheels/serve, docker/wheels/serve-milvus (the serve and milvus
# extras, for compose.yaml's profile scale) and, with --with-gpu-image and --with-train, serve-gpu and
# train; sets TORCH_PINS (from the Makefile) for the training image
download_wheels() {
    local serve_reqs milvus_reqs gpu_reqs train_reqs
    platform_args
    mapfile -t serve_reqs < <(requirements serve)
    wheels serve "${serve_reqs[@]}"
    mapfile -t milvus_reqs < <(requirements serve milvus)
    wheels serve-milvus "${milvus_reqs[@]}"
    if [ "$WITH_GPU" -eq 1 ]; then
        # the GPU variant: the extra serve-gpu (onnxruntime-gpu in place of onnxruntime) and the CUDA libraries
        mapfile -t gpu_reqs < <(requirements serve-gpu)
        wheels serve-gpu "${gpu_reqs[@]}" "onnxruntime-gpu[cuda,cudnn]"
    fi
    TORCH_PINS=$(sed -n 's/^TORCH_PINS *:= *//p' "$REPO/Makefile")
    if [ "$WITH_TRAIN" -eq 1 ]; then
        mapfile -t train_reqs < <(requirements train)
        # shellcheck disable=SC2086   # TORCH_PINS: several requirements, split on purpose
        wheels train "${train_reqs[@]}" $TORCH_PINS
    fi
}

# ---------------------------------------------------------------------------------------------
# the package index, as this machine's pip sees it (for the build from the index)
# ---------------------------------------------------------------------------------------------
# INDEX_BUILD_ARGS: --build-arg PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST from the host's
# pip settings (`pip config list`: the files and the PIP_* variables; install.* over global.*), only
# http(s) URLs (file:// indexes of the host are not in the container); PIP_CA: the CA bundle of pip's
# `cert` setting (DINO_PIP_CA overrides it), for the build secret pip_ca. Nothing here names a host.
pip_index_settings() {
    local config key value url urls=() hosts="" names
    INDEX_BUILD_ARGS=() PIP_CA=${DINO_PIP_CA:-}
    config=$("$PYTHON" -m pip config list 2>/dev/null || true)
    setting() {   # setting KEY: the value pip uses (:env: over install. over global.), quotes removed
        local k
        for k in ":env:.$1" "install.$1" "global.$1"; do
            value=$(awk -v k="$k" 'index($0, k "=") == 1 { sub(/^[^=]*=/, ""); print; exit }' <<<"$config")
            if [ -n "$value" ]; then value=${value#\'}; printf '%s' "${value%\'}"; return 0; fi
        done
        return 0
    }
    for key in index-url extra-index-url; do
        urls=()
        for url in $(setting "$key"); do
            case "$url" in
                http://*|https://*) urls+=("$url") ;;
                *) log "pip $key $url: not usable in a container (a path of this machine), left out" ;;
            esac
        done
        if [ ${#urls[@]} -gt 0 ]; then
            [ "$key" = index-url ] && INDEX_BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=${urls[0]}")
            [ "$key" = extra-index-url ] && INDEX_BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=${urls[*]}")
        fi
    done
    hosts=$(setting trusted-host)
    [ -n "$hosts" ] && INDEX_BUILD_ARGS+=(--build-arg "PIP_TRUSTED_HOST=$hosts")
    [ -n "$PIP_CA" ] || PIP_CA=$(setting cert)
    if [ -n "$PIP_CA" ] && [ ! -s "$PIP_CA" ]; then log "pip's CA bundle $PIP_CA does not exist: left out"; PIP_CA=""; fi
    # the settings' names only: index URLs may hold credentials
    names=$(printf '%s\n' "${INDEX_BUILD_ARGS[@]}" | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p' | tr '\n' ' ')
    log "the pip settings of this machine for the build: ${names:-none (the default index of pip)}; CA bundle: ${PIP_CA:-none (the bundle of pip)}"
}

# index_reachable: pip in the python image, on the host's network (--network host, as the build), with
# the same settings and CA, downloads the build backend; INDEX_PROBE: why not, when it cannot
index_reachable() {
    local env_args=() arg mounts=()
    for arg in "${INDEX_BUILD_ARGS[@]}"; do [ "$arg" = --build-arg ] || env_args+=(-e "$arg"); done
    if [ -n "$PIP_CA" ]; then mounts=(-v "$PIP_CA:/run/secrets/pip_ca:ro"); env_args+=(-e PIP_CERT=/run/secrets/pip_ca); fi
    if "$DOCKER" run --rm --network host "${mounts[@]}" "${env_args[@]}" -e PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY_TAG" \
        python3 -m pip download --no-deps --no-cache-dir --timeout 20 --retries 1 --dest /tmp/probe "setuptools>=68" \
        >"$LOG_DIR/index-probe.log" 2>&1; then
        INDEX_PROBE=""
        return 0
    fi
    # shellcheck disable=SC2034   # read by smoke_checks.sh
    INDEX_PROBE=$(grep -E 'ERROR|Error|error' "$LOG_DIR/index-probe.log" | tail -n 2 | tr '\n' ' ' | cut -c1-300)
    return 1
}
