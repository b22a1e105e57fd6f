"""Slow or stalled clients against a real ``dino serve`` on 127.0.0.1, over raw sockets: the request
head has a deadline and a size limit, a stalled body gets 408, idle connections are closed, and a
client that leaves mid-upload is neither an error in the log nor a 500 in the metrics."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from tests.helpers import LOOPBACK, ServerProcess

pytestmark = pytest.mark.slow

#: the server's deadlines in these tests (seconds), and how long a test waits for their effect
DEADLINE = 1
WAIT = 6.0


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    env = {
        "DINO_HEADER_TIMEOUT": str(DEADLINE),
        "DINO_BODY_TIMEOUT": str(DEADLINE),
        "DINO_KEEP_ALIVE_TIMEOUT": str(DEADLINE),
        "DINO_INDEX_DIR": None,
        "DINO_API_KEY": None,
    }
    process = ServerProcess(model_dir, tmp_path_factory.mktemp("limits") / "server.log", env=env).start()
    yield process
    process.stop()
    process.kill()


def connect(server) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, server.port), timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it does not)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_half_sent_request_head_is_closed_after_the_deadline(server):
    with connect(server) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        assert time.monotonic() - started < WAIT


def test_a_stalled_body_gets_408(server):
    with connect(server) as sock:
        head = b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head + b'{"images": ')
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"stalled" in answer


@pytest.mark.parametrize("what", ["one 10 MB header", "20,000 headers"])
def test_an_oversized_request_head_is_refused(server, what):
    if what == "one 10 MB header":
        headers = b"X-Big: " + b"a" * (10 * 2**20) + b"\r\n"
    else:
        headers = b"".join(b"X-%d: 1\r\n" % i for i in range(20_000))
    with connect(server) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
            answer = read_until_closed(sock)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""  # refused while the head was still being sent
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400")


def test_an_idle_kept_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(3 * DEADLINE)  # well before uvicorn's own default of 5 s
        answer = read_until_closed(sock)  # the answer, then the close (a socket.timeout if it stays open)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"alive"}')


def test_a_client_leaving_mid_upload_is_not_a_server_error(server):
    for _ in range(3):
        with connect(server) as sock:
            head = b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            sock.sendall(head + b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=")
    time.sleep(DEADLINE)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert not re.search(r'dino_http_requests_total\{[^}]*status="500"', metrics), metrics
    assert "ERROR" not in server.log()
