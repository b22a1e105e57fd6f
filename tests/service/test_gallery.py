"""The FAISS gallery (service.gallery.faiss_store): persistence, crash leftovers, safety, search
(``dino index build`` is in test_index_build.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest

from service.gallery import (
    EmbeddingIndex,
    GalleryError,
    GalleryModelMismatch,
    GalleryReadOnlyError,
    UnknownImageError,
    is_valid_image_id,
)

DIM = 16
SHA = "a" * 64


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def open_index(path, **kwargs) -> EmbeddingIndex:
    return EmbeddingIndex(path, dim=DIM, model_sha256=SHA, model_name="m", **kwargs)


def snapshot_of(index: EmbeddingIndex) -> dict:
    return {i: (index.entry(i), index.embedding(i).tolist(), index.read_image(i)) for i in index.ids()}


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_gallery_survives_reopen_with_everything(tmp_path, index_type):
    vectors = unit_vectors(30)
    index = open_index(tmp_path / "g", index_type=index_type, compact_every=7)
    ids = index.add(
        vectors[:10], [f"l{i}" for i in range(10)], [{"i": i} for i in range(10)], [b"jpeg%d" % i for i in range(10)]
    )
    ids += index.add(vectors[10:], None, None, [b"x"] * 20)
    for gone in ids[::5]:
        index.delete(gone)
    before = snapshot_of(index)
    results = [[(n.id, round(n.score, 5)) for n in index.search(v, 5)] for v in vectors[:5]]
    index.close()

    reopened = open_index(tmp_path / "g", index_type=index_type, compact_every=7)
    assert reopened.size == 24 and snapshot_of(reopened) == before
    assert [[(n.id, round(n.score, 5)) for n in reopened.search(v, 5)] for v in vectors[:5]] == results
    assert reopened.entry(ids[1]) == {"id": ids[1], "label": "l1", "metadata": {"i": 1}}
    assert sorted(p.name for p in (tmp_path / "g" / "images").iterdir()) == sorted(f"{i}.jpg" for i in before)
    reopened.close()


def test_flat_search_is_exact_and_skips_deleted(tmp_path):
    vectors = unit_vectors(200, seed=1)
    index = open_index(tmp_path / "g", compact_every=50)
    ids = index.add(vectors)
    deleted = set(ids[:60:3])
    for image_id in deleted:
        index.delete(image_id)
    alive = [i for i, image_id in enumerate(ids) if image_id not in deleted]
    for query in unit_vectors(5, seed=2):
        scores = vectors[alive] @ query
        expected = [ids[alive[j]] for j in np.argsort(-scores)[:10]]
        assert [n.id for n in index.search(query, 10)] == expected
    # excluding the query image itself (GET /neighbors/{id})
    found = index.search(vectors[alive[0]], 3, exclude=ids[alive[0]])
    assert ids[alive[0]] not in [n.id for n in found] and len(found) == 3
    index.close()


def test_hnsw_recall_against_exact(tmp_path):
    vectors = unit_vectors(1500, seed=3, dim=32)
    exact = EmbeddingIndex(None, dim=32, model_sha256=SHA)
    hnsw = EmbeddingIndex(None, dim=32, model_sha256=SHA, index_type="hnsw", hnsw_m=16)
    ids_exact, ids_hnsw = exact.add(vectors), hnsw.add(vectors)
    position = {i: n for n, i in enumerate(ids_hnsw)}
    hits = 0
    for query in unit_vectors(50, seed=4, dim=32):
        truth = {ids_exact.index(n.id) for n in exact.search(query, 10)}
        hits += len(truth & {position[n.id] for n in hnsw.search(query, 10)})
    assert hits / 500 >= 0.9


def test_torn_journal_tail_is_cut_before_appending(tmp_path):
    index = open_index(tmp_path / "g")
    first = index.add(unit_vectors(3))
    index.close()
    journal = next((tmp_path / "g").glob("journal-*.log"))
    with open(journal, "ab") as f:  # a crash in the middle of writing a journal line
        f.write(b'1c2d3e4f {"op":"add","id":"')
    index = open_index(tmp_path / "g")
    assert set(index.ids()) == set(first)
    second = index.add(unit_vectors(2, seed=9))
    index.close()
    index = open_index(tmp_path / "g")
    assert set(index.ids()) == set(first) | set(second)
    index.close()


def test_leftovers_of_an_interrupted_compaction_are_ignored_and_removed(tmp_path):
    root = tmp_path / "g"
    index = open_index(root, compact_every=4)
    ids = index.add(unit_vectors(6), images=[b"i"] * 6)  # 6 >= 4: compacted to generation 1
    index.close()
    manifest = json.loads((root / "index.json").read_text())
    generation = manifest["generation"]
    assert generation == 1
    # what crashes can leave: a half-written next snapshot, a journal of it, old generation files,
    # temporaries, an image whose add never reached the journal
    (root / ".snapshot-000002.tmp").mkdir()
    (root / "snapshot-000002").mkdir()
    (root / "snapshot-000002" / "embeddings.npy").write_bytes(b"garbage")
    (root / "journal-000002.log").write_bytes(b"garbage\n")
    shutil.copytree(root / "snapshot-000001", root / "snapshot-000000")
    (root / "journal-000000.log").write_bytes(b"")
    (root / ".index.json.1234abcd.tmp").write_text("{")
    orphan = root / "images" / ("f" * 32 + ".jpg")
    orphan.write_bytes(b"orphan")
    index = open_index(root, compact_every=4)
    assert set(index.ids()) == set(ids)
    assert sorted(p.name for p in root.iterdir()) == [
        ".lock",
        "images",
        "index.json",
        "journal-000001.log",
        "snapshot-000001",
    ]
    assert not orphan.exists()
    index.close()


def test_ids_are_opaque_and_never_reach_the_filesystem_unchecked(tmp_path):
    index = open_index(tmp_path / "g")
    (image_id,) = index.add(unit_vectors(1), images=[b"img"])
    assert is_valid_image_id(image_id)
    for bad in ["../../etc/passwd", "..", "", "A" * 32, image_id + "0", image_id[:-1] + "/", None, 42]:
        assert not is_valid_image_id(bad)
        with pytest.raises(UnknownImageError):
            index.read_image(bad)
        with pytest.raises(UnknownImageError):
            index.delete(bad)
    index.close()


def test_gallery_refuses_wrong_model_foreign_folders_and_second_writer(tmp_path):
    index = open_index(tmp_path / "g")
    with pytest.raises(GalleryError, match="in use by another process"):
        open_index(tmp_path / "g")
    index.close()
    with pytest.raises(GalleryModelMismatch, match="rebuild the gallery"):
        EmbeddingIndex(tmp_path / "g", dim=DIM, model_sha256="b" * 64, model_name="other")
    with pytest.raises(GalleryError, match="dimension"):
        EmbeddingIndex(tmp_path / "g", dim=DIM + 1, model_sha256=SHA)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(GalleryError, match="not empty"):
        open_index(tmp_path / "photos")
    assert (tmp_path / "photos" / "holiday.jpg").read_bytes() == b"x"


def test_read_only_gallery(tmp_path):
    writer = open_index(tmp_path / "g")
    ids = writer.add(unit_vectors(3))
    with pytest.raises(GalleryError, match="being written"):  # a reader beside a live writer would go stale
        open_index(tmp_path / "g", read_only=True)
    writer.close()
    reader = open_index(tmp_path / "g", read_only=True)
    assert set(reader.ids()) == set(ids)
    with pytest.raises(GalleryReadOnlyError):
        reader.add(unit_vectors(1))
    with pytest.raises(GalleryReadOnlyError):
        reader.delete(ids[0])
    reader.close()
    with pytest.raises(GalleryError, match="cannot create one"):
        open_index(tmp_path / "missing", read_only=True)


def test_failed_journal_write_is_rolled_back(tmp_path, monkeypatch):
    """A journal write that fails (disk full) must leave no partial record: the next acknowledged add
    would otherwise be glued to it and lost at the next load."""
    index = open_index(tmp_path / "g")
    journal_fd = index._journal_fd
    real_fsync = os.fsync
    failures = []

    def fsync_disk_full(fd):
        if fd == journal_fd and not failures:
            failures.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_disk_full)
    with pytest.raises(OSError, match="No space"):
        index.add(unit_vectors(2))
    monkeypatch.undo()
    assert failures and index.size == 0
    kept = index.add(unit_vectors(1, seed=5))
    index.close()
    reopened = open_index(tmp_path / "g")
    assert reopened.ids() == kept
    reopened.close()
