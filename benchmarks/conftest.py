"""Benchmark configuration.

* Files named ``bench_*.py`` are collected as test modules, so
  ``pytest benchmarks/ --benchmark-only`` finds them without changing the project's
  ``python_files`` setting.
* Without a GPU, Triton kernels run through Triton's CPU interpreter, which must be
  switched on before triton is imported; set it here, first thing.
"""
import os

if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
