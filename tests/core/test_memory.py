import sys

import pytest

from compquant.core.memory import return_freed_memory


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_system():
    chunks = [bytearray(32 * 1024) for _ in range(6000)]  # ~190 MiB of small heap allocations
    del chunks[:-1]  # all but the last: the heap top stays in use, so glibc cannot shrink it by itself
    held = resident_mib()
    return_freed_memory()
    assert resident_mib() < held - 100
