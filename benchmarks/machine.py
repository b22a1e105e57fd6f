"""The machine a benchmark ran on, recorded in every result JSON.

This machine is shared and noisy, so each result keeps the load average at the start next to the
hardware; each benchmark adds its own library versions and settings to this dict.
"""

from __future__ import annotations

import datetime as dt
import os
import platform


def _proc_field(path: str, key: str) -> str | None:
    """The value of ``key:`` in a /proc file such as /proc/cpuinfo (None off Linux)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """Date, host, CPU model and counts, memory, and the load average at the start."""
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_total_gb": round(int(mem_kb.split()[0]) / 1024**2, 1) if mem_kb else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
