"""The findings of an outside probe of the service, one test each: small uploads that are costly to
decode, gallery entries that would break later answers, deep JSON, limits that must say what they
are, and requests refused before any work is done."""

from __future__ import annotations

import asyncio
import io
import json
import tracemalloc

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from dino.cli import main as dino
from dino.images import ImageTooLarge, decode_image, to_rgb
from service.app import create_app
from service.gallery import EmbeddingIndex, GalleryError
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.state import load_state
from tests.service.hostile_images import (
    huge_tile_tiff,
    large_photo_jpeg,
    many_scan_jpeg,
    nested_json,
    sixteen_bit_png,
)
from tests.service.images import encode, multipart, photo, photo_bytes

MAX_PIXELS = 40_000_000
QUEUE = 8


def make_settings(model_dir, **overrides) -> ServiceSettings:
    values = dict(model_dir=model_dir, max_batch_wait_ms=2, preprocess_threads=2, warmup_batches=1)
    values.update(overrides)
    return ServiceSettings(**values)


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    settings = make_settings(
        model_dir, index_dir=tmp_path_factory.mktemp("hardening") / "gallery", max_queue_size=QUEUE
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


# ------------------------------------------------------------------------------------------------
# 1 and 2: decode cost and memory are bounded by what the header says
# ------------------------------------------------------------------------------------------------


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    data = many_scan_jpeg(side=2000, scans=3000)
    with pytest.raises(ImageTooLarge, match="3000 scans, the limit is 64"):
        decode_image(data, MAX_PIXELS)
    normal = encode(Image.new("RGB", (64, 48), (10, 20, 30)), "JPEG", progressive=True)
    assert decode_image(normal, MAX_PIXELS).size == (64, 48)  # an ordinary progressive JPEG still decodes


def test_a_tiff_tile_far_larger_than_the_image_is_refused():
    with pytest.raises(ImageTooLarge, match="TIFF tiles of 32768x32768 pixels for a 16x16 image"):
        decode_image(huge_tile_tiff(), MAX_PIXELS)


def test_sixteen_bit_greys_convert_without_full_size_float_copies():
    """A 70 KB 6000x6000 16-bit PNG took over a gigabyte in float64 temporaries."""
    with Image.open(io.BytesIO(sixteen_bit_png(6000))) as img:
        img.load()
        tracemalloc.start()
        try:
            rgb = to_rgb(img)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert rgb.size == (6000, 6000) and rgb.mode == "RGB"
    assert peak < 100 * 2**20, f"NumPy working memory peaked at {peak / 2**20:.0f} MiB"


def test_one_request_of_costly_images_does_not_starve_the_others(model_dir):
    """Images of one request take turns with other requests for the decoding threads: a small request
    sent just after a request of 8 large photos is done before most of those are decoded."""
    settings = make_settings(model_dir, preprocess_threads=2, max_image_pixels=MAX_PIXELS)
    state = load_state(settings, ServiceMetrics())
    big = large_photo_jpeg(side=2500)
    decoded_big = 0
    big_done_when_small_finished: list[int] = []
    prepare = state.preprocessor.prepare

    def counting_prepare(data: bytes):
        nonlocal decoded_big
        result = prepare(data)
        decoded_big += data is big
        return result

    state.preprocessor.prepare = counting_prepare  # type: ignore[method-assign]

    async def small_request() -> None:
        await asyncio.sleep(0.05)  # the large request is under way
        await state.prepare([photo_bytes(0)])
        big_done_when_small_finished.append(decoded_big)

    async def scenario() -> None:
        await state.start()
        try:
            await asyncio.gather(state.prepare([big] * 8), small_request())
        finally:
            await state.stop()

    asyncio.run(scenario())
    assert decoded_big == 8
    assert big_done_when_small_finished[0] <= 3, f"the small request waited for {big_done_when_small_finished[0]} of 8"


def test_more_images_than_the_queue_is_413_and_a_full_queue_is_503(client):
    nine = [photo_bytes(0)] * (QUEUE + 1)
    answer = client.post("/embed", files=multipart(*nine))
    # max_images_per_request (64) allows 9: the queue (8) is what refuses it, with its limit, not 503
    assert answer.status_code == 413, answer.text
    assert "at most 8" in answer.json()["detail"] and "Retry-After" not in answer.headers


# ------------------------------------------------------------------------------------------------
# 3 and 4: what is stored must be answerable later; deep JSON is a 422
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata, message",
    [
        ('{"x": 1e400}', "out of range"),
        ('{"x": "\\ud800"}', "not valid Unicode"),
        ('{"\\udfff": 1}', "not valid Unicode"),
        ('{"x": ' + nested_json(40) + "}", "nested deeper than 32"),
        ('{"x": ' + nested_json(1000) + "}", "nested too deeply"),
    ],
)
def test_metadata_that_could_not_be_answered_later_is_refused(client, metadata, message):
    before = client.get("/index").json()["size"]
    answer = client.post("/index", files=multipart(photo_bytes(0)), data={"metadata": metadata})
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["detail"]
    assert client.get("/index").json()["size"] == before  # nothing stored


