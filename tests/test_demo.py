"""Pieces of ``vpeft demo`` that can be checked quickly (the full demo is `make demo`)."""
import os

import pytest

from vpeft.demo import DEMO_METHODS, PeakRSS, format_table


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS sampling needs Linux /proc")
def test_peak_rss_sees_a_transient_allocation():
    import mmap
    import time

    size = 64 * 2 ** 20
    with PeakRSS(interval=0.001) as mem:
        # a fresh anonymous mapping, every page touched: new resident memory even when the
        # allocator already holds freed pages from earlier tests (np.ones could reuse those)
        a = mmap.mmap(-1, size)
        for off in range(0, size, mmap.PAGESIZE):
            a[off] = 1
        time.sleep(0.05)
        a.close()
    assert mem.mib is not None and mem.mib > 40


def test_table_labels_cpu_memory_honestly():
    row = dict(name="probe", trainable_parameters=388, steps=300, peak_rss_mib=12.3, clips_per_s=40.0, top1=25.0,
               mean_class=25.0)
    t = format_table([row])
    assert "peak RSS increase (MiB, CPU)" in t and "GPU" not in t and "| probe | 388 | 300 | 12 | 40.0 | 25.0 |" in t


def test_demo_covers_the_four_methods():
    assert [m[1] for m in DEMO_METHODS] == ["linear_probe", "st_adapter", "msta", "side4video"]
    assert DEMO_METHODS[2][2]["text"] is False     # MSTA's vision adapters only
