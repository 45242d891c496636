"""Benchmark configuration (``pytest benchmarks/ --benchmark-only``).

Without a GPU the Triton kernels run through Triton's CPU interpreter, which must be
switched on before triton is imported; set it here, first thing. Benchmark files are
named ``bench_*.py``; the hook below collects them (pytest's default pattern is
``test_*.py``).
"""
import os

if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):
            return None  # named on the command line: pytest collects it already
        return pytest.Module.from_parent(parent, path=file_path)
    return None
