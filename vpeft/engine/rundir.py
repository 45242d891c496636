"""Run directories: one training process per ``output_dir``, and no accidental mixing of runs.

:func:`claim` takes an exclusive ``fcntl.flock`` on ``output_dir/.lock`` for as long as
the process holds the returned :class:`RunLock` (the kernel drops it when the process
dies, so a killed run never leaves a stale lock). The lock file records the holder's
PID, host and start time, so a second run into the same directory stops at once with
an error naming them. A new run (not a resume) in a directory that already holds a run
is refused unless ``overwrite``, which removes the old run's files first.

Under torchrun only rank 0 claims (the others never write into the run directory).
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import List, Optional

log = logging.getLogger("vpeft")

LOCK = ".lock"
# what a run writes; their presence means the directory already holds a run
RUN_FILES = ("metrics.jsonl", "checkpoints", "config.yaml", "tensorboard")


class RunDirError(ValueError):
    """The run directory cannot be used by this run (in use, or holds another run)."""


class RunLock:
    """A held lock on a run directory; :meth:`release` (or process exit) frees it."""

    def __init__(self, path: str, fd: Optional[int]):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def existing_run_files(out_dir: str) -> List[str]:
    """The names of :data:`RUN_FILES` present in ``out_dir``."""
    return [n for n in RUN_FILES if os.path.exists(os.path.join(out_dir, n))]


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"PID {info.get('pid', '?')} on host {info.get('host', '?')} (since {info.get('since', '?')})"
    except (OSError, ValueError):
        return "another process (its PID could not be read)"


def claim(out_dir: str, *, resume: bool = False, overwrite: bool = False, check_only: bool = False) -> RunLock:
    """Lock ``out_dir`` for this training process.

    Args:
        out_dir: the run directory (created if absent).
        resume: this run continues the one in ``out_dir`` (its files are expected).
        overwrite: replace a previous run's files (metrics, checkpoints, config, TensorBoard).
        check_only: raise what :func:`claim` would raise, remove nothing and release the
            lock at once (the ``vpeft`` command's early check, before it loads torch).

    Raises:
        RunDirError: another process holds the lock (its PID and host are named), or
            ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    import fcntl

    if check_only and not os.path.isdir(out_dir):
        return RunLock(os.path.join(out_dir, LOCK), None)   # nothing there yet: nothing to refuse, nothing created
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(os.path.join(out_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {out_dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = _holder(fd)
        os.close(fd)
        raise RunDirError(f"output_dir {out_dir} is in use by {holder}: wait for that run to finish, or choose "
                          "another output_dir") from None
    lock = RunLock(os.path.join(out_dir, LOCK), fd)
    try:
        found = existing_run_files(out_dir)
        if found and not resume:
            if not overwrite:
                raise RunDirError(f"output_dir {out_dir} already holds a run ({', '.join(found)}): continue it with "
                                  "--resume, replace it with --overwrite, or choose another output_dir")
            if check_only:
                lock.release()
                return lock
            for n in found:
                p = os.path.join(out_dir, n)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
            log.info("--overwrite: removed the previous run's %s from %s", ", ".join(found), out_dir)
        if check_only:
            lock.release()
            return lock
        stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": stamp}) + "\n").encode())
    except BaseException:
        lock.release()
        raise
    return lock


def _run_name(config_name: Optional[str]) -> str:
    name = os.path.basename(config_name or "run")
    for ext in (".yaml", ".yml"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


def default_output_dir(config_name: Optional[str], root: str = "runs") -> str:
    """``runs/<config name>-<YYYYmmdd-HHMMSS>``: a new directory per run (a numeric suffix
    is added when that second's directory exists already)."""
    base = os.path.join(root, f"{_run_name(config_name)}-{time.strftime('%Y%m%d-%H%M%S')}")
    out, k = base, 1
    while os.path.exists(out):
        k += 1
        out = f"{base}-{k}"
    return out


def latest_run(config_name: Optional[str], root: str = "runs") -> Optional[str]:
    """The newest ``runs/<config name>-<timestamp>`` directory (what ``--resume`` continues
    when no output_dir is given), or None."""
    pattern = re.compile(re.escape(_run_name(config_name)) + r"-\d{8}-\d{6}(-\d+)?$")
    try:
        cands = [os.path.join(root, n) for n in os.listdir(root) if pattern.match(n)]
    except FileNotFoundError:
        return None
    cands = [c for c in cands if os.path.isdir(c)]
    return max(cands, key=os.path.getmtime) if cands else None


__all__ = ["claim", "RunLock", "RunDirError", "existing_run_files", "default_output_dir", "latest_run"]
