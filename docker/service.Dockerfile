# The feature service: `dino serve` on onnxruntime (no torch in this image), the default model baked
# in, the gallery index on a volume, running as an unprivileged user (uid 10001).
#
# Build from the repository root (see docker/README.md):
#   docker build -f docker/service.Dockerfile -t dino-service .                        # CPU, from the index
#   docker build -f docker/service.Dockerfile --build-arg VARIANT=gpu -t dino-service:gpu .   # CUDA
#
# Build arguments:
#   VARIANT      cpu (default): onnxruntime, the slim image; gpu: onnxruntime-gpu with the CUDA and
#                cuDNN libraries it needs (onnxruntime-gpu[cuda,cudnn], ~2 GB; extra serve-gpu instead
#                of serve), registered with the dynamic loader
#   BASE_IMAGE   any Debian/Ubuntu-like image with python3 (>= 3.11) and its venv module
#                (default python:3.11-slim; air-gapped: a local image, e.g. dino-python:3.11)
#   PIP_SOURCE   index (default): packages from the package index (pip's default one, or the
#                arguments below); wheels: only from the wheel folder WHEELS, no network at all
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST
#                pip's own settings, for a mirror, a private index or a proxy (build stage only;
#                they are recorded in the build's metadata: no passwords in them)
#   WHEELS       wheel folder in the build context for PIP_SOURCE=wheels (default docker/wheels/serve,
#                docker/wheels/serve-gpu for VARIANT=gpu by convention), prepared with `pip download`
#                on a connected host (docker/README.md)
#   EXTRAS       the project's extras (default serve; serve,milvus for compose's scale profile; with
#                VARIANT=gpu, serve stands for serve-gpu)
#   MODELS       folder of model folders in the build context (default models)
#   MODEL        the model folder to ship (default: all of them; the service serves the first one,
#                sorted by name, unless DINO_MODEL_DIR says otherwise)
#
# Build secret (optional): pip_ca, a CA bundle for pip (a proxy or an index with a CA of its own):
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
# pip uses it instead of its own bundle (pass the whole bundle, not only the extra CA); it is mounted
# for the one RUN step that installs and never stored in a layer.
#
# Needs BuildKit (RUN --mount: the secret, the wheel folder): the builder of Docker >= 23 and of docker compose v2; Docker
# 20.10: DOCKER_BUILDKIT=1 (docker-compose 1.x: also COMPOSE_DOCKER_CLI_BUILD=1). No `# syntax` line:
# the daemon's built-in Dockerfile frontend is used (a `# syntax` line would fetch one from a registry).

ARG BASE_IMAGE=python:3.11-slim
ARG PIP_SOURCE=index

# ------------------------------------------------------------------------------------------------
# the wheel folder (PIP_SOURCE=wheels), or none (index): a stage chosen by the argument, BuildKit skips
# the other one. pyproject.toml is listed so that the COPY has a source when the folder holds no
# wheel (the install step then says what to do); a folder that does not exist fails this COPY, which
# names it (or, when the step is cached from an empty folder, the install step). The build stage mounts the stage (no copy, no layer): the wheels never reach an image.
# ------------------------------------------------------------------------------------------------
FROM scratch AS wheels-from-wheels
ARG WHEELS=docker/wheels/serve
COPY pyproject.toml ${WHEELS}/*.whl /wheels/

FROM scratch AS wheels-from-index
COPY pyproject.toml /wheels/

FROM wheels-from-${PIP_SOURCE} AS wheels

# ------------------------------------------------------------------------------------------------
# build: a virtual environment with the serving extra, from the index (or the wheel folder)
# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_SOURCE
ARG WHEELS=docker/wheels/serve
ARG VARIANT=cpu
# the extras installed: "serve", or "serve,milvus" for the Milvus gallery (compose's scale profile)
ARG EXTRAS=serve
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# python3 -m venv works on the official image (/usr/local/bin/python3) and on Debian's python3
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README* /app/
COPY dino/ /app/dino/
COPY service/ /app/service/
COPY training/ /app/training/

# An editable install keeps the package at /app, so that service.settings finds the shipped models
# in /app/models ("the first folder of <repo>/models"). setuptools (the build backend) is installed
# first, from the same source: --no-build-isolation. VARIANT=gpu: the extra serve-gpu (onnxruntime-gpu)
# in place of serve (onnxruntime; both wheels hold the module onnxruntime, never install both), plus
# the CUDA libraries (nvidia-* wheels), whose directories are listed for the final stage's loader.
# The wheel folder is mounted at /tmp/wheels for this step (empty but for pyproject.toml with
# PIP_SOURCE=index). Empty PIP_* arguments are unset (pip would read an empty index URL); the CA bundle
# of the secret pip_ca, when given, becomes PIP_CERT for this step only.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/tmp/wheels \
    --mount=type=secret,id=pip_ca \
    set -eu; \
    case "$PIP_SOURCE" in \
      wheels) src="--no-index --find-links /tmp/wheels" ;; \
      index)  src="--find-links /tmp/wheels" ;; \
      *) echo "PIP_SOURCE must be 'index' or 'wheels', not '$PIP_SOURCE'" >&2; exit 1 ;; \
    esac; \
    case "$VARIANT" in \
      cpu) extras=$EXTRAS; cuda="" ;; \
      gpu) extras=$(printf ',%s,' "$EXTRAS" | sed 's/,serve,/,serve-gpu,/; s/^,//; s/,$//'); cuda="onnxruntime-gpu[cuda,cudnn]" ;; \
      *) echo "VARIANT must be 'cpu' or 'gpu', not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    if [ "$PIP_SOURCE" = wheels ] && ! ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
      echo "no wheels in $WHEELS: prepare the folder with 'pip download' (docker/README.md), or build from the index (PIP_SOURCE=index, the default)" >&2; \
      exit 1; \
    fi; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    [ -n "$PIP_TRUSTED_HOST" ] || unset PIP_TRUSTED_HOST; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    echo "pip: VARIANT=$VARIANT, /app[$extras]${cuda:+ $cuda}, PIP_SOURCE=$PIP_SOURCE$([ "$PIP_SOURCE" = wheels ] && echo " ($WHEELS)")$([ -n "${PIP_INDEX_URL:-}" ] && echo ", PIP_INDEX_URL set")$([ -n "${PIP_EXTRA_INDEX_URL:-}" ] && echo ", PIP_EXTRA_INDEX_URL set")$([ -n "${PIP_TRUSTED_HOST:-}" ] && echo ", PIP_TRUSTED_HOST set")$([ -n "${PIP_CERT:-}" ] && echo ", CA bundle: secret pip_ca")"; \
    pip install $src "setuptools>=68"; \
    pip install $src --no-build-isolation --editable "/app[$extras]" $cuda; \
    pip check; \
    mkdir -p /opt/venv/etc; \
    find /opt/venv/lib -path '*/site-packages/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u > /opt/venv/etc/ld.so.nvidia.conf; \
    python -m compileall -q /app/dino /app/service /app/training

