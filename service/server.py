"""``dino serve``: run the feature service with uvicorn.

Settings come from ``DINO_*`` environment variables (see :mod:`service.settings`); the flags given
here override them. They reach the app (and every ``--workers`` process) through the environment,
and uvicorn builds the app with :func:`service.app.create_app_from_env`.

With ``--workers N > 1`` every worker loads the model and the gallery. A FAISS gallery (the
default) is then served read-only: several processes appending to one index folder would lose each
other's writes. It must exist and no other process may be writing it (checked before the workers
start); add images with one worker or build the gallery offline with ``dino index build``. A Milvus
server gallery (``--gallery milvus --milvus-uri http://HOST:19530``) is shared: every worker, and
every other ``dino serve`` on any machine, adds, deletes and searches. A Milvus Lite file is opened by
one process, so it is refused with several workers.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys

from pydantic import ValidationError

from service.gallery import GalleryError
from service.gallery.factory import check_multi_process
from service.runtime import ModelLoadError, check_model_file
from service.settings import ModelNotFoundError, ServiceSettings

ENV_PREFIX = "DINO_"
#: flag destination -> settings field (the flags that only exist on the command line are not listed)
FLAG_TO_SETTING = {
    "model": "model_dir",
    "index": "index_dir",
    "host": "host",
    "port": "port",
    "workers": "workers",
    "log_level": "log_level",
    "provider": "provider",
    "index_type": "index_type",
    "gallery": "gallery",
    "milvus_uri": "milvus_uri",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder (default: DINO_MODEL_DIR, else the first folder of models/)")
    parser.add_argument(
        "--index", help="gallery index folder, created if missing (default: DINO_INDEX_DIR, else in memory)"
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument(
        "--workers", type=int, help="worker processes (default 1; > 1 serves a FAISS gallery read-only)"
    )
    parser.add_argument(
        "--provider", choices=["auto", "cpu", "cuda"], help="onnxruntime execution provider (default auto)"
    )
    parser.add_argument(
        "--index-type", choices=["flat", "hnsw"], help="gallery search: exact (flat) or HNSW (default flat)"
    )
    parser.add_argument(
        "--gallery", choices=["faiss", "milvus"], help="gallery backend (default faiss: the --index folder)"
    )
    parser.add_argument(
        "--milvus-uri", help="milvus backend: http://HOST:19530 (a shared Milvus server) or PATH.db (Milvus Lite)"
    )
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], help="default info")
    parser.epilog = (
        "Every setting can also be given as an environment variable with the prefix DINO_ "
        "(e.g. DINO_API_KEY, DINO_MAX_BATCH_SIZE, DINO_MAX_UPLOAD_BYTES); flags take precedence."
    )


def log_config(level: str) -> dict:
    """uvicorn's logging config plus the service's own loggers (model provider, gallery, errors)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["service"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def main(args: argparse.Namespace) -> int:
    overrides = {
        setting: getattr(args, flag)
        for flag, setting in FLAG_TO_SETTING.items()
        if getattr(args, flag, None) is not None
    }
    try:
        settings = ServiceSettings(**overrides)
        check_model_file(settings)  # fail now, clearly, rather than in every worker
        if check_multi_process(settings) and not settings.index_read_only:
            print(f"dino serve: {settings.workers} workers: the gallery is served read-only", file=sys.stderr)
            overrides["index_read_only"] = True
    except ValidationError as exc:
        print(f"dino serve: invalid setting: {exc}", file=sys.stderr)
        return 2
    except (ModelNotFoundError, ModelLoadError, GalleryError) as exc:
        print(f"dino serve: {exc}", file=sys.stderr)
        return 2
    # the workers are separate processes: hand them the flags through their environment
    for setting, value in overrides.items():
        os.environ[ENV_PREFIX + setting.upper()] = str(value)

    import uvicorn

    from service.http_protocol import LimitedHttpToolsProtocol

    logging.getLogger("service").setLevel(settings.log_level.upper())
    uvicorn.run(
        "service.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        # allow a request in flight (and its gallery fsync) to finish on Ctrl-C / SIGTERM
        timeout_graceful_shutdown=10,
        # limits on the request head's size and arrival time (uvicorn has neither)
        http=LimitedHttpToolsProtocol,
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    return 0
