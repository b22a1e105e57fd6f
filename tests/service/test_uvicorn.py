"""The service as deployed: ``dino serve`` in a real uvicorn process on 127.0.0.1, over real HTTP.

Covers every route with the API key on, upload limits over a socket, the gallery surviving a
restart, and the crash test: ``kill -9`` during a stream of ``POST /index`` calls must lose no
acknowledged add.
"""

from __future__ import annotations

import base64
import io
import random
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from dino.client import DinoAPIError, DinoClient
from tests.helpers import ServerProcess
from tests.service.images import multipart, photo_bytes

# every test here starts real server processes (a few seconds each)
pytestmark = pytest.mark.slow

API_KEY = "uvicorn-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_UPLOAD = 1_000_000


def test_real_server_every_route_auth_limits_and_restart(model_dir, tmp_path):
    gallery = tmp_path / "gallery"
    env = {"DINO_API_KEY": API_KEY, "DINO_MAX_UPLOAD_BYTES": str(MAX_UPLOAD), "DINO_WARMUP_BATCHES": "1"}
    photos = [photo_bytes(i) for i in (0, 1, 2, 3)]  # before the server: a skip here must not leak it
    server = ServerProcess(model_dir, tmp_path / "server.log", index_dir=gallery, env=env).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/healthz").json() == {"status": "alive"}
            assert http.get("/readyz").json()["provider"] == "CPUExecutionProvider"
            for method, url in [("POST", "/embed"), ("GET", "/index"), ("GET", "/metrics"), ("GET", "/")]:
                assert http.request(method, url).status_code == 401, url

            http.headers.update(AUTH)
            embedded = http.post("/embed", files=multipart(*photos[:2]))
            assert embedded.status_code == 200 and len(embedded.json()["embeddings"]) == 2
            as_json = http.post("/embed", json={"images": [base64.b64encode(photos[0]).decode()]}).json()
            assert np.abs(np.asarray(as_json["embeddings"][0]) - embedded.json()["embeddings"][0]).max() < 1e-5

            ids = http.post("/index", files=multipart(*photos), data={"labels": ["a", "b", "c", "d"]}).json()["ids"]
            assert len(ids) == 4
            assert http.get("/index").json()["size"] == 4
            overlay = http.post("/attention?threshold=0.6", files=multipart(photos[1]))
            assert overlay.headers["content-type"] == "image/png" and Image.open(io.BytesIO(overlay.content)).size == (
                64,
                64,
            )
            assert http.post("/attention?format=json&head=2", files=multipart(photos[1])).json()["grid"] == [8, 8]
            assert http.get(f"/attention/{ids[0]}").headers["content-type"] == "image/png"
            assert http.get(f"/index/{ids[0]}/image").headers["content-type"] == "image/jpeg"
            posted = http.post("/neighbors?k=2", files=multipart(photos[2])).json()["neighbors"]
            assert posted[0]["id"] == ids[2] and posted[0]["label"] == "c"
            assert ids[0] not in [n["id"] for n in http.get(f"/neighbors/{ids[0]}?k=3").json()["neighbors"]]
            assert http.delete(f"/index/{ids[3]}").status_code == 200
            before_restart = http.get(f"/neighbors/{ids[0]}?k=3").json()
            assert sorted(n["id"] for n in before_restart["neighbors"]) == sorted(ids[1:3])
            assert "dino_http_requests_total" in http.get("/metrics").text
            assert http.get("/").status_code == 200 and http.get("/docs").status_code == 200
            assert "/embed" in http.get("/openapi.json").json()["paths"]

            # upload limits over a real socket: a declared oversized body, and one streamed without a length
            declared = http.post(
                "/embed", content=b"x" * (MAX_UPLOAD + 1), headers={"content-type": "application/json"}
            )
            assert declared.status_code == 413 and "detail" in declared.json()
            streamed = http.post(
                "/embed", content=iter([b"x" * 65536] * 32), headers={"content-type": "application/json"}
            )
            assert streamed.status_code == 413 and "detail" in streamed.json()
            assert http.get("/readyz").status_code == 200  # still serving
        assert "active execution provider: CPUExecutionProvider" in server.log()
        assert server.stop()

        server = ServerProcess(model_dir, tmp_path / "server2.log", index_dir=gallery, env=env).start()
        with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as http:
            assert http.get("/index").json()["size"] == 3
            assert http.get(f"/neighbors/{ids[0]}?k=3").json() == before_restart
            for image_id in ids[:3]:
                assert http.get(f"/index/{image_id}/image").status_code == 200
            assert http.get(f"/index/{ids[3]}/image").status_code == 404
        assert server.stop()
    finally:
        server.kill()


def test_kill9_during_a_stream_of_index_adds_loses_no_acknowledged_add(model_dir, tmp_path):
    """Clients stream POST /index; the server is killed with SIGKILL mid-stream (twice, with frequent
    compactions so that kills also land inside them); after a restart every id answered 200 is there."""
    gallery = tmp_path / "gallery"
    env = {"DINO_INDEX_COMPACT_EVERY": "5", "DINO_WARMUP_BATCHES": "1"}
    photos = [photo_bytes(i) for i in range(60, 72)]
    acknowledged: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    kills = 2
    rng = random.Random(1234)

    def stream(url: str, worker: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            n = 0
            while not stop.is_set():
                images = [photos[(worker * 5 + n + j) % len(photos)] for j in range(1 + n % 2)]
                try:
                    response = http.post("/index", files=multipart(*images), data={"labels": f"worker{worker}"})
                except httpx.TransportError:
                    return  # the server died during this request: it was never acknowledged
                with lock:
                    if response.status_code == 200:
                        acknowledged.extend(response.json()["ids"])
                    else:
                        refused.append(f"{response.status_code} {response.text}")
                n += 1

    for round_ in range(kills):
        server = ServerProcess(model_dir, tmp_path / f"server{round_}.log", index_dir=gallery, env=env).start()
        target = len(acknowledged) + 15
        workers = [threading.Thread(target=stream, args=(server.url, w)) for w in range(3)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        server.kill()  # SIGKILL while the clients keep sending
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
        stop.clear()
        assert len(acknowledged) >= target, f"only {len(acknowledged)} adds acknowledged:\n{server.log()}"

    server = ServerProcess(model_dir, tmp_path / "server-final.log", index_dir=gallery, env=env).start()
    try:
        with DinoClient(server.url, timeout=30) as dino:
            size = dino.info().size

            def stored(image_id: str) -> bool:
                try:
                    return bool(dino.image(image_id))
                except DinoAPIError:
                    return False

            missing = [i for i in acknowledged if not stored(i)]
            searchable = sum(len(dino.neighbors_of(i, k=1)) == 1 for i in acknowledged if i not in missing)
        print(
            f"\ncrash test: {kills} x kill -9, {len(acknowledged)} adds acknowledged, "
            f"{len(acknowledged) - len(missing)} found after restart ({searchable} searchable), "
            f"gallery size {size} ({size - len(acknowledged) + len(missing)} unacknowledged in-flight adds kept)"
        )
        assert not refused, refused[:3]
        assert missing == []
        assert searchable == len(acknowledged)
        assert size >= len(acknowledged)
        assert server.stop()
    finally:
        server.kill()
