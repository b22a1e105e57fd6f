"""The gallery backends behind the HTTP API (TestClient, real model, real photos), the Milvus
backend's own rules (collection names, URIs, foreign collections, image limits, an outage at the
gallery level) and the multi-process checks of ``dino serve``."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from dino.cli import main as dino
from service.app import create_app
from service.gallery import GalleryEntryTooLarge, GalleryError, GalleryUnavailableError, UnknownImageError
from service.gallery.factory import check_multi_process
from service.gallery.milvus_schema import (
    MAX_IMAGE_BYTES,
    check_collection_name,
    default_collection_name,
    is_server_uri,
    lite_path,
    public_uri,
)
from service.settings import ServiceSettings
from tests.service.images import multipart, photo_bytes

DIM = 8
SHA = "c" * 64
#: seconds a gallery may take to come back once Milvus is (a few retry intervals)
RECOVERY_SECONDS = 30


def make_settings(model_dir, **overrides) -> ServiceSettings:
    values = dict(model_dir=model_dir, max_batch_wait_ms=2, preprocess_threads=2, warmup_batches=1)
    values.update(overrides)
    return ServiceSettings(**values)


def gallery_settings(backend: str, model_dir, tmp_path, **overrides) -> ServiceSettings:
    if backend == "faiss":
        return make_settings(model_dir, index_dir=tmp_path / "gallery", **overrides)
    return make_settings(model_dir, gallery="milvus", milvus_uri=str(tmp_path / "gallery.db"), **overrides)


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("backend", ["faiss", "milvus-lite"])
def test_every_gallery_route_answers_the_same_on_both_backends(backend, model_dir, tmp_path):
    photos = [photo_bytes(i) for i in (20, 21, 22)]
    with TestClient(create_app(gallery_settings(backend, model_dir, tmp_path))) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["missing"] == []
        assert ready["gallery"] == {"backend": backend.split("-")[0], "available": True, "detail": None}
        metadata = [{"n": i, "tags": ["x", i]} for i in range(3)]
        added = client.post(
            "/index", files=multipart(*photos), data={"labels": ["a", "b", "c"], "metadata": json.dumps(metadata)}
        )
        assert added.status_code == 200, added.text
        ids = added.json()["ids"]
        info = client.get("/index").json()
        assert info["size"] == 3 and info["dim"] == 192 and info["backend"] == backend.split("-")[0]
        assert info["persistent"] is True and info["read_only"] is False

        best = client.post("/neighbors?k=2", files=multipart(photos[1])).json()["neighbors"]
        assert best[0]["id"] == ids[1] and best[0]["score"] > 0.999
        assert best[0]["label"] == "b" and best[0]["metadata"] == metadata[1]
        stored = client.get(f"/neighbors/{ids[0]}?k=5").json()["neighbors"]
        assert sorted(n["id"] for n in stored) == sorted(ids[1:])
        image = client.get(f"/index/{ids[2]}/image")
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)
        attention = client.get(f"/attention/{ids[2]}?format=json").json()
        assert attention["grid"] == [8, 8]
        listing = client.get("/index/items", params={"offset": 1, "limit": 5}).json()
        assert listing["total"] == 3 and [e["id"] for e in listing["items"]] == ids[1:]
        assert listing["items"][0] == {"id": ids[1], "label": "b", "metadata": metadata[1]}

        assert client.delete(f"/index/{ids[0]}").json() == {"id": ids[0], "deleted": True}
        for method, url in [
            ("DELETE", f"/index/{ids[0]}"),
            ("GET", f"/index/{ids[0]}/image"),
            ("GET", f"/neighbors/{ids[0]}"),
            ("GET", f"/attention/{ids[0]}"),
        ]:
            answer = client.request(method, url)
            assert answer.status_code == 404 and ids[0] in answer.json()["detail"], url
        assert client.get("/index").json()["size"] == 2
        assert "dino_gallery_available 1.0" in client.get("/metrics").text

    # a restart finds the same gallery
    with TestClient(create_app(gallery_settings(backend, model_dir, tmp_path))) as client:
        assert [e["id"] for e in client.get("/index/items").json()["items"]] == ids[1:]


def test_milvus_refuses_another_models_collection_at_startup(model_dir, tmp_path):
    from service.gallery.milvus_store import MilvusGallery

    settings = gallery_settings("milvus-lite", model_dir, tmp_path)
    # a model of the same name and size (say, exported again after more training): same default collection
    name = default_collection_name("test-vit-tiny8", 192)
    uri = settings.milvus_uri or ""
    MilvusGallery(uri, dim=192, model_sha256="f" * 64, model_name="another-model", collection=name).close()
    with pytest.raises(GalleryError, match="another-model"), TestClient(create_app(settings)):
        pass
    # an operator who means it points the service at another collection
    with TestClient(create_app(settings.model_copy(update={"milvus_collection": "mine"}))) as client:
        assert client.get("/index").json()["collection"] == "mine"


def test_collection_names_uris_and_settings(monkeypatch):
    assert default_collection_name("ViT-S/16 (DINO)", 384) == "dino_vit_s_16_dino_384"
    assert default_collection_name("", 8) == "dino_model_8"
    assert check_collection_name(default_collection_name("x" * 400, 768)) == "dino_" + "x" * 200 + "_768"
    for bad in ["1abc", "with-dash", "a" * 256, ""]:
        with pytest.raises(GalleryError, match="collection name"):
            check_collection_name(bad)
    assert is_server_uri("http://127.0.0.1:19530") and is_server_uri("https://h:443") and is_server_uri("unix:/s")
    assert not is_server_uri("gallery/milvus.db") and not is_server_uri("/abs/g.db")
    with pytest.raises(GalleryError, match=r"ends in \.db"):
        lite_path("gallery/milvus")
    assert public_uri("http://root:secret@db.example:19530/dbname") == "http://db.example:19530/dbname"
    with pytest.raises(ValidationError, match="DINO_MILVUS_URI"):
        ServiceSettings(gallery="milvus")
    for name, value in {"GALLERY": "milvus", "MILVUS_URI": "http://127.0.0.1:1", "MILVUS_TOKEN": ""}.items():
        monkeypatch.setenv(f"DINO_{name}", value)
    monkeypatch.setenv("DINO_MILVUS_INDEX_PARAMS", '{"M": 8}')
    settings = ServiceSettings()
    assert settings.milvus_token is None and settings.milvus_index_params == {"M": 8}


def test_milvus_limits_are_refused_before_anything_is_stored(tmp_path):
    from service.gallery.milvus_store import MilvusGallery

    gallery = MilvusGallery(str(tmp_path / "g.db"), dim=DIM, model_sha256=SHA, model_name="m")
    try:
        with pytest.raises(GalleryEntryTooLarge, match="DINO_THUMBNAIL_SIZE"):
            gallery.add(unit_vectors(2), images=[b"ok", b"x" * (MAX_IMAGE_BYTES + 1)])
        with pytest.raises(GalleryEntryTooLarge, match="metadata"):
            gallery.add(unit_vectors(1), metadata=[{"big": "x" * 70_000}])
        assert gallery.info()["size"] == 0
    finally:
        gallery.close()


def test_milvus_lite_builds_hnsw_with_the_configured_parameters(tmp_path):
    """pymilvus 3 sends build parameters as separate keys, which Milvus Lite ignores (it built M 16
    whatever DINO_HNSW_M said): the collection's own record must show the configured graph."""
    from service.gallery.milvus_store import MilvusGallery

    gallery = MilvusGallery(
        str(tmp_path / "g.db"), dim=DIM, model_sha256=SHA, model_name="m", hnsw_m=8, hnsw_ef_construction=40
    )
    try:
        gallery.add(unit_vectors(20))
    finally:
        gallery.close()
    (manifest,) = (tmp_path / "g.db").glob("collections/*/manifest.json")
    spec = json.loads(manifest.read_text())["index_specs"]["embedding"]
    assert spec["index_type"] == "HNSW" and spec["build_params"] == {"M": 8, "efConstruction": 40}


