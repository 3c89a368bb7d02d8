"""The machine this process runs on, as the loaders, the converters and the CPU thread count see it."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (a container's or a scheduler's limit), which
    os.cpu_count() ignores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
