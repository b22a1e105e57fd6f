"""A real ``dino serve`` process on 127.0.0.1, for the tests and the benchmarks that drive one.

    with ServerProcess(model_dir, tmp_path / "server.log") as server:
        httpx.post(f"{server.url}/embed", ...)

Used by the service tests (``tests/service``), ``benchmarks/load_test.py`` and
``benchmarks/screenshot_page.py``. The server's output goes to a log file; :meth:`ServerProcess.log`
returns its tail for assertion messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
#: characters of the server log quoted in failure messages
LOG_TAIL_CHARS = 5000
#: seconds a graceful stop may take before the process is killed
STOP_TIMEOUT = 20.0
#: seconds between two /readyz polls
POLL_INTERVAL = 0.1


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m dino.cli serve`` (or any ``command``) on a free port of 127.0.0.1, logs to a file.

    Args:
        model_dir: the model folder to serve (``--model``).
        log_path: file that receives the server's stdout and stderr (appended to).
        index_dir: gallery folder (``--index``); None serves an in-memory gallery.
        env: extra environment variables; a value of None removes the variable.
        command: the full command to run instead of ``dino serve``; ``{port}`` in an item is replaced
            by the chosen port (for example uvicorn's ``--factory service.app:create_app_from_env``).
    """

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *,
        index_dir: Path | None = None,
        env: dict[str, str | None] | None = None,
        command: list[str] | None = None,
    ):
        self.model_dir = model_dir
        self.index_dir = index_dir
        self.log_path = log_path
        self.extra_env = env or {}
        self.custom_command = command
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready: dict = {}  #: the /readyz answer once started

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the server is not started")
        return self.process.pid

    def command(self) -> list[str]:
        if self.custom_command is not None:
            return [part.replace("{port}", str(self.port)) for part in self.custom_command]
        command = [sys.executable, "-m", "dino.cli", "serve", "--model", str(self.model_dir)]
        command += ["--host", LOOPBACK, "--port", str(self.port)]
        if self.index_dir is not None:
            command += ["--index", str(self.index_dir)]
        return command

    def start(self, timeout: float = 90.0) -> ServerProcess:
        """Start the process and wait until ``/readyz`` answers 200 (AssertionError otherwise)."""
        self.port = free_port()
        env: dict[str, str | None] = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "DINO_PREPROCESS_THREADS": "2",
            **self.extra_env,
        }
        clean_env = {key: value for key, value in env.items() if value is not None}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=REPO, env=clean_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=1.0)
                if answer.status_code == 200:
                    self.ready = answer.json()
                    return self
            except httpx.TransportError:
                pass
            time.sleep(POLL_INTERVAL)
        self.kill()
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """The tail of the server's log."""
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if self.log_path.exists() else ""

    def stop(self) -> bool:
        """Graceful stop (SIGTERM, as a process manager would); True when the app shut down cleanly.

        uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return False
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            return False
        return code in (0, -signal.SIGTERM) and "Application shutdown complete." in self.log()

    def kill(self) -> None:
        """kill -9: no cleanup of any kind in the server."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT)

    def __enter__(self) -> ServerProcess:
        return self if self.process is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.stop():
            self.kill()
