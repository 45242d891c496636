"""Benchmark configuration (``pytest benchmarks/ --benchmark-only``).

Without a GPU the Triton kernels run through Triton's CPU interpreter, which must be
switched on before triton is imported; set it here, first thing. Benchmark files are
named ``bench_*.py``; the hook below collects them (pytest's default pattern is
``test_*.py``). Skip reasons are shown in the summary (``-rs``), so a case skipped on
this machine (e.g. a GPU-sized case on a CPU) always says why. ``bench_env`` (session
fixture) gives the device name, library versions and the command for benchmarks that
write results (helpers in :mod:`benchmarks.common`).
"""
import os

if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fnmatch  # noqa: E402
import shlex  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    chars = getattr(config.option, "reportchars", "") or ""
    if "s" not in chars and "a" not in chars and "A" not in chars:
        config.option.reportchars = chars + "s"


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if parent.session.isinitpath(file_path):
            return None  # named on the command line: pytest collects it already
        if any(fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files")):
            return None  # already collected by pytest's own rule
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_env(pytestconfig):
    """Environment metadata of this run (a dict), including the command that started it."""
    from benchmarks import common

    args = shlex.join(str(a) for a in pytestconfig.invocation_params.args)
    return common.environment(f"pytest {args}".strip())
