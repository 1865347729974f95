"""Resident memory of this process from /proc (Linux), for the benchmarks that run each method in a child."""

from __future__ import annotations


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` field in MiB: ``VmRSS`` now, ``VmHWM`` the high-water mark (not inherited)."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Start a new high-water mark from the current resident size (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as refs:
        refs.write("5")
