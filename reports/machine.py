"""The machine a measurement ran on (``runtime.machine.describe_machine``) as one line."""

from __future__ import annotations

from typing import Any

__all__ = ["format_machine"]


def format_machine(machine: dict[str, Any]) -> str:
    """One line for the top of a report."""
    ram = machine.get("ram_bytes")
    physical = machine.get("physical_cores")
    cores = f"{machine['logical_cores']} logical cores"
    if physical:
        cores += f" ({physical} physical)"
    if machine.get("usable_cores") not in (None, machine["logical_cores"]):
        cores += f", {machine['usable_cores']} usable"
    parts = [machine["cpu_model"], cores]
    if ram:
        parts.append(f"{ram / 2**30:.1f} GiB RAM")
    parts.append(machine["os"])
    parts.append(f"onnxruntime {machine['onnxruntime']} ({', '.join(machine['available_providers'])})")
    return ", ".join(parts)
