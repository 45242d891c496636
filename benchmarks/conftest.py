"""Shared pytest set-up for ``pytest benchmarks/ --benchmark-only``.

* Collects ``bench_*.py`` files (pytest's default ``python_files`` is only
  ``test_*.py`` / ``*_test.py``), unless the configured patterns already do.
* Shows skip reasons in the summary (``-rs``), so a case skipped on this machine
  (e.g. a GPU-sized case on a CPU) always says why.
* ``bench_env`` (session fixture): device name, library versions and the command, for
  any benchmark that writes results (see :mod:`benchmarks.common`).
"""
import fnmatch
import shlex

import pytest

from benchmarks import common


def pytest_configure(config):
    chars = getattr(config.option, "reportchars", "") or ""
    if "s" not in chars and "a" not in chars and "A" not in chars:
        config.option.reportchars = chars + "s"


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it itself
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None  # already collected by pytest's own rule
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def bench_env(pytestconfig):
    """Environment metadata of this run (a dict), including the command that started it."""
    args = shlex.join(str(a) for a in pytestconfig.invocation_params.args)
    return common.environment(f"pytest {args}".strip())
