"""Fixtures of the service tests: the test model, and a Milvus server for the Milvus gallery.

The test model is a randomly initialised ViT-Tiny/8 at 64 px exported by ``training.export`` (the
real exporter). Exporting takes ~15-20 s on two cores, so the folder is cached in pytest's cache
directory under a key made of the exporter's source and the torch/timm/onnx versions: a change to
the exporter (or to the backbone) produces a fresh export, on the first test that asks for it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_MODEL = {"arch": "vit_tiny", "patch_size": 8, "image_size": 64, "seed": 0}


def _exporter_fingerprint() -> str:
    """Exporter source + library versions (read from package metadata: importing torch is slow)."""
    digest = hashlib.sha256()
    for source in ("training/export.py", "training/export_graph.py", "training/backbone.py"):
        digest.update((REPO / source).read_bytes())
    versions = [importlib.metadata.version(package) for package in ("torch", "timm", "onnx", "onnxscript")]
    digest.update(f"{versions} {sorted(TEST_MODEL.items())}".encode())
    return digest.hexdigest()[:16]


@functools.cache
def export_test_model(cache_root: Path) -> Path:
    """Export (once per exporter version) the tiny test model; returns its model folder."""
    folder = cache_root / f"vit_tiny8_64-{_exporter_fingerprint()}"
    if (folder / "model.json").is_file():
        return folder
    import torch

    from training.backbone import build_backbone
    from training.export import export_backbone

    torch.manual_seed(TEST_MODEL["seed"])
    backbone = build_backbone(TEST_MODEL["arch"], TEST_MODEL["patch_size"], TEST_MODEL["image_size"])
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    export_backbone(
        backbone,
        tmp,
        name="test-vit-tiny8",
        arch=TEST_MODEL["arch"],
        patch_size=TEST_MODEL["patch_size"],
        image_size=TEST_MODEL["image_size"],
        provenance={"source": "random init (service tests)", "seed": TEST_MODEL["seed"]},
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for stale in cache_root.glob("vit_tiny8_64-*"):  # exports of older exporter versions
        if stale != folder and not stale.name.endswith(f".tmp{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return folder


@pytest.fixture(scope="session")
def model_dir(request, tmp_path_factory) -> Path:
    """A model folder made by training.export (cached across test runs in pytest's cache folder)."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    root = Path(cache.mkdir("dino-service-test-model")) if cache is not None else tmp_path_factory.mktemp("model")
    return export_test_model(root)


@pytest.fixture(scope="session")
def milvus_server_process(tmp_path_factory):
    """One Milvus server (milvus-lite's gRPC server) for the session, always stopped at the end."""
    from tests.service.milvus_server import MilvusLiteServer

    root = tmp_path_factory.mktemp("milvus")
    server = MilvusLiteServer(root / "data", root / "milvus.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def milvus_server(milvus_server_process):
    """The session's Milvus server, running (started again if an earlier test left it stopped).

    Tests put their gallery in a collection of their own (``milvus_collection``); a test that stops
    the server (an outage) starts it again on the same data folder and port."""
    return milvus_server_process.start()


@pytest.fixture
def milvus_collection(request) -> str:
    """A Milvus collection name of the current test's own (letters, digits, underscores)."""
    return "t_" + re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:200]
