# Batch training: `dino train` (and knn / export / import) with torch's CUDA build. The CUDA
# libraries come with the torch wheels (nvidia-* packages), so no CUDA base image is needed; the host
# provides the driver through the NVIDIA container toolkit (compose.gpu.yaml).
#
# Build from the repository root (see docker/README.md):
#   docker build -f docker/train.Dockerfile -t dino-train .
#
# Build arguments:
#   BASE_IMAGE   any Debian/Ubuntu-like image with python3 (>= 3.11) and its venv module
#                (default python:3.11-slim; air-gapped: a local image, e.g. dino-python:3.11)
#   PIP_SOURCE   index (default): packages from the package index (pip's default one, or the
#                arguments below); wheels: only from the wheel folder WHEELS, no network at all
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST
#                pip's own settings, for a mirror, a private index or a proxy (build stage only;
#                they are recorded in the build's metadata: no passwords in them)
#   WHEELS       wheel folder in the build context for PIP_SOURCE=wheels (default docker/wheels/train,
#                several GB with torch's CUDA libraries), prepared with `pip download` on a connected host
#   TORCH_PINS   the torch/torchvision releases (keep in step with TORCH_PINS in the Makefile)
#   EXTRAS       the project's extras to install (default train; e.g. train,serve to also verify
#                exports against onnxruntime)
#
# Build secret (optional): pip_ca, a CA bundle for pip, as in docker/service.Dockerfile:
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt ...
# Needs BuildKit (RUN --mount: the secret, the wheel folder): Docker >= 23, docker compose v2;
# Docker 20.10: DOCKER_BUILDKIT=1.

ARG BASE_IMAGE=python:3.11-slim
ARG PIP_SOURCE=index

# ------------------------------------------------------------------------------------------------
# the wheel folder (PIP_SOURCE=wheels), or none (index): a stage chosen by the argument, BuildKit skips
# the other one. pyproject.toml is listed so that the COPY has a source when the folder holds no
# wheel (the install step then says what to do); a folder that does not exist fails this COPY, which
# names it (or, when the step is cached from an empty folder, the install step). The build stage mounts the stage (no copy, no layer): the wheels never reach an image.
# ------------------------------------------------------------------------------------------------
FROM scratch AS wheels-from-wheels
ARG WHEELS=docker/wheels/train
COPY pyproject.toml ${WHEELS}/*.whl /wheels/

FROM scratch AS wheels-from-index
COPY pyproject.toml /wheels/

FROM wheels-from-${PIP_SOURCE} AS wheels

# ------------------------------------------------------------------------------------------------
# build: a virtual environment with torch and the training extra, from the index (or the wheel folder)
# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_SOURCE
ARG WHEELS=docker/wheels/train
ARG TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
ARG EXTRAS=train
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README* /app/
COPY dino/ /app/dino/
COPY service/ /app/service/
COPY training/ /app/training/

# editable: the package stays at /app (the working directory of the image, as in a checkout). Empty
# PIP_* arguments are unset; the CA bundle of the secret pip_ca, when given, becomes PIP_CERT here.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/tmp/wheels \
    --mount=type=secret,id=pip_ca \
    set -eu; \
    case "$PIP_SOURCE" in \
      wheels) src="--no-index --find-links /tmp/wheels" ;; \
      index)  src="--find-links /tmp/wheels" ;; \
      *) echo "PIP_SOURCE must be 'index' or 'wheels', not '$PIP_SOURCE'" >&2; exit 1 ;; \
    esac; \
    if [ "$PIP_SOURCE" = wheels ] && ! ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
      echo "no wheels in $WHEELS: prepare the folder with 'pip download' (docker/README.md), or build from the index (PIP_SOURCE=index, the default)" >&2; \
      exit 1; \
    fi; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    [ -n "$PIP_TRUSTED_HOST" ] || unset PIP_TRUSTED_HOST; \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install $src "setuptools>=68"; \
    pip install $src --no-build-isolation $TORCH_PINS --editable "/app[$EXTRAS]"; \
    pip check; \
    python -m compileall -q /app/dino /app/service /app/training

# ------------------------------------------------------------------------------------------------
# the training image
# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="dino-train" \
      org.opencontainers.image.description="DINO self-supervised ViT training (torch with CUDA): dino train / knn / export / import" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN set -eu; \
    if command -v useradd >/dev/null 2>&1; then \
      groupadd --gid 10001 dino; \
      useradd --uid 10001 --gid 10001 --home-dir /home/dino --create-home --shell /bin/sh dino; \
    else \
      echo "dino:x:10001:" >> /etc/group; \
      echo "dino:x:10001:10001:dino:/home/dino:/bin/sh" >> /etc/passwd; \
      mkdir -p /home/dino; chown 10001:10001 /home/dino; \
    fi; \
    mkdir -p /app/runs /app/models /data/images; \
    chown 10001:10001 /app/runs /app/models

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY configs/ /app/configs/

# caches go to /tmp so that any --user (e.g. the host's uid, to own the outputs) can write them
ENV PATH=/opt/venv/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    XDG_CACHE_HOME=/tmp/cache \
    ORT_DISABLE_TELEMETRY=1

RUN python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"

WORKDIR /app
USER 10001:10001
# runs/ (checkpoints, logs) and models/ (exports) are meant to be mounted from the host
VOLUME ["/app/runs"]
ENTRYPOINT ["dino"]
CMD ["train", "--help"]
