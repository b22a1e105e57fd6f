# The feature service: `dino serve` on onnxruntime (no torch in this image), the default model baked
# in, the gallery index on a volume, running as an unprivileged user (uid 10001).
#
# Build from the repository root (see docker/README.md):
#   docker build -f docker/service.Dockerfile -t dino-service .
#
# Build arguments:
#   BASE_IMAGE   any Debian/Ubuntu-like image with python3 (>= 3.11) and its venv module
#                (default python:3.11-slim; air-gapped: a local image, e.g. dino-python:3.11)
#   PIP_SOURCE   wheels (default): install only from the wheel folder, no network at all;
#                index: use the package index too (the wheel folder may then be empty or missing)
#   WHEELS       wheel folder in the build context (default docker/wheels/serve), prepared with
#                `pip download` on a connected host (docker/README.md)
#   CUDA_LIBS    true: also install the CUDA/cuDNN libraries onnxruntime-gpu needs
#                (onnxruntime-gpu[cuda,cudnn], ~2 GB) for the GPU variant; false (default): the image
#                runs on the CPU (onnxruntime-gpu falls back to its CPU provider)
#   MODELS       folder of model folders in the build context (default models)
#   MODEL        the model folder to ship (default: all of them; the service serves the first one,
#                sorted by name, unless DINO_MODEL_DIR says otherwise)
#
# The Dockerfile works with the classic builder and with BuildKit, without a `# syntax` line (which
# would fetch a frontend image from a registry).

ARG BASE_IMAGE=python:3.11-slim
ARG PIP_SOURCE=wheels

# ------------------------------------------------------------------------------------------------
# the wheel folder, or none with PIP_SOURCE=index: a stage chosen by the argument (BuildKit skips the
# other one; the classic builder builds both, so pyproject.toml is listed for the COPY to succeed
# also when the folder is missing). The wheels never reach the final image.
# ------------------------------------------------------------------------------------------------
FROM scratch AS wheels-from-wheels
ARG WHEELS=docker/wheels/serve
COPY pyproject.toml ${WHEELS}/*.whl /wheels/

FROM scratch AS wheels-from-index
COPY pyproject.toml /wheels/

FROM wheels-from-${PIP_SOURCE} AS wheels

# ------------------------------------------------------------------------------------------------
# build: a virtual environment with the serving extra, from the wheel folder (or the index)
# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_SOURCE
ARG WHEELS=docker/wheels/serve
ARG CUDA_LIBS=false
# the extras installed: "serve", or "serve,milvus" for the Milvus gallery (compose's scale profile)
ARG EXTRAS=serve
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# python3 -m venv works on the official image (/usr/local/bin/python3) and on Debian's python3
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY --from=wheels /wheels/ /tmp/wheels/
COPY pyproject.toml README* /app/
COPY dino/ /app/dino/
COPY service/ /app/service/
COPY training/ /app/training/

# An editable install keeps the package at /app, so that service.settings finds the shipped models
# in /app/models ("the first folder of <repo>/models"). setuptools (the build backend) comes from the
# wheel folder too: --no-build-isolation, nothing is fetched. With CUDA_LIBS=true the directories of
# the CUDA libraries (nvidia-* wheels) are listed for the dynamic loader of the final stage.
RUN set -eu; \
    case "$PIP_SOURCE" in \
      wheels) src="--no-index --find-links /tmp/wheels" ;; \
      index)  src="--find-links /tmp/wheels" ;; \
      *) echo "PIP_SOURCE must be 'wheels' or 'index', not '$PIP_SOURCE'" >&2; exit 1 ;; \
    esac; \
    case "$CUDA_LIBS" in \
      true)  cuda="onnxruntime-gpu[cuda,cudnn]" ;; \
      false) cuda="" ;; \
      *) echo "CUDA_LIBS must be 'true' or 'false', not '$CUDA_LIBS'" >&2; exit 1 ;; \
    esac; \
    if [ "$PIP_SOURCE" = wheels ] && ! ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
      echo "no wheels in $WHEELS: prepare the folder with 'pip download' (docker/README.md) or build with --build-arg PIP_SOURCE=index" >&2; \
      exit 1; \
    fi; \
    pip install $src "setuptools>=68"; \
    pip install $src --no-build-isolation --editable "/app[$EXTRAS]" $cuda; \
    pip check; \
    mkdir -p /opt/venv/etc; \
    find /opt/venv/lib -path '*/site-packages/nvidia/*' -name 'lib*.so*' -printf '%h\n' | sort -u > /opt/venv/etc/ld.so.nvidia.conf; \
    python -m compileall -q /app/dino /app/service /app/training; \
    rm -rf /tmp/wheels

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
# CUDA_LIBS=true: register the CUDA libraries of the nvidia-* wheels (nothing to do otherwise)
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

# fail the build, not the container, when the default model does not resolve or torch slipped in
RUN python -c "import importlib.util, sys; from service.settings import find_default_model; print('default model:', find_default_model()); sys.exit('torch must not be in the service image' if importlib.util.find_spec('torch') else 0)"

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
