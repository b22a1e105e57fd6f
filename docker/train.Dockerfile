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
#   PIP_SOURCE   wheels (default): install only from the wheel folder, no network at all;
#                index: use the package index too (the wheel folder may then be empty or missing)
#   WHEELS       wheel folder in the build context (default docker/wheels/train, several GB with
#                torch's CUDA libraries), prepared with `pip download` on a connected host
#   TORCH_PINS   the torch/torchvision releases (keep in step with TORCH_PINS in the Makefile)
#   EXTRAS       the project's extras to install (default train; e.g. train,serve to also verify
#                exports against onnxruntime)

ARG BASE_IMAGE=python:3.11-slim
ARG PIP_SOURCE=wheels

# ------------------------------------------------------------------------------------------------
# the wheel folder, or none with PIP_SOURCE=index: a stage chosen by the argument (BuildKit skips the
# other one; the classic builder builds both, so pyproject.toml is listed for the COPY to succeed
# also when the folder is missing). The wheels never reach the final image.
# ------------------------------------------------------------------------------------------------
FROM scratch AS wheels-from-wheels
ARG WHEELS=docker/wheels/train
COPY pyproject.toml ${WHEELS}/*.whl /wheels/

FROM scratch AS wheels-from-index
COPY pyproject.toml /wheels/

FROM wheels-from-${PIP_SOURCE} AS wheels

# ------------------------------------------------------------------------------------------------
# build: a virtual environment with torch and the training extra, from the wheel folder (or the index)
# ------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_SOURCE
ARG WHEELS=docker/wheels/train
ARG TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
ARG EXTRAS=train
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY --from=wheels /wheels/ /tmp/wheels/
COPY pyproject.toml README* /app/
COPY dino/ /app/dino/
COPY service/ /app/service/
COPY training/ /app/training/

# editable: the package stays at /app (the working directory of the image, as in a checkout)
RUN set -eu; \
    case "$PIP_SOURCE" in \
      wheels) src="--no-index --find-links /tmp/wheels" ;; \
      index)  src="--find-links /tmp/wheels" ;; \
      *) echo "PIP_SOURCE must be 'wheels' or 'index', not '$PIP_SOURCE'" >&2; exit 1 ;; \
    esac; \
    if [ "$PIP_SOURCE" = wheels ] && ! ls /tmp/wheels/*.whl >/dev/null 2>&1; then \
      echo "no wheels in $WHEELS: prepare the folder with 'pip download' (docker/README.md) or build with --build-arg PIP_SOURCE=index" >&2; \
      exit 1; \
    fi; \
    pip install $src "setuptools>=68"; \
    pip install $src --no-build-isolation $TORCH_PINS --editable "/app[$EXTRAS]"; \
    pip check; \
    python -m compileall -q /app/dino /app/service /app/training; \
    rm -rf /tmp/wheels

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
