"""This process's resident memory, read the same way on both sides of a comparison. Standard
library only: llm-compressor's side imports it from its own environment."""
from __future__ import annotations

import resource


def rss_mib(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set size. The peak is Linux's VmHWM,
    not ru_maxrss: the latter carries over the parent's RSS at fork across exec, so a child of a
    big process would report the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