def test_a_foreign_milvus_collection_is_refused(tmp_path):
    from pymilvus import MilvusClient

    from service.gallery.milvus_store import MilvusGallery

    uri = str(tmp_path / "g.db")
    client = MilvusClient(uri=uri)
    client.create_collection("someone_elses", dimension=DIM)
    client.close()
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(uri)
    with pytest.raises(GalleryError, match="not a DINO gallery"):
        MilvusGallery(uri, dim=DIM, model_sha256=SHA, collection="someone_elses")


def test_a_milvus_lite_database_is_opened_by_one_process(model_dir, tmp_path, capsys):
    from service.gallery.milvus_store import MilvusGallery

    uri = str(tmp_path / "g.db")
    serve = ["serve", "--model", str(model_dir), "--gallery", "milvus", "--milvus-uri", uri, "--workers", "2"]
    assert dino(serve) == 2
    assert "run a Milvus server" in capsys.readouterr().err
    shared = make_settings(model_dir, gallery="milvus", milvus_uri="http://127.0.0.1:19530", workers=2)
    assert check_multi_process(shared) is False  # a Milvus server: every worker writes
    first = MilvusGallery(uri, dim=DIM, model_sha256=SHA)
    try:
        # what a second process meets (flock conflicts between two open files alike)
        with pytest.raises(GalleryError, match="open in another process"):
            MilvusGallery(uri, dim=DIM, model_sha256=SHA)
    finally:
        first.close()