# ------------------------------------------------------------------------------------------------
# models: the model folder(s) to ship, checked
# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS models
ARG MODELS=models
ARG MODEL=
COPY ${MODELS}/ /models/
RUN set -eu; cd /models; \
    if [ -n "$MODEL" ]; then \
      [ -f "$MODEL/model.json" ] || { echo "MODEL=$MODEL: $MODELS/$MODEL/model.json does not exist" >&2; exit 1; }; \
      for entry in * .[!.]*; do \
        if [ -e "$entry" ] && [ "$entry" != "$MODEL" ]; then rm -rf "$entry"; fi; \
      done; \
    fi; \
    if ! ls */model.json >/dev/null 2>&1; then \
      echo "no model folder (NAME/model.json) in $MODELS/: export one with 'dino export' or 'dino import'" >&2; \
      exit 1; \
    fi; \
    ls -d */ | sed 's,/$,,' | sort | sed 's/^/model folder: /'

# ------------------------------------------------------------------------------------------------
# the service image: no compilers, no wheel folder, no torch
# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="dino-service" \
      org.opencontainers.image.description="DINO ViT feature service (FastAPI + onnxruntime): embeddings, attention maps, gallery k-NN" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN set -eu; \
    if command -v useradd >/dev/null 2>&1; then \
      groupadd --gid 10001 dino; \
      useradd --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin dino; \
    else \
      echo "dino:x:10001:" >> /etc/group; \
      echo "dino:x:10001:10001:dino:/nonexistent:/usr/sbin/nologin" >> /etc/passwd; \
    fi; \
    mkdir -p /data/index; \
    chown 10001:10001 /data/index

COPY --from=build /opt/venv /opt/venv
# VARIANT=gpu: register the CUDA libraries of the nvidia-* wheels (nothing to do otherwise)
RUN if [ -s /opt/venv/etc/ld.so.nvidia.conf ]; then cp /opt/venv/etc/ld.so.nvidia.conf /etc/ld.so.conf.d/zz-dino-nvidia.conf && ldconfig; fi
COPY --from=build /app /app
COPY --from=models /models /app/models

# ORT_DISABLE_TELEMETRY: onnxruntime's telemetry off (and no warning that it cannot store a device id)
ENV PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DINO_HOST=0.0.0.0 \
    DINO_PORT=8000 \
    DINO_INDEX_DIR=/data/index \
    ORT_DISABLE_TELEMETRY=1

# fail the build, not the container: the default model must resolve, torch must not have slipped in,
# and the onnxruntime wheel must be the variant's one (onnxruntime or onnxruntime-gpu, not both)
ARG VARIANT=cpu
RUN python -c "import importlib.metadata as m, importlib.util, sys; from service.settings import find_default_model; print('default model:', find_default_model()); sys.exit('torch must not be in the service image') if importlib.util.find_spec('torch') else None; \
have = {n: x.version for x in m.distributions() if (n := x.metadata['Name'].lower().replace('_', '-')) in ('onnxruntime', 'onnxruntime-gpu')}; \
want = 'onnxruntime-gpu' if '$VARIANT' == 'gpu' else 'onnxruntime'; \
sys.exit(f'VARIANT=$VARIANT needs {want} alone, found {have}') if list(have) != [want] else None; \
import onnxruntime as o; print(f'{want} {have[want]}, providers {o.get_available_providers()}')"

WORKDIR /app
USER 10001:10001
# the gallery index (journal, snapshots, thumbnails): mount a named volume here
VOLUME ["/data/index"]
EXPOSE 8000
# ready = model loaded and warmed up; no curl in the image: python's urllib (HTTP errors exit 1)
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('DINO_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["dino"]
CMD ["serve"]
