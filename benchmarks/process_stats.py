"""What a running server process uses, seen from outside: memory, CPU time, and where the CPU goes.

- :func:`rss_mb`: resident memory of a process and its children (uvicorn workers), in MiB;
  :class:`PeakSampler` samples it in a thread to find the peak during a load.
- :func:`cpu_seconds` (process and children) and :func:`thread_cpu` (per OS thread); :class:`CpuMeter`
  sums both, and this process's own CPU time, over measured spans.
- :func:`start_py_spy` and :func:`summarise_py_spy`: a ``py-spy record`` of the process's Python threads
  and its on-CPU samples per thread and per function.

Uses ``psutil`` (the dev extra); without it :func:`rss_mb` reads ``/proc`` (the process alone) and the
CPU figures are None or empty.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

MIB = 2**20
#: py-spy sampling rate (samples per second)
PY_SPY_RATE = 50


# ----------------------------------------------------------------------------------------- memory
def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` and its children (uvicorn workers), in MiB; None when unknown."""
    try:
        import psutil
    except ImportError:
        return _proc_status_rss_mb(pid)
    try:
        proc = psutil.Process(pid)
        total = 0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / MIB
    except Exception:
        return None


def _proc_status_rss_mb(pid: int) -> float | None:
    """``VmRSS`` of ``/proc/PID/status`` in MiB (the process alone, Linux only)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakSampler(threading.Thread):
    """Samples the RSS of ``pid`` (and its children) every ``interval`` seconds; ``peak`` is the highest."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            value = rss_mb(self.pid)
            if value:
                self.peak = max(self.peak, value)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# -------------------------------------------------------------------------------------------- CPU
def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and its children so far; None when unknown."""
    try:
        import psutil

        proc = psutil.Process(pid)
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
        return total
    except Exception:
        return None


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per OS thread of ``pid`` (the main thread, tid == pid, runs the event loop)."""
    try:
        import psutil

        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except Exception:
        return {}


class CpuMeter:
    """CPU seconds of a server process (all of it, and per thread) and of this process (the load
    client), summed over the spans measured with :meth:`span`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.server_s = 0.0  #: the server and its children
        self.per_thread_s: dict[int, float] = {}  #: the server's own threads, by OS thread id
        self.client_s = 0.0  #: this process

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        cpu0, threads0, client0 = cpu_seconds(self.pid), thread_cpu(self.pid), time.process_time()
        yield
        cpu1, threads1 = cpu_seconds(self.pid), thread_cpu(self.pid)
        self.client_s += time.process_time() - client0
        if cpu0 is not None and cpu1 is not None:
            self.server_s += cpu1 - cpu0
        for tid, value in threads1.items():
            self.per_thread_s[tid] = self.per_thread_s.get(tid, 0.0) + value - threads0.get(tid, 0.0)

    @property
    def main_thread_s(self) -> float:
        """The server's main thread (tid == pid), which runs the event loop."""
        return self.per_thread_s.get(self.pid, 0.0)

    def other_threads_s(self, top: int) -> list[float]:
        """The ``top`` busiest other threads of the server, in CPU seconds (rounded), busiest first."""
        return sorted((round(v, 2) for t, v in self.per_thread_s.items() if t != self.pid), reverse=True)[:top]


# ---------------------------------------------------------------------------------------- py-spy
def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """``py-spy record`` (raw collapsed stacks, thread names, non-blocking) on ``pid`` for ``seconds``;
    None (with a message) when py-spy is not installed."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("py-spy not found (pip install py-spy): no profile", flush=True)
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(PY_SPY_RATE)]
    cmd += ["--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _without_line(frame: str) -> str:
    """``fn (file.py:123)`` -> ``fn (file.py)``: one entry per function, not per line."""
    return re.sub(r":\d+\)$", ")", frame)


def _percent_top(counts: dict[str, int], total: int, top: int) -> dict[str, float]:
    """The ``top`` largest counts as percentages of ``total``, largest first."""
    if not total:
        return {}
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return {key: round(100 * value / total, 1) for key, value in ranked}


def summarise_py_spy(path: Path, top: int = 25) -> dict:
    """Where the server's Python threads spent their on-CPU samples: per thread and per function
    (inclusive: a function counts once per sample it appears in; leaf: the innermost frame)."""
    per_thread: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    leaf: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        # "thread (TID): NAME": keep the name, group pool threads ("dino-preprocess_3") by prefix
        name = thread.split("): ", 1)[1] if "): " in thread else thread
        name = re.sub(r"_\d+$", "_*", name)
        per_thread[name] = per_thread.get(name, 0) + n
        funcs = [f for f in frames if not f.startswith(("thread ", "process "))]
        for f in {_without_line(f) for f in funcs}:
            inclusive[f] = inclusive.get(f, 0) + n
        if funcs:
            key = _without_line(funcs[-1])
            leaf[key] = leaf.get(key, 0) + n
        total += n
    return {
        "samples": total,
        "by_thread_pct": _percent_top(per_thread, total, top),
        "inclusive_pct": _percent_top(inclusive, total, top),
        "leaf_pct": _percent_top(leaf, total, top),
    }