def test_deep_json_bodies_and_labels_are_422_not_500(client):
    body = '{"images": ' + nested_json(1000) + "}"
    answer = client.post("/embed", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and "nested too deeply" in answer.json()["detail"]
    labels = client.post("/index", files=multipart(photo_bytes(0)), data={"labels": nested_json(1000)})
    assert labels.status_code == 422, labels.text
    surrogate = client.post("/index", files=multipart(photo_bytes(0)), data={"labels": '["\\ud800"]'})
    assert surrogate.status_code == 422 and "Unicode" in surrogate.json()["detail"]


def test_entries_stored_before_the_checks_do_not_break_answers(model_dir, tmp_path):
    """A gallery written by an older version with an infinite number and a lone surrogate in its
    metadata: /neighbors and the listing answer (with null and U+FFFD), also after a restart."""
    folder = tmp_path / "gallery"
    settings = make_settings(model_dir, index_dir=folder)
    with TestClient(create_app(settings)) as test_client:
        ids = test_client.post("/index", files=multipart(photo_bytes(0), photo_bytes(1))).json()["ids"]
        state = test_client.app.state.service
        vector = state.gallery.embedding(ids[0])[None]
        state.gallery.add(vector, ["bad\ud800label"], [{"score": float("inf"), "\udfffkey": "x"}], [b""])
    for _ in range(2):  # before and after a restart
        with TestClient(create_app(settings)) as test_client:
            found = test_client.get(f"/neighbors/{ids[0]}", params={"k": 5})
            assert found.status_code == 200, found.text
            poisoned = [n for n in found.json()["neighbors"] if n["metadata"] and "score" in n["metadata"]]
            assert poisoned and poisoned[0]["metadata"]["score"] is None
            assert poisoned[0]["label"] == "bad\ufffdlabel"
            listing = test_client.get("/index/items", params={"limit": 10})
            assert listing.status_code == 200 and listing.json()["total"] == 3


def test_an_unexpected_error_closes_the_connection_explicitly(model_dir, tmp_path, monkeypatch):
    settings = make_settings(model_dir, index_dir=tmp_path / "g")
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        monkeypatch.setattr(test_client.app.state.service.gallery, "info", lambda: 1 / 0)
        answer = test_client.get("/index")
    assert answer.status_code == 500 and answer.json() == {"detail": "internal server error"}
    assert answer.headers["connection"] == "close"


# ------------------------------------------------------------------------------------------------
# 6, 7, 9, 10: fields, read-only galleries, keys and the smaller findings
# ------------------------------------------------------------------------------------------------


def test_labels_sent_as_a_file_are_refused(client):
    files = multipart(photo_bytes(0)) + [("labels", ("l.txt", b"cat", "text/plain"))]
    answer = client.post("/index", files=files)
    assert answer.status_code == 422 and "'labels' must be text, not a file" in answer.json()["detail"]


def test_a_read_only_gallery_refuses_writes_before_reading_the_upload(model_dir, tmp_path):
    folder = tmp_path / "gallery"
    with TestClient(create_app(make_settings(model_dir, index_dir=folder))):
        pass  # creates the gallery of this model
    settings = make_settings(model_dir, index_dir=folder, index_read_only=True)
    with TestClient(create_app(settings)) as test_client:
        # not an image at all: a 409 (not 415) shows that nothing was read or decoded first
        answer = test_client.post("/index", content=b"junk", headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 409 and "read-only" in answer.json()["detail"]


def test_read_only_galleries_refuse_a_missing_folder_and_a_live_writer(tmp_path):
    with pytest.raises(GalleryError, match="cannot create one"):
        EmbeddingIndex(tmp_path / "missing", dim=8, model_sha256="x", model_name="m", read_only=True)
    writer = EmbeddingIndex(tmp_path / "live", dim=8, model_sha256="x", model_name="m")
    try:
        with pytest.raises(GalleryError, match="being written by another process"):
            EmbeddingIndex(tmp_path / "live", dim=8, model_sha256="x", model_name="m", read_only=True)
    finally:
        writer.close()
    readers = [
        EmbeddingIndex(tmp_path / "live", dim=8, model_sha256="x", model_name="m", read_only=True) for _ in range(2)
    ]
    with pytest.raises(GalleryError, match="in use by another process"):  # no writer under live readers
        EmbeddingIndex(tmp_path / "live", dim=8, model_sha256="x", model_name="m")
    for reader in readers:
        reader.close()


@pytest.mark.parametrize("key", [" secret", "secret\n", "sécret", "sec ret", "ключ"])
def test_an_api_key_no_client_can_send_is_refused_at_startup(key):
    with pytest.raises(ValidationError, match="no client can send"):
        ServiceSettings(api_key=key)
    assert ServiceSettings(api_key="a-good_key.123~").api_key is not None


def test_smaller_findings(client):
    assert client.head("/healthz").status_code == 200
    gzip = client.post(
        "/embed", content=b"\x1f\x8b...", headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    assert gzip.status_code == 415 and "Content-Encoding" in gzip.json()["detail"]
    empty = client.post("/embed", json={"images": []})
    assert empty.status_code == 422 and "JSON list 'images' is empty" in empty.json()["detail"]


def test_gallery_entries_can_be_listed_page_by_page(client):
    ids = client.post(
        "/index",
        files=multipart(encode(photo(0), "JPEG"), encode(photo(1), "JPEG"), encode(photo(2), "JPEG")),
        data={"labels": '["a", "b", "c"]', "metadata": json.dumps({"source": "listing"})},
    ).json()["ids"]
    total = client.get("/index").json()["size"]
    last = client.get("/index/items", params={"offset": total - 3, "limit": 2}).json()
    assert last["total"] == total and [item["id"] for item in last["items"]] == ids[:2]
    assert last["items"][0] == {"id": ids[0], "label": "a", "metadata": {"source": "listing"}}
    assert client.get("/index/items", params={"limit": 100_000}).status_code == 422


def test_serve_with_several_workers_refuses_a_missing_or_busy_gallery(model_dir, tmp_path, capsys):
    serve = ["serve", "--model", str(model_dir), "--workers", "2", "--index"]
    assert dino(serve + [str(tmp_path / "missing")]) == 2
    assert "no gallery index in" in capsys.readouterr().err
    writer = EmbeddingIndex(tmp_path / "busy", dim=8, model_sha256="x", model_name="m")
    try:
        assert dino(serve + [str(tmp_path / "busy")]) == 2
        assert "being written by another process" in capsys.readouterr().err
    finally:
        writer.close()
