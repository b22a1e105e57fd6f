"""The gallery contract (service.gallery.Gallery), run against every backend: the FAISS folder, Milvus
Lite inside the test process (a ``.db`` path), and a Milvus server shared over gRPC (milvus-lite's
server, the ``milvus_server`` fixture).

Add, delete, search, neighbours of a stored id, labels and metadata, the stored image, the listing,
persistence across a restart, refusal of another model's gallery, read-only galleries, given ids.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.gallery import (
    EmbeddingIndex,
    Gallery,
    GalleryError,
    GalleryModelMismatch,
    GalleryReadOnlyError,
    UnknownImageError,
    is_valid_image_id,
)

DIM = 16
SHA = "a" * 64
MODEL = "contract-model"
BACKENDS = ["faiss", "milvus-lite", pytest.param("milvus-server", marks=pytest.mark.slow)]


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Opener:
    """Opens the gallery of one test at one place, as many times as the test asks (a restart is a
    close and an open), and closes whatever is still open at the end."""

    def __init__(self, backend: str, tmp_path, server_uri: str | None, collection: str):
        self.backend, self.tmp_path, self.server_uri, self.collection = backend, tmp_path, server_uri, collection
        self.opened: list[Gallery] = []

    def __call__(self, *, dim: int = DIM, sha: str = SHA, read_only: bool = False) -> Gallery:
        gallery: Gallery
        if self.backend == "faiss":
            gallery = EmbeddingIndex(
                self.tmp_path / "gallery", dim=dim, model_sha256=sha, model_name=MODEL, read_only=read_only
            )
        else:
            from service.gallery.milvus_store import MilvusGallery

            uri = self.server_uri if self.backend == "milvus-server" else str(self.tmp_path / "gallery.db")
            assert uri is not None
            gallery = MilvusGallery(
                uri,
                dim=dim,
                model_sha256=sha,
                model_name=MODEL,
                collection=self.collection,
                read_only=read_only,
                timeout=5.0,
            )
        self.opened.append(gallery)
        return gallery

    def restart(self, gallery: Gallery, **kwargs) -> Gallery:
        gallery.close()
        return self(**kwargs)

    def close_all(self) -> None:
        for gallery in self.opened:
            gallery.close()


@pytest.fixture(params=BACKENDS)
def open_gallery(request, tmp_path, milvus_collection):
    server_uri = request.getfixturevalue("milvus_server").uri if request.param == "milvus-server" else None
    opener = Opener(request.param, tmp_path, server_uri, milvus_collection)
    yield opener
    opener.close_all()


def test_search_ranks_by_cosine_with_labels_and_metadata(open_gallery):
    gallery = open_gallery()
    vectors = unit_vectors(60)
    labels = [f"label {i}" for i in range(30)] + [None] * 30
    metadata = [{"i": i, "nested": {"tags": ["a", i], "ok": True, "x": 0.5}} for i in range(30)] + [None] * 30
    ids = gallery.add(vectors[:30], labels[:30], metadata[:30])
    ids += gallery.add(vectors[30:])
    assert len(set(ids)) == 60 and all(is_valid_image_id(i) for i in ids)
    for q in (0, 7, 45):
        found = gallery.search(vectors[q], 5)
        expected = [ids[j] for j in np.argsort(-(vectors @ vectors[q]))[:5]]
        assert [n.id for n in found] == expected
        assert found[0].score == pytest.approx(1.0, abs=1e-5)
        assert (found[0].label, found[0].metadata) == (labels[q], metadata[q])
        assert all(a.score >= b.score for a, b in zip(found, found[1:], strict=False))
    assert gallery.entry(ids[3]) == {"id": ids[3], "label": "label 3", "metadata": metadata[3]}
    assert gallery.entry(ids[40]) == {"id": ids[40], "label": None, "metadata": None}
    assert np.allclose(gallery.embedding(ids[5]), vectors[5], atol=1e-6)
    assert len(gallery.search(vectors[0], 100)) == 60  # k beyond the gallery: all of it


def test_unicode_labels_and_odd_metadata_round_trip(open_gallery):
    gallery = open_gallery()
    labels = ["chat noir 🐈", "", "Ω/≈\\\"'", None]
    metadata = [{"emoji": "🐈", "empty": {}, "list": [1, 2.5, None, "x"]}, {}, {"deep": {"a": {"b": {"c": 1}}}}, None]
    ids = gallery.add(unit_vectors(4, seed=1), labels, metadata)
    assert [gallery.entry(i) for i in ids] == [
        {"id": i, "label": label, "metadata": meta} for i, label, meta in zip(ids, labels, metadata, strict=True)
    ]


def test_neighbours_of_a_stored_image_exclude_it(open_gallery):
    gallery = open_gallery()
    vectors = unit_vectors(20, seed=2)
    ids = gallery.add(vectors)
    query = gallery.embedding(ids[4])
    found = gallery.search(query, 3, exclude=ids[4])
    assert ids[4] not in [n.id for n in found] and len(found) == 3
    expected = [ids[j] for j in np.argsort(-(vectors @ vectors[4]))[1:4]]
    assert [n.id for n in found] == expected


def test_delete_removes_everywhere_and_unknown_ids_are_refused(open_gallery):
    gallery = open_gallery()
    vectors = unit_vectors(6, seed=3)
    ids = gallery.add(vectors, images=[b"jpeg-%d" % i for i in range(6)])
    gallery.delete(ids[2])
    assert ids[2] not in [n.id for n in gallery.search(vectors[2], 6)]
    for read in (gallery.entry, gallery.embedding, gallery.read_image, gallery.delete):
        with pytest.raises(UnknownImageError):
            read(ids[2])
    assert gallery.ids() == ids[:2] + ids[3:]
    for bad in ["../../etc/passwd", "", "A" * 32, ids[0] + "0", 'x" or id != "', "0" * 32]:
        with pytest.raises(UnknownImageError):
            gallery.read_image(bad)
        with pytest.raises(UnknownImageError):
            gallery.delete(bad)
    assert gallery.info()["size"] == 5


def test_stored_images_round_trip_small_large_and_missing(open_gallery):
    gallery = open_gallery()
    large = np.random.default_rng(4).integers(0, 256, 300_000, dtype=np.uint8).tobytes()  # several Milvus chunks
    ids = gallery.add(unit_vectors(3, seed=4), images=[b"\xff\xd8small", large, b"\xff\xd8x"])
    assert gallery.read_image(ids[0]) == b"\xff\xd8small" and gallery.read_image(ids[1]) == large
    (no_image,) = gallery.add(unit_vectors(1, seed=5))  # a bulk load of embeddings alone
    with pytest.raises(UnknownImageError):
        gallery.read_image(no_image)


def test_listing_pages_in_the_order_added(open_gallery):
    gallery = open_gallery()
    ids = gallery.add(unit_vectors(5, seed=6), [f"first {i}" for i in range(5)])
    ids += gallery.add(unit_vectors(4, seed=7), [f"second {i}" for i in range(4)], [{"n": i} for i in range(4)])
    total, page = gallery.items(0, 4)
    assert total == 9 and [e["id"] for e in page] == ids[:4]
    total, page = gallery.items(7, 10)
    assert total == 9 and page == [
        {"id": ids[7], "label": "second 2", "metadata": {"n": 2}},
        {"id": ids[8], "label": "second 3", "metadata": {"n": 3}},
    ]
    assert gallery.items(9, 5) == (9, [])
    assert gallery.ids() == ids


def test_empty_gallery(open_gallery):
    gallery = open_gallery()
    assert gallery.search(unit_vectors(1)[0], 5) == []
    assert gallery.items(0, 10) == (0, [])
    info = gallery.info()
    assert info["size"] == 0 and info["dim"] == DIM and info["model_sha256"] == SHA
    assert info["backend"] == ("faiss" if isinstance(gallery, EmbeddingIndex) else "milvus")


def test_everything_survives_a_restart(open_gallery):
    gallery = open_gallery()
    vectors = unit_vectors(12, seed=8)
    labels, metadata = [f"l{i}" for i in range(12)], [{"i": i} for i in range(12)]
    ids = gallery.add(vectors, labels, metadata, [b"img%d" % i for i in range(12)])
    gallery.delete(ids[5])

    def snapshot(g: Gallery) -> dict:
        return {i: (g.entry(i), g.embedding(i).round(6).tolist(), g.read_image(i)) for i in g.ids()}

    before = snapshot(gallery)
    results = [[(n.id, round(n.score, 5)) for n in gallery.search(v, 4)] for v in vectors[:3]]
    gallery = open_gallery.restart(gallery)
    assert snapshot(gallery) == before and len(before) == 11
    assert [[(n.id, round(n.score, 5)) for n in gallery.search(v, 4)] for v in vectors[:3]] == results
    assert gallery.info()["size"] == 11


def test_a_gallery_of_another_model_is_refused(open_gallery):
    open_gallery().close()
    with pytest.raises(GalleryModelMismatch, match="serve that model"):
        open_gallery(sha="b" * 64)
    with pytest.raises(GalleryError, match="dimension"):
        open_gallery(dim=DIM + 1)


def test_read_only_gallery_serves_but_refuses_writes(open_gallery):
    writer = open_gallery()
    ids = writer.add(unit_vectors(3, seed=9))
    writer.close()
    reader = open_gallery(read_only=True)
    assert reader.ids() == ids and reader.info()["read_only"] is True
    with pytest.raises(GalleryReadOnlyError):
        reader.check_writable()
    with pytest.raises(GalleryReadOnlyError):
        reader.add(unit_vectors(1))
    with pytest.raises(GalleryReadOnlyError):
        reader.delete(ids[0])
    assert reader.ids() == ids


def test_a_bulk_load_may_choose_its_ids(open_gallery):
    """What ``dino embed``-style loaders use: precomputed embeddings with their own ids, no images."""
    gallery = open_gallery()
    vectors = unit_vectors(50, seed=10)
    chosen = [f"{i:032x}" for i in range(50)]
    for start in range(0, 50, 20):
        block = slice(start, start + 20)
        labels = [f"class {i % 3}" for i in range(start, min(start + 20, 50))]
        assert gallery.add(vectors[block], labels, ids=chosen[block]) == chosen[block]
    assert gallery.ids() == chosen
    assert gallery.search(vectors[33], 1)[0].id == chosen[33]
    for bad in (["not an id"], ["A" * 32], [f"{99:032x}", f"{99:032x}"]):
        with pytest.raises(ValueError):
            gallery.add(unit_vectors(len(bad), seed=11), ids=bad)
    # a rerun of the same load: Milvus replaces the rows (upsert), the FAISS store refuses known ids
    if isinstance(gallery, EmbeddingIndex):
        with pytest.raises(ValueError, match="already in the gallery"):
            gallery.add(vectors[:2], ids=chosen[:2])
    else:
        assert gallery.add(vectors[:2], ["again", "again"], ids=chosen[:2]) == chosen[:2]
        assert gallery.entry(chosen[1])["label"] == "again"
    assert gallery.info()["size"] == 50
