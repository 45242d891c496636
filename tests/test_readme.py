"""Every shell and Python example of README.md, run as written (``make docs-check``).

Each fenced ``bash`` / ``python`` block runs in a fresh scratch directory with the
``vpeft`` command on ``PATH`` (this checkout's), so the blocks that write the synthetic
data use it as the README says. A block preceded by ``<!-- docs-check: skip (REASON) -->``
is skipped with that reason (it needs a GPU, network, real datasets or weights files);
``<!-- docs-check: slow -->`` marks a block that takes more than a few seconds on a CPU
(model building at full size, short training runs): those are ``@pytest.mark.slow``.
"""
import os
import re
import stat
import subprocess
import sys
from typing import List, NamedTuple, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
_MARK = re.compile(r"<!--\s*docs-check:\s*(skip|slow)\s*(?:\((.*)\))?\s*-->")


class Block(NamedTuple):
    line: int            # 1-based line of the opening fence
    lang: str
    code: str
    skip: Optional[str]  # the reason, when skipped
    slow: bool


def readme_blocks(path: str = README) -> List[Block]:
    """The ``bash`` and ``python`` blocks of ``path`` with their docs-check marks."""
    lines = open(path).read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(bash|python)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while lines[j].strip() != "```":
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = _MARK.search(lines[k]) if k >= 0 else None
        skip = None
        if mark and mark.group(1) == "skip":
            skip = mark.group(2) or ""
        blocks.append(Block(i + 1, m.group(1), "\n".join(lines[i + 1:j]) + "\n", skip,
                            bool(mark and mark.group(1) == "slow")))
        i = j + 1
    return blocks


def _params():
    out = []
    for b in readme_blocks():
        marks = [pytest.mark.slow] if b.slow else []
        out.append(pytest.param(b, marks=marks, id=f"README.md:{b.line}-{b.lang}"))
    return out


def test_every_skipped_block_says_why():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for b in blocks:
        assert b.skip is None or len(b.skip) > 10, f"README.md:{b.line}: a skipped example needs a reason"
    assert sum(b.skip is None for b in blocks) >= 5     # most examples do run


@pytest.fixture
def shell_env(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "vpeft"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m vpeft.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return str(work), env


@pytest.mark.parametrize("block", _params())
def test_readme_example_runs(block, shell_env):
    if block.skip is not None:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    cwd, env = shell_env
    cmd = ["bash", "-euo", "pipefail", "-c", block.code] if block.lang == "bash" else [sys.executable, "-c", block.code]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"README.md:{block.line} failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if block.lang == "python":
        for claim in _claimed_counts(block.code):
            assert claim in r.stdout, f"README.md:{block.line} says {claim}, the example printed:\n{r.stdout[-2000:]}"


def _claimed_counts(code: str) -> List[str]:
    """The first thousands-grouped number (``7,417,744``) of each comment: what the line prints."""
    out = []
    for line in code.splitlines():
        if "#" in line:
            m = re.search(r"\b\d{1,3}(?:,\d{3})+\b", line.split("#", 1)[1])
            if m:
                out.append(m.group(0))
    return out
