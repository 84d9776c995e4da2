"""Wall time and peak memory of a piece of work, for the comparison table and the benchmarks."""
from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass

import torch


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    peak_cuda_bytes: int | None = None


class measure:
    """Context manager that records wall time and the peak RSS seen while it is open (sampled every
    ``interval`` seconds), plus the CUDA allocator's peak when CUDA is in use."""

    def __init__(self, interval: float = 0.02) -> None:
        self.result = Measurement()
        self._interval = interval
        self._stop = threading.Event()

    def __enter__(self) -> Measurement:
        self.result.peak_rss_bytes = current_rss_bytes()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()
        return self.result

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, current_rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self.result.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, current_rss_bytes())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.result.peak_cuda_bytes = torch.cuda.max_memory_allocated()