@pytest.mark.slow
def test_a_milvus_outage_is_a_503_and_the_gallery_comes_back(milvus_server, milvus_collection):
    """At the gallery level: calls fail fast with GalleryUnavailableError while the server is down,
    and the gallery recovers (reconnects, reloads the collection) once it is back on the same port."""
    from service.gallery.milvus_store import MilvusGallery

    gallery = MilvusGallery(
        milvus_server.uri, dim=DIM, model_sha256=SHA, collection=milvus_collection, timeout=3, retry_interval=0.2
    )
    try:
        ids = gallery.add(unit_vectors(4), ["a", "b", "c", "d"], images=[b"i%d" % i for i in range(4)])
        milvus_server.stop()
        with pytest.raises(GalleryUnavailableError, match="unavailable") as refused:
            gallery.search(unit_vectors(1)[0], 2)
        assert milvus_server.uri.split("//")[1] in str(refused.value)
        health = gallery.health()
        assert health.available is False and f"Milvus at {milvus_server.uri}" in (health.detail or "")
        with pytest.raises(GalleryUnavailableError):
            gallery.check_writable()  # known down: refused before any work
        assert gallery.probe().available is False
        milvus_server.start()
        deadline = time.monotonic() + RECOVERY_SECONDS
        while not gallery.probe().available and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gallery.health().available, gallery.health().detail
        assert gallery.search(unit_vectors(4)[2], 1)[0].id == ids[2]
        assert gallery.read_image(ids[3]) == b"i3"
        with pytest.raises(UnknownImageError):
            gallery.entry("0" * 32)
    finally:
        milvus_server.start()
        gallery.close()


@pytest.mark.slow
def test_a_service_may_start_before_milvus(milvus_server, milvus_collection):
    """Milvus unreachable when the gallery opens: no error (the service starts degraded), and the
    first probe after Milvus is up connects, creates the collection and serves."""
    from service.gallery.milvus_store import MilvusGallery

    milvus_server.stop()
    try:
        gallery = MilvusGallery(
            milvus_server.uri, dim=DIM, model_sha256=SHA, collection=milvus_collection, timeout=3, retry_interval=0.2
        )
        assert gallery.health().available is False
        with pytest.raises(GalleryUnavailableError):
            gallery.info()
    finally:
        milvus_server.start()
    try:
        deadline = time.monotonic() + RECOVERY_SECONDS
        while not gallery.probe().available and time.monotonic() < deadline:
            time.sleep(0.2)
        (image_id,) = gallery.add(unit_vectors(1), ["late"])
        assert gallery.entry(image_id)["label"] == "late" and gallery.info()["size"] == 1
    finally:
        gallery.close()


def test_a_failed_milvus_call_is_a_503_and_the_next_attempt_reconnects(tmp_path, monkeypatch):
    from pymilvus.exceptions import MilvusException

    from service.gallery.milvus_store import MilvusGallery

    gallery = MilvusGallery(str(tmp_path / "g.db"), dim=DIM, model_sha256=SHA, retry_interval=0.05)
    try:
        ids = gallery.add(unit_vectors(2))

        def fail(*args, **kwargs):
            raise MilvusException(message="simulated failure")

        monkeypatch.setattr(gallery._client, "search", fail)
        with pytest.raises(GalleryUnavailableError, match="simulated failure"):
            gallery.search(unit_vectors(2)[1], 1)
        assert gallery.health().available is False
        with pytest.raises(GalleryUnavailableError):  # within the retry interval: at once, no call
            gallery.entry(ids[0])
        monkeypatch.undo()
        time.sleep(0.1)
        assert gallery.search(unit_vectors(2)[1], 1)[0].id == ids[1]
        assert gallery.health().available is True
    finally:
        gallery.close()
