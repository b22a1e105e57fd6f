"""The HTTP API through FastAPI's TestClient (the real app, real model, real photos): every route,
auth, metrics, batching and the bad-input set."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.gallery import EmbeddingIndex, GalleryModelMismatch
from service.preprocess import Preprocessor
from service.runtime import OnnxModel
from service.settings import ModelNotFoundError, ServiceSettings, find_default_model
from tests.service.images import (
    animated_gif,
    encode,
    exif_rotated_jpeg,
    multipart,
    photo,
    photo_bytes,
    png_bomb,
    with_jpeg_dimensions,
)

REPO = Path(__file__).resolve().parents[2]
MAX_UPLOAD = 1_500_000
MAX_IMAGES = 6
API_KEY = "test-secret-key"
ID_RE = re.compile(r"^[0-9a-f]{32}$")


def make_settings(model_dir, **overrides) -> ServiceSettings:
    values = dict(
        model_dir=model_dir,
        max_upload_bytes=MAX_UPLOAD,
        max_images_per_request=MAX_IMAGES,
        max_batch_wait_ms=2,
        preprocess_threads=2,
        warmup_batches=1,
    )
    values.update(overrides)
    return ServiceSettings(**values)


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    settings = make_settings(model_dir, index_dir=tmp_path_factory.mktemp("api") / "gallery")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def reference(model_dir):
    """Ground truth outside the HTTP stack: the same model and preprocessing, called directly."""
    model = OnnxModel(model_dir, provider="cpu")
    preprocessor = Preprocessor.for_model(model.spec, 40_000_000)

    def run(data: bytes) -> dict[str, np.ndarray]:
        outputs = model.run(preprocessor.prepare(data).tensor[None])
        return {name: value[0] for name, value in outputs.items()}

    return run


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def embed_one(client, data: bytes) -> np.ndarray:
    response = client.post("/embed", files=multipart(data))
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"][0])


# --------------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------------


def test_health_readiness_docs_and_page(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "model": "test-vit-tiny8",
        "provider": "CPUExecutionProvider",
        "model_file": "model.onnx",
        "precision": "fp32",  # auto: the test model has no int8 file
        "gallery": {"backend": "faiss", "available": True, "detail": None},
        "missing": [],
    }
    schema = client.get("/openapi.json").json()
    for path in [
        "/embed",
        "/attention",
        "/attention/{image_id}",
        "/neighbors",
        "/neighbors/{image_id}",
        "/index",
        "/index/{image_id}",
        "/index/{image_id}/image",
        "/healthz",
        "/readyz",
        "/metrics",
    ]:
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/embed"]["post"]["requestBody"]["content"]
    assert "application/json" in schema["paths"]["/embed"]["post"]["requestBody"]["content"]
    assert "swagger" in client.get("/docs").text.lower()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")  # no CDN
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/index.py").status_code == 404


def test_embed_matches_the_model_in_request_order(client, reference):
    images = [photo_bytes(i) for i in (0, 1, 2)]
    response = client.post("/embed", files=multipart(*images))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "test-vit-tiny8" and body["dim"] == 192 and "patch_tokens" not in body
    got = np.asarray(body["embeddings"])
    expected = unit([reference(data)["embedding"] for data in images])
    assert got.shape == (3, 192)
    assert np.abs(got - expected).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)

    # JSON base64 (one as a data URL), reversed order: the same vectors, reversed
    encoded = [base64.b64encode(data).decode() for data in reversed(images)]
    encoded[0] = "data:image/jpeg;base64," + encoded[0]
    body = client.post("/embed", json={"images": encoded}).json()
    assert np.abs(np.asarray(body["embeddings"]) - got[::-1]).max() < 1e-5

    raw = client.post("/embed?normalize=false&patch_tokens=true", files=multipart(images[0])).json()
    assert abs(np.linalg.norm(raw["embeddings"][0]) - np.linalg.norm(reference(images[0])["embedding"])) < 1e-3
    assert np.abs(np.asarray(raw["embeddings"][0]) - reference(images[0])["embedding"]).max() < 1e-4
    tokens = np.asarray(raw["patch_tokens"])
    assert tokens.shape == (1, 64, 192)
    assert np.abs(tokens[0] - reference(images[0])["patch_tokens"]).max() < 1e-4


def test_attention_png_and_json(client, reference):
    data = photo_bytes(3)
    expected = reference(data)["attention"]  # [heads, N]
    body = client.post("/attention?format=json", files=multipart(data)).json()
    assert body["grid"] == [8, 8] and body["heads"] == 3 and body["head"] == "mean" and "mask" not in body
    grid = np.asarray(body["attention"])
    assert grid.shape == (8, 8)
    assert np.abs(grid - expected.mean(axis=0).reshape(8, 8)).max() < 1e-5
    head1 = client.post("/attention?format=json&head=1", files={"image": ("x.jpg", data)}).json()
    assert np.abs(np.asarray(head1["attention"]) - expected[1].reshape(8, 8)).max() < 1e-5

    masked = client.post("/attention?format=json&threshold=0.6", files=multipart(data)).json()
    mask = np.asarray(masked["mask"])
    kept_mass = grid[mask].sum() / grid.sum()
    assert 0.6 <= kept_mass and mask.sum() < 64
    # minimal: dropping the weakest kept patch falls below the requested mass
    assert (grid[mask].sum() - grid[mask].min()) / grid.sum() < 0.6

    png = client.post("/attention", files=multipart(data))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(png.content))
    assert overlay.size == (64, 64) and overlay.mode == "RGB"
    thresholded = client.post("/attention?threshold=0.5&head=2", files=multipart(data)).content
    assert thresholded != png.content

    for query in ["head=3", "head=-1", "head=abc", "threshold=0", "threshold=1.5", "format=gif"]:
        response = client.post(f"/attention?{query}", files=multipart(data))
        assert response.status_code == 422, query
        assert "detail" in response.json()


def test_gallery_add_search_show_delete(client):
    photos = [photo_bytes(i) for i in (10, 11, 12, 13)]
    metadata = [{"n": i, "source": "test"} for i in range(4)]
    response = client.post(
        "/index",
        files=multipart(*photos),
        data={"labels": ["tench", "goldfish", "shark", "hen"], "metadata": json.dumps(metadata)},
    )
    assert response.status_code == 200, response.text
    ids = response.json()["ids"]
    assert len(ids) == 4 and all(ID_RE.match(i) for i in ids) and len(set(ids)) == 4
    info = client.get("/index").json()
    assert info["size"] >= 4 and info["dim"] == 192 and info["model"] == "test-vit-tiny8"
    assert info["index_type"] == "flat" and info["persistent"] is True and info["read_only"] is False

    # JSON body, one label and one metadata object for all images
    more = client.post(
        "/index",
        json={"images": [base64.b64encode(photo_bytes(14)).decode()] * 2, "labels": "dup", "metadata": {"k": "v"}},
    ).json()["ids"]

    best = client.post("/neighbors?k=3", files=multipart(photos[2])).json()["neighbors"]
    assert best[0]["id"] == ids[2] and best[0]["score"] > 0.999
    assert best[0]["label"] == "shark" and best[0]["metadata"] == {"n": 2, "source": "test"}
    assert [n["score"] for n in best] == sorted((n["score"] for n in best), reverse=True)

    stored = client.get(f"/neighbors/{ids[1]}?k=50").json()["neighbors"]
    assert ids[1] not in [n["id"] for n in stored] and ids[0] in [n["id"] for n in stored]
    twin = client.get(f"/neighbors/{more[0]}?k=1").json()["neighbors"][0]
    assert twin["id"] == more[1] and twin["score"] > 0.999 and twin["metadata"] == {"k": "v"}

    image = client.get(f"/index/{ids[0]}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    for url in [f"/attention/{ids[0]}", f"/attention/{ids[0]}?threshold=0.6&head=0"]:
        overlay = client.get(url)
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    stored_json = client.get(f"/attention/{ids[0]}?format=json").json()
    posted_json = client.post("/attention?format=json", files=multipart(photos[0])).json()
    # the stored image is the model's crop as JPEG: close to, not exactly, the original's attention
    assert np.abs(np.asarray(stored_json["attention"]) - np.asarray(posted_json["attention"])).max() < 5e-3

    deleted = client.delete(f"/index/{ids[3]}")
    assert deleted.status_code == 200 and deleted.json() == {"id": ids[3], "deleted": True}
    for method, url in [
        ("DELETE", f"/index/{ids[3]}"),
        ("GET", f"/index/{ids[3]}/image"),
        ("GET", f"/neighbors/{ids[3]}"),
        ("GET", f"/attention/{ids[3]}"),
    ]:
        response = client.request(method, url)
        assert response.status_code == 404, url
        assert ids[3] in response.json()["detail"]
    assert ids[3] not in [
        n["id"] for n in client.post("/neighbors?k=50", files=multipart(photos[3])).json()["neighbors"]
    ]


def test_gallery_field_validation(client):
    data = photo_bytes(5)
    cases = {
        "metadata not JSON": {"metadata": "{oops"},
        "metadata list of wrong length": {"metadata": json.dumps([{}, {}, {}])},
        "metadata entry not an object": {"metadata": json.dumps([1, 2])},
        "metadata NaN": {"metadata": '{"x": NaN}'},
        "labels count mismatch": {"labels": ["a", "b", "c"]},
        "label too long": {"labels": "x" * 1000},
    }
    size = client.get("/index").json()["size"]
    for name, fields in cases.items():
        response = client.post("/index", files=multipart(data, data), data=fields)
        assert response.status_code == 422, name
        assert isinstance(response.json()["detail"], str), name
    assert (
        client.post("/index", json={"images": [base64.b64encode(data).decode()], "metadata": [[1]]}).status_code == 422
    )
    assert client.get("/index").json()["size"] == size  # nothing was added by a refused request


# --------------------------------------------------------------------------------------------------
# bad input: never a 500, always {"detail": ...}
# --------------------------------------------------------------------------------------------------


def bad_inputs() -> list[tuple[str, dict, set[int]]]:
    """(name, request kwargs for POST /embed, accepted status codes)."""
    jpeg = photo_bytes(0)
    svg = (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9">'
        b'<rect width="9" height="9"/></svg>'
    )
    html = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
    return [
        ("empty body", {"content": b""}, {422}),
        (
            "empty body, multipart type",
            {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}},
            {400, 422},
        ),
        ("empty file", {"files": multipart(b"")}, {422}),
        ("non-image bytes", {"files": multipart(b"\x00\x01 definitely not an image " * 20)}, {415}),
        ("plain text body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, {415}),
        ("HTML file", {"files": [("images", ("page.html", html, "text/html"))]}, {415}),
        ("SVG file", {"files": [("images", ("drawing.svg", svg, "image/svg+xml"))]}, {415}),
        ("truncated JPEG", {"files": multipart(jpeg[: len(jpeg) // 2])}, {422}),
        ("decompression-bomb PNG 12000x12000", {"files": multipart(png_bomb(12000))}, {413}),
        ("JPEG header claiming 65000x65000", {"files": multipart(with_jpeg_dimensions(jpeg, 65000, 65000))}, {413}),
        ("JPEG header claiming 8000x8000", {"files": multipart(with_jpeg_dimensions(jpeg, 8000, 8000))}, {413}),
        ("oversized upload", {"files": multipart(b"\xff" * (MAX_UPLOAD + 1))}, {413}),
        (
            "oversized upload, chunked",
            {"content": iter([b"x" * 65536] * 40), "headers": {"content-type": "application/json"}},
            {413},
        ),
        ("wrong field name", {"files": multipart(jpeg, field="file")}, {422}),
        (
            "text in the images field",
            {"data": {"images": "not a file"}, "files": multipart(jpeg, field="other")},
            {422},
        ),
        ("url-encoded form", {"data": {"images": "not a file"}}, {415}),
        ("too many images", {"files": multipart(*[encode(Image.new("RGB", (8, 8)), "PNG")] * (MAX_IMAGES + 1))}, {413}),
        ("too many images, JSON", {"json": {"images": ["AAAA"] * (MAX_IMAGES + 1)}}, {413}),
        ("invalid JSON", {"content": b"{not json", "headers": {"content-type": "application/json"}}, {422}),
        ("JSON without images", {"json": {"pictures": []}}, {422}),
        ("JSON images not a list", {"json": {"images": "abc"}}, {422}),
        ("JSON invalid base64", {"json": {"images": ["***not base64***"]}}, {422}),
        ("JSON base64 of text", {"json": {"images": [base64.b64encode(b"just text").decode()]}}, {415}),
        ("bad normalize flag", {"files": multipart(jpeg), "params": {"normalize": "maybe"}}, {422}),
    ]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_inputs_are_refused_with_json_4xx(client):
    report = []
    for name, kwargs, accepted in bad_inputs():
        response = client.post("/embed", **kwargs)
        report.append(f"{response.status_code}  {name}")
        assert response.status_code in accepted, (name, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/json"), name
        assert "detail" in response.json(), name
    others = [
        ("GET /neighbors k=0", client.get(f"/neighbors/{'0' * 32}?k=0"), {422}),
        ("POST /neighbors k too large", client.post("/neighbors?k=100000", files=multipart(photo_bytes(0))), {422}),
        (
            "POST /neighbors two images",
            client.post("/neighbors", files=multipart(photo_bytes(0), photo_bytes(1))),
            {422},
        ),
        (
            "POST /attention no image",
            client.post("/attention", files=multipart(photo_bytes(0), field="picture")),
            {422},
        ),
        ("unknown id", client.get(f"/index/{'0' * 32}/image"), {404}),
        ("malformed id", client.get("/index/not-an-id/image"), {404}),
        ("path traversal id", client.get("/index/..%2F..%2Fetc%2Fpasswd/image"), {404, 422}),
        ("upper-case id", client.delete(f"/index/{'A' * 32}"), {404}),
        ("unknown route", client.get("/nope"), {404}),
    ]
    for name, response, accepted in others:
        report.append(f"{response.status_code}  {name}")
        assert response.status_code in accepted, (name, response.status_code, response.text)
        assert "detail" in response.json(), name
    print("\nbad inputs -> status\n  " + "\n  ".join(report))


def test_every_pil_mode_and_odd_size_is_accepted(client):
    base = photo(7).resize((96, 80))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    grey = np.asarray(base.convert("L"), dtype=np.float32)
    cases = {
        "CMYK JPEG": encode(base.convert("CMYK"), "JPEG"),
        "16-bit PNG (I;16)": encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "32-bit integer TIFF (I)": encode(Image.fromarray(grey.astype(np.int32) * 100), "TIFF"),
        "float TIFF (F)": encode(Image.fromarray(grey / 255.0), "TIFF"),
        "RGBA PNG": encode(rgba, "PNG"),
        "palette PNG with transparency": encode(palette, "PNG", transparency=0),
        "LA PNG": encode(rgba.convert("LA"), "PNG"),
        "1-bit PNG": encode(base.convert("1"), "PNG"),
        "grey JPEG (L)": encode(base.convert("L"), "JPEG"),
        "WebP": encode(base, "WEBP"),
        "BMP": encode(base, "BMP"),
        "1x1 PNG": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "4000x4 PNG": encode(Image.new("RGB", (4000, 4), (10, 200, 10)), "PNG"),
        "4x4000 PNG": encode(Image.new("RGB", (4, 4000), (10, 10, 200)), "PNG"),
    }
    response = client.post("/embed", files=multipart(*list(cases.values())[:MAX_IMAGES]))
    assert response.status_code == 200, response.text
    for name, data in cases.items():
        response = client.post("/embed", files=multipart(data))
        assert response.status_code == 200, (name, response.text)
        vector = np.asarray(response.json()["embeddings"][0])
        assert vector.shape == (192,) and np.isfinite(vector).all(), name
    # the documented conversions, end to end: float 0..1 and 16-bit give the same as the 8-bit grey image
    grey_png = embed_one(client, encode(base.convert("L"), "PNG"))
    assert np.abs(embed_one(client, cases["float TIFF (F)"]) - grey_png).max() < 1e-5
    assert np.abs(embed_one(client, cases["16-bit PNG (I;16)"]) - grey_png).max() < 1e-5


def test_animated_gif_uses_the_first_frame(client):
    first, second = photo(20).resize((80, 80)), photo(21).resize((80, 80))
    gif = animated_gif(first, second)
    with Image.open(io.BytesIO(gif)) as img:
        frame0 = img.convert("RGB")
        img.seek(1)
        frame1 = img.convert("RGB")
    got = embed_one(client, gif)
    assert np.abs(got - embed_one(client, encode(frame0, "PNG"))).max() < 1e-5
    assert np.abs(got - embed_one(client, encode(frame1, "PNG"))).max() > 1e-3


def test_exif_rotation_gives_the_embedding_of_the_rotated_pixels(client):
    base = photo(30).resize((240, 180))  # small enough to be decoded at full scale: the check stays exact
    tagged = exif_rotated_jpeg(base, orientation=6)  # 6: rotate 90 degrees clockwise to display
    with Image.open(io.BytesIO(tagged)) as img:
        stored_pixels = img.convert("RGB")  # what the file holds, before orientation
    upright = stored_pixels.transpose(Image.Transpose.ROTATE_270)  # Pillow rotates counter-clockwise
    got = embed_one(client, tagged)
    assert np.abs(got - embed_one(client, encode(upright, "PNG"))).max() < 1e-6
    assert np.abs(got - embed_one(client, encode(stored_pixels, "PNG"))).max() > 1e-3


# --------------------------------------------------------------------------------------------------
# auth, CORS, metrics, batching, errors, settings
# --------------------------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health(model_dir):
    settings = make_settings(model_dir, api_key=API_KEY, cors_origins="http://example.test")
    with TestClient(create_app(settings)) as client:
        some_id = "0" * 32
        jpeg = photo_bytes(0)
        routes = [
            ("GET", "/", {}),
            ("GET", "/docs", {}),
            ("GET", "/openapi.json", {}),
            ("GET", "/static/app.js", {}),
            ("GET", "/metrics", {}),
            ("GET", "/index", {}),
            ("POST", "/embed", {"files": multipart(jpeg)}),
            ("POST", "/attention", {"files": multipart(jpeg)}),
            ("GET", f"/attention/{some_id}", {}),
            ("POST", "/neighbors", {"files": multipart(jpeg)}),
            ("GET", f"/neighbors/{some_id}", {}),
            ("POST", "/index", {"files": multipart(jpeg)}),
            ("DELETE", f"/index/{some_id}", {}),
            ("GET", f"/index/{some_id}/image", {}),
        ]
        for method, url, kwargs in routes:
            for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}]:
                response = client.request(method, url, headers=headers, **kwargs)
                assert response.status_code == 401, (method, url, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "API key" in response.json()["detail"]
            response = client.request(method, url, headers={"Authorization": f"Bearer {API_KEY}"}, **kwargs)
            assert response.status_code in (200, 404), (method, url, response.text)  # 404: the unknown id
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        # CORS when configured: preflight from the allowed origin only
        allowed = client.options(
            "/embed", headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
        )
        assert allowed.headers.get("access-control-allow-origin") == "http://example.test"
        other = client.options(
            "/embed", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(client):
    response = client.get("/healthz", headers={"Origin": "http://example.test"})
    assert "access-control-allow-origin" not in response.headers


def metric_value(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def test_metrics_count_requests_batches_and_gallery(client):
    client.post("/embed", files=multipart(photo_bytes(0), photo_bytes(1)))
    client.post("/embed", files=multipart(b"not an image"))
    text = client.get("/metrics").text
    assert metric_value(text, "dino_http_requests_total", '{method="POST",route="/embed",status="200"}') >= 1
    assert metric_value(text, "dino_http_requests_total", '{method="POST",route="/embed",status="415"}') >= 1
    assert metric_value(text, "dino_http_request_duration_seconds_count", '{method="POST",route="/embed"}') >= 2
    assert metric_value(text, "dino_batch_size_count") >= 1
    assert metric_value(text, "dino_queue_wait_seconds_count") >= 2
    assert metric_value(text, "dino_inference_seconds_count") >= 1
    assert metric_value(text, "dino_preprocess_seconds_count") >= 2
    assert metric_value(text, "dino_gallery_size") == client.get("/index").json()["size"]
    assert 'provider="CPUExecutionProvider"' in text


@pytest.mark.slow  # waits 200 ms per batch on purpose, ~3 s
def test_concurrent_requests_share_inference_calls(model_dir):
    """Dynamic batching: 12 concurrent single-image requests take fewer than 12 onnxruntime calls,
    and batching does not change any embedding."""
    settings = make_settings(model_dir, max_batch_wait_ms=200, max_batch_size=8)
    images = [photo_bytes(i) for i in range(40, 52)]
    with TestClient(create_app(settings)) as client:
        results: dict[int, np.ndarray] = {}
        barrier = threading.Barrier(len(images))

        def send(i: int) -> None:
            barrier.wait()
            results[i] = embed_one(client, images[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        text = client.get("/metrics").text
        calls = metric_value(text, "dino_batch_size_count")
        batched = metric_value(text, "dino_batch_size_sum")
        warm = {i: embed_one(client, images[i]) for i in range(len(images))}  # one by one
    assert batched == len(images)
    assert calls < len(images), f"{calls} inference calls for {len(images)} concurrent requests"
    assert max(np.abs(results[i] - warm[i]).max() for i in results) < 1e-5


def test_unexpected_errors_are_a_json_500_without_traceback(model_dir):
    with TestClient(create_app(make_settings(model_dir)), raise_server_exceptions=False) as client:
        state = client.app.state.service

        def broken_search(*args, **kwargs):
            raise RuntimeError("simulated bug with a secret path /etc/shadow")

        state.gallery.search = broken_search
        response = client.post("/neighbors", files=multipart(photo_bytes(0)))
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}


def test_gallery_of_another_model_is_refused(model_dir, tmp_path):
    other = EmbeddingIndex(tmp_path / "gallery", dim=192, model_sha256="f" * 64, model_name="another-model")
    other.close()
    app = create_app(make_settings(model_dir, index_dir=tmp_path / "gallery"))
    with pytest.raises(GalleryModelMismatch, match="another-model"):
        with TestClient(app):
            pass


def test_settings_default_model_and_environment(tmp_path, monkeypatch, model_dir):
    with pytest.raises(ModelNotFoundError, match="no default model"):
        find_default_model(tmp_path / "models")
    for name in ("b-model", "a-model"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "model.json").write_text("{}")
    assert find_default_model(tmp_path / "models").name == "a-model"
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        ServiceSettings(model_dir=tmp_path).resolved_model_dir()
    monkeypatch.setenv("DINO_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("DINO_CORS_ORIGINS", "http://a.test, http://b.test")
    monkeypatch.setenv("DINO_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("DINO_API_KEY", "sk-unique-7731")
    settings = ServiceSettings()
    assert settings.resolved_model_dir() == model_dir
    assert settings.cors_origins == ["http://a.test", "http://b.test"]
    assert settings.max_batch_size == 7 and settings.api_key.get_secret_value() == "sk-unique-7731"
    assert "sk-unique-7731" not in repr(settings)  # the key is a secret, never printed
    monkeypatch.setenv("DINO_API_KEY", "")
    assert ServiceSettings().api_key is None  # set but empty: no key, not an empty bearer token


def test_service_never_imports_torch():
    """The serving install has no torch: importing every service module must not pull it in."""
    import subprocess
    import sys

    modules = ["service.app", "service.server", "service.index_cli", "dino.cli"]
    code = (
        f"import sys; import {', '.join(modules)}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
