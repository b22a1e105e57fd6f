"""``dino index build`` (service.index_cli): a gallery from an image folder, and from the Parquet
output of ``dino embed`` without recomputing, into a FAISS folder, Milvus Lite or a Milvus server."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dino.cli import main as dino
from service.app import create_app
from service.gallery import EmbeddingIndex, UnknownImageError
from service.gallery.milvus_store import MilvusGallery
from service.settings import ServiceSettings
from tests.service.images import multipart, photo_paths

#: label -> indices into the sorted ImageNet-sample photos
LAYOUT = {"fish": [0, 1], "birds": [10, 11, 12]}
#: dino embed and dino index build --images run the same model on the same pixels
MAX_ABS_DIFF = 1e-6


def model_sha256(model_dir: Path) -> str:
    return json.loads((model_dir / "model.json").read_text())["sha256"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Five photos in two labelled subfolders (links: never copies of the shared photos), one broken file."""
    photos = photo_paths()
    root = tmp_path_factory.mktemp("images")
    for label, chosen in LAYOUT.items():
        (root / label).mkdir()
        for i in chosen:
            os.symlink(photos[i], root / label / photos[i].name)
    (root / "birds" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def embeddings(model_dir, images, tmp_path_factory) -> Path:
    """The images embedded by ``dino embed`` (a Parquet dataset)."""
    output = tmp_path_factory.mktemp("embed") / "embeddings"
    command = ["embed", "--no-progress", "--provider", "cpu", "--model", str(model_dir)]
    assert dino(command + ["--images", str(images), "--output", str(output)]) == 0
    return output


def build(capsys, model_dir: Path, *args) -> tuple[int, str, str]:
    """``dino index build`` in this process: (exit code, stdout, stderr)."""
    code = dino(["index", "build", "--no-progress", "--provider", "cpu", "--model", str(model_dir), *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def entries_by_path(gallery) -> dict[str, dict]:
    """path -> id, label, embedding and stored image (None when there is none) of every gallery entry."""
    found = {}
    for image_id in gallery.ids():
        entry = gallery.entry(image_id)
        try:
            image = gallery.read_image(image_id)
        except UnknownImageError:
            image = None
        found[entry["metadata"]["path"]] = {
            "id": image_id,
            "label": entry["label"],
            "embedding": gallery.embedding(image_id),
            "image": image,
        }
    return found


def test_from_images_and_serving_the_result(model_dir, images, tmp_path, capsys):
    output = tmp_path / "gallery"
    code, out, _ = build(capsys, model_dir, "--images", images, "--output", output, "--batch-size", 2)
    assert code == 0 and "indexed 5 images (1 skipped)" in out
    code, _, err = build(capsys, model_dir, "--images", images, "--output", output)
    assert code == 1 and "--append" in err

    index = EmbeddingIndex(output, dim=192, model_sha256=model_sha256(model_dir))
    found = entries_by_path(index)
    index.close()
    photos = photo_paths()
    assert {path: e["label"] for path, e in found.items()} == {
        f"{label}/{photos[i].name}": label for label, chosen in LAYOUT.items() for i in chosen
    }
    assert all(e["image"] for e in found.values())

    settings = ServiceSettings(model_dir=model_dir, index_dir=output, warmup_batches=1)
    with TestClient(create_app(settings)) as client:
        assert client.get("/index").json()["size"] == 5
        best = client.post("/neighbors?k=1", files=multipart(photos[11].read_bytes())).json()["neighbors"][0]
        assert best["label"] == "birds" and best["metadata"]["path"] == f"birds/{photos[11].name}"
        assert best["score"] > 0.999


def test_from_embeddings_equals_from_images_without_recomputing(model_dir, images, embeddings, tmp_path, capsys):
    assert build(capsys, model_dir, "--images", images, "--output", tmp_path / "computed")[0] == 0
    code, out, _ = build(capsys, model_dir, "--embeddings", embeddings, "--images", images, "--output", tmp_path / "g")
    assert code == 0 and "loaded 5 embeddings (0 already in the gallery)" in out, out

    sha = model_sha256(model_dir)
    computed, loaded = (EmbeddingIndex(tmp_path / name, dim=192, model_sha256=sha) for name in ("computed", "g"))
    want, got = entries_by_path(computed), entries_by_path(loaded)
    assert sorted(got) == sorted(want)
    for path, entry in got.items():
        assert entry["label"] == want[path]["label"]
        assert np.abs(entry["embedding"] - want[path]["embedding"]).max() <= MAX_ABS_DIFF
        assert entry["image"] == want[path]["image"]  # the same stored JPEG, made from the file
    # the dataset's ids (sha256 of the path) become the gallery's
    import pyarrow.parquet as pq

    table = pq.read_table(embeddings)
    assert {e["id"] for e in got.values()} == set(table.column("id").to_pylist())
    computed.close()
    loaded.close()

    # a rerun loads only what is missing
    code, out, _ = build(capsys, model_dir, "--embeddings", embeddings, "--output", tmp_path / "g", "--append")
    assert code == 0 and "loaded 0 embeddings (5 already in the gallery)" in out and "holds 5 images" in out


def test_from_embeddings_alone_has_no_stored_images(model_dir, embeddings, tmp_path, capsys):
    assert build(capsys, model_dir, "--embeddings", embeddings, "--output", tmp_path / "g")[0] == 0
    settings = ServiceSettings(model_dir=model_dir, index_dir=tmp_path / "g", warmup_batches=0)
    with TestClient(create_app(settings)) as client:
        first = client.get("/index/items").json()["items"][0]
        assert first["metadata"]["path"].endswith(".JPEG")
        response = client.get(f"/index/{first['id']}/image")
        assert response.status_code == 404 and "detail" in response.json()


def test_embeddings_of_another_model_and_bad_folders_are_one_line(model_dir, images, embeddings, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    shutil.copytree(embeddings, foreign)
    manifest = json.loads((foreign / "_embed.json").read_text())
    manifest["model"].update(name="another-model", sha256="0" * 64)
    (foreign / "_embed.json").write_text(json.dumps(manifest))
    (tmp_path / "parts-only").mkdir()
    not_parquet = tmp_path / "torn"
    shutil.copytree(embeddings, not_parquet)
    next(not_parquet.glob("part-*.parquet")).write_bytes(b"PAR1 torn")

    cases = {
        "holds embeddings of model 'another-model'": ["--embeddings", foreign, "--output", tmp_path / "a"],
        "not a dino embed output folder": ["--embeddings", images, "--output", tmp_path / "b"],
        "is not a folder": ["--embeddings", tmp_path / "missing", "--output", tmp_path / "c"],
        "is unreadable": ["--embeddings", not_parquet, "--output", tmp_path / "d"],
        "needed for a faiss gallery": ["--embeddings", embeddings],
        "lives at --milvus-uri": ["--embeddings", embeddings, "--gallery", "milvus", "--milvus-uri", tmp_path / "m.db"]
        + ["--output", tmp_path / "e"],
    }
    for expected, args in cases.items():
        code, out, err = build(capsys, model_dir, *args)
        assert code == 1 and expected in err and "Traceback" not in err, (expected, err)
        assert err.count("\n") == 1, err
    assert not any((tmp_path / name).exists() for name in "abcde")
    code, _, err = build(capsys, model_dir)
    assert code == 2 and "--images DIR, or --embeddings DIR" in err


def test_into_milvus_lite_and_served_from_it(model_dir, images, embeddings, tmp_path, capsys, milvus_collection):
    uri = tmp_path / "gallery.db"
    milvus = ["--gallery", "milvus", "--milvus-uri", uri, "--milvus-collection", milvus_collection]
    code, out, _ = build(capsys, model_dir, "--embeddings", embeddings, "--images", images, *milvus)
    assert code == 0 and "loaded 5 embeddings" in out and "holds 5 images" in out, out
    code, _, err = build(capsys, model_dir, "--images", images, *milvus)
    assert code == 1 and "already holds 5 images; pass --append" in err

    photos = photo_paths()
    settings = ServiceSettings(
        model_dir=model_dir, gallery="milvus", milvus_uri=str(uri), milvus_collection=milvus_collection
    )
    with TestClient(create_app(settings)) as client:
        best = client.post("/neighbors?k=1", files=multipart(photos[0].read_bytes())).json()["neighbors"][0]
        assert best["label"] == "fish" and best["score"] > 0.999
        image = client.get(f"/index/{best['id']}/image")
        assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"


@pytest.mark.slow
def test_from_images_into_a_milvus_server(model_dir, images, milvus_server, milvus_collection, capsys):
    milvus = ["--gallery", "milvus", "--milvus-uri", milvus_server.uri, "--milvus-collection", milvus_collection]
    code, out, _ = build(capsys, model_dir, "--images", images, *milvus)
    assert code == 0 and "indexed 5 images (1 skipped)" in out and "holds 5 images" in out, out
    gallery = MilvusGallery(
        milvus_server.uri, dim=192, model_sha256=model_sha256(model_dir), collection=milvus_collection
    )
    try:
        found = entries_by_path(gallery)
        assert sorted(e["label"] for e in found.values()) == ["birds"] * 3 + ["fish"] * 2
        assert all(e["image"] for e in found.values())
    finally:
        gallery.close()
