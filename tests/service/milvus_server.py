"""A Milvus server for the tests: PyPI's ``milvus-lite`` run as its gRPC server on 127.0.0.1.

    server = MilvusLiteServer(tmp / "milvus-data", tmp / "milvus.log").start()
    MilvusClient(uri=server.uri)    # what several ``dino serve`` processes share
    server.stop(); server.start()   # the same data folder and port again: an outage and a recovery

``milvus-lite server --data-dir D --host H --port P [--max-workers N]`` (milvus-lite >= 3) speaks
Milvus's gRPC protocol, so the service reaches it through the same pymilvus client code as a real
Milvus. It runs with one gRPC worker thread: Milvus Lite does not support concurrent writes to one
collection (its README), and two service processes writing at once would otherwise race inside it.
SIGINT stops it cleanly (it closes its database); every wait is bounded and the process is killed
when it does not stop in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import LOOPBACK, free_port

#: seconds the server may take to listen
START_TIMEOUT = 60.0
#: seconds a clean stop may take before the process is killed
STOP_TIMEOUT = 20.0
POLL_INTERVAL = 0.1
#: characters of the log quoted in failure messages
LOG_TAIL_CHARS = 3000


class MilvusLiteServer:
    """``python -m milvus_lite server`` on a free port of 127.0.0.1 (kept across restarts), log to a file."""

    def __init__(self, data_dir: Path, log_path: Path, port: int | None = None):
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "milvus_lite",
            "server",
            "--data-dir",
            str(self.data_dir),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--max-workers",
            "1",
        ]

    def start(self, timeout: float = START_TIMEOUT) -> MilvusLiteServer:
        """Start the server and wait until its port accepts connections (AssertionError otherwise)."""
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ)
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"milvus-lite server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1.0):
                    return self
            except OSError:
                time.sleep(POLL_INTERVAL)
        self.kill()
        raise AssertionError(f"milvus-lite server not listening after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """Clean stop (SIGINT: the server closes its database), killed when it takes too long."""
        if not self.running:
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if self.log_path.exists() else ""
