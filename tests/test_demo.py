"""Pieces of ``vpeft demo`` that can be checked quickly (the full demo is `make demo`)."""
import os

import numpy as np
import pytest

from vpeft.demo import DEMO_METHODS, PeakRSS, format_table


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS sampling needs Linux /proc")
def test_peak_rss_sees_a_transient_allocation():
    with PeakRSS(interval=0.001) as mem:
        a = np.ones(64 * 2 ** 20 // 8)        # 64 MiB, touched
        a.sum()
        import time

        time.sleep(0.05)
        del a
    assert mem.mib is not None and mem.mib > 40


def test_table_labels_cpu_memory_honestly():
    row = dict(name="probe", trainable_parameters=388, steps=300, peak_rss_mib=12.3, clips_per_s=40.0, top1=25.0,
               mean_class=25.0)
    t = format_table([row])
    assert "peak RSS increase (MiB, CPU)" in t and "GPU" not in t and "| probe | 388 | 300 | 12 | 40.0 | 25.0 |" in t


def test_demo_covers_the_four_methods():
    assert [m[1] for m in DEMO_METHODS] == ["linear_probe", "st_adapter", "msta", "side4video"]
    assert DEMO_METHODS[2][2]["text"] is False     # MSTA's vision adapters only
