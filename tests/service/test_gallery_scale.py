"""Several ``dino serve`` processes on one Milvus server (the ``milvus_server`` fixture: milvus-lite's
gRPC server on 127.0.0.1), over real HTTP.

- two services (one of them with two uvicorn workers) share the gallery: an add acknowledged by one
  is found by a search on the other at once, and so is a delete;
- ``kill -9`` of a service during a stream of adds loses no acknowledged add;
- Milvus stopped while a service runs: gallery routes answer 503 with the reason, /embed and
  /attention keep working, /readyz says what is missing, and the service comes back on its own
  when Milvus is started again on the same data folder and port.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess
from tests.service.images import multipart, photo_bytes

# every test here starts real server processes (a few seconds each)
pytestmark = pytest.mark.slow

#: seconds a service may take to notice that Milvus is back (a few retry intervals)
RECOVERY_SECONDS = 30
#: the watchdog's interval in these tests (DINO_MILVUS_RETRY_INTERVAL)
RETRY_INTERVAL = "0.5"


def milvus_env(server_uri: str, collection: str, **extra: str) -> dict[str, str | None]:
    return {
        "DINO_GALLERY": "milvus",
        "DINO_MILVUS_URI": server_uri,
        "DINO_MILVUS_COLLECTION": collection,
        "DINO_MILVUS_TIMEOUT": "5",
        "DINO_MILVUS_RETRY_INTERVAL": RETRY_INTERVAL,
        "DINO_WARMUP_BATCHES": "1",
        "DINO_INDEX_DIR": None,
        **extra,
    }


def test_two_services_share_one_gallery(model_dir, tmp_path, milvus_server, milvus_collection):
    photos = [photo_bytes(i) for i in (30, 31, 32, 33)]  # before the servers: a skip must not leak them
    env = milvus_env(milvus_server.uri, milvus_collection)
    a = ServerProcess(model_dir, tmp_path / "a.log", env={**env, "DINO_WORKERS": "2"})
    b = ServerProcess(model_dir, tmp_path / "b.log", env=env)
    try:
        a.start()
        b.start()
        with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
            for http in (on_a, on_b):
                assert http.get("/readyz").json()["gallery"]["available"] is True
            ids = []
            for i, data in enumerate(photos):  # A's two workers take turns: every add is still shared
                answer = on_a.post("/index", files=multipart(data), data={"labels": f"photo {i}"})
                assert answer.status_code == 200, answer.text
                ids += answer.json()["ids"]
                best = on_b.post("/neighbors?k=1", files=multipart(data)).json()["neighbors"][0]
                assert best["id"] == ids[-1] and best["score"] > 0.999 and best["label"] == f"photo {i}"
            # and the other way round, with images and listings agreeing
            (from_b,) = on_b.post("/index", files=multipart(photo_bytes(34))).json()["ids"]
            assert on_a.get(f"/neighbors/{from_b}?k=1").status_code == 200
            assert on_a.get(f"/index/{ids[0]}/image").content == on_b.get(f"/index/{ids[0]}/image").content
            assert on_a.get("/index").json()["size"] == on_b.get("/index").json()["size"] == 5
            listed = [[e["id"] for e in http.get("/index/items").json()["items"]] for http in (on_a, on_b)]
            assert listed[0] == listed[1] == ids + [from_b]

            assert on_b.delete(f"/index/{ids[1]}").status_code == 200
            assert on_a.get(f"/index/{ids[1]}/image").status_code == 404
            assert on_a.delete(f"/index/{ids[1]}").status_code == 404
            assert ids[1] not in [n["id"] for n in on_a.get(f"/neighbors/{ids[0]}?k=10").json()["neighbors"]]
        assert "read-only" not in a.log()
        assert a.stop() and b.stop()
    finally:
        a.kill()
        b.kill()


def test_kill9_of_a_service_loses_no_acknowledged_add(model_dir, tmp_path, milvus_server, milvus_collection):
    """Clients stream POST /index to service A; A is killed with SIGKILL mid-stream; a fresh service
    B finds every id that A answered 200."""
    photos = [photo_bytes(i) for i in range(40, 48)]
    env = milvus_env(milvus_server.uri, milvus_collection)
    acknowledged: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def stream(url: str, worker: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            n = 0
            while not stop.is_set():
                images = [photos[(worker * 3 + n + j) % len(photos)] for j in range(1 + n % 2)]
                try:
                    answer = http.post("/index", files=multipart(*images), data={"labels": f"worker{worker}"})
                except httpx.TransportError:
                    return  # the server died during this request: it was never acknowledged
                with lock:
                    if answer.status_code == 200:
                        acknowledged.extend(answer.json()["ids"])
                    else:
                        refused.append(f"{answer.status_code} {answer.text}")
                n += 1

    a = ServerProcess(model_dir, tmp_path / "a.log", env=env).start()
    workers = [threading.Thread(target=stream, args=(a.url, w)) for w in range(3)]
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        a.kill()  # SIGKILL while the clients keep sending
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
        a.kill()
    assert len(acknowledged) >= 20, f"only {len(acknowledged)} adds acknowledged:\n{a.log()}"

    with ServerProcess(model_dir, tmp_path / "b.log", env=env) as b, httpx.Client(base_url=b.url, timeout=30) as http:
        size = http.get("/index").json()["size"]
        missing = [i for i in acknowledged if http.get(f"/index/{i}/image").status_code != 200]
        listed = set()
        total = http.get("/index/items", params={"limit": 1}).json()["total"]
        for offset in range(0, total, 100):
            page = http.get("/index/items", params={"offset": offset, "limit": 100}).json()["items"]
            listed.update(e["id"] for e in page)
        print(
            f"\nmilvus crash test: kill -9 of a service, {len(acknowledged)} adds acknowledged, "
            f"{len(acknowledged) - len(missing)} found by another service, gallery size {size}"
        )
        assert not refused, refused[:3]
        assert missing == []
        assert set(acknowledged) <= listed and size >= len(acknowledged)


def test_milvus_outage_degrades_the_gallery_only_and_recovers(model_dir, tmp_path, milvus_server, milvus_collection):
    photos = [photo_bytes(i) for i in (50, 51)]
    env = milvus_env(milvus_server.uri, milvus_collection)
    service = ServerProcess(model_dir, tmp_path / "service.log", env=env).start()
    try:
        with httpx.Client(base_url=service.url, timeout=30) as http:
            (kept,) = http.post("/index", files=multipart(photos[0]), data={"labels": "kept"}).json()["ids"]

            milvus_server.stop()
            for method, url, kwargs in [
                ("GET", "/index", {}),
                ("GET", "/index/items", {}),
                ("POST", "/neighbors", {"files": multipart(photos[0])}),
                ("GET", f"/neighbors/{kept}", {}),
                ("GET", f"/index/{kept}/image", {}),
                ("GET", f"/attention/{kept}", {}),
                ("DELETE", f"/index/{kept}", {}),
                ("POST", "/index", {"files": multipart(photos[1])}),
            ]:
                answer = http.request(method, url, **kwargs)
                assert answer.status_code == 503, (method, url, answer.text)
                detail = answer.json()["detail"]
                assert "gallery" in detail and "unavailable" in detail and milvus_server.uri in detail, detail
                assert answer.headers["retry-after"] == "1"
            assert http.post("/embed", files=multipart(photos[1])).status_code == 200
            assert http.post("/attention", files=multipart(photos[1])).headers["content-type"] == "image/png"
            ready = http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            assert ready.json()["gallery"]["available"] is False
            assert any("Milvus" in missing for missing in ready.json()["missing"])
            assert "dino_gallery_available 0.0" in http.get("/metrics").text

            milvus_server.start()  # same data folder, same port
            deadline = time.monotonic() + RECOVERY_SECONDS
            while http.get("/readyz").json()["status"] != "ready" and time.monotonic() < deadline:
                time.sleep(0.2)  # no gallery traffic meanwhile: the service's watchdog reconnects
            assert http.get("/readyz").json()["status"] == "ready", service.log()
            best = http.post("/neighbors?k=1", files=multipart(photos[0])).json()["neighbors"][0]
            assert best["id"] == kept and best["label"] == "kept"
            assert http.post("/index", files=multipart(photos[1])).status_code == 200
            assert http.get("/index").json()["size"] == 2
        log = service.log()
        assert "Traceback" not in log, log
        assert service.stop()
    finally:
        milvus_server.start()
        service.kill()
