"""The machine a measurement ran on: CPU model, cores, RAM, OS, onnxruntime and its providers,
and the load average (other work on the machine skews timings; a report should say so).
``reports.machine.format_machine`` writes the description as one line.

Read from the standard library, ``/proc`` where it exists and onnxruntime; nothing is run.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import onnxruntime as ort

__all__ = ["describe_machine", "load_average", "peak_rss_bytes", "current_rss_bytes"]


def _cpuinfo() -> list[dict[str, str]]:
    """Processor blocks of /proc/cpuinfo (empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    blocks = []
    for chunk in text.strip().split("\n\n"):
        block = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                block[key.strip()] = value.strip()
        blocks.append(block)
    return blocks


def _cpu_model(blocks: list[dict[str, str]]) -> str:
    for block in blocks:
        for key in ("model name", "Model", "Hardware", "cpu model"):
            if block.get(key):
                return block[key]
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores(blocks: list[dict[str, str]]) -> int | None:
    cores = {(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b}
    return len(cores) or None


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (VmHWM; ru_maxrss where /proc is missing)."""
    value = _status_bytes("VmHWM")
    if value is not None:
        return value
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def current_rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def describe_machine() -> dict[str, Any]:
    """What a benchmark report states about the machine (JSON-ready)."""
    blocks = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(blocks),
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(blocks),
        "usable_cores": usable,
        "ram_bytes": _ram_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "available_providers": list(ort.get_available_providers()),
    }

