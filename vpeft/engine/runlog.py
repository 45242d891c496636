"""Run logs: JSON lines (one object per event, flushed at once) and TensorBoard scalars."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional

log = logging.getLogger("vpeft")


class RunLogger:
    """Writes ``metrics.jsonl`` and TensorBoard event files under ``out_dir``.

    Only construct it on rank 0 (other ranks pass ``enabled=False`` and every call is a
    no-op). Each record is written and flushed immediately, so a crash loses nothing
    already logged. A resumed run appends to the same file after a ``resume`` record;
    readers should keep the last record for each step.
    """

    def __init__(self, out_dir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._f = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except Exception as e:  # noqa: BLE001 - tensorboard is optional
                log.warning("TensorBoard logging is off (%s: %s); pip install tensorboard", type(e).__name__, e)

    def write(self, record: Dict[str, Any], step: Optional[int] = None) -> None:
        """Append ``record`` (plus a wall-clock ``time``) and mirror its numbers to TensorBoard."""
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **record}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None and step is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class ProgressLog:
    """Progress as log lines, for output without a terminal (CI, ``> log``, cluster jobs),
    where a progress bar shows nothing.

    :meth:`step` logs ``step S/N  loss  lr  clips/s  ETA`` every ``every_steps`` steps,
    at least every ``every_s`` seconds, and at the last step. The rate and ETA come from
    this invocation's steps only (a resumed run does not count the steps it skipped).

    Args:
        total: the schedule's total optimizer steps.
        start: the step this invocation starts at (non-zero after a resume).
        every_steps: steps between lines (``train.log_every``).
        every_s: the longest silence, in seconds.
        enabled: False (e.g. a progress bar is shown, or not rank 0) turns every call into a no-op.
    """

    def __init__(self, total: int, start: int = 0, *, every_steps: int = 10, every_s: float = 30.0,
                 enabled: bool = True, clock=time.monotonic):
        self.total, self.start = int(total), int(start)
        self.every_steps, self.every_s = max(int(every_steps), 1), float(every_s)
        self.enabled, self._clock = enabled, clock
        self._t0 = self._last = clock()

    def step(self, step: int, loss: float, lr: float, clips_per_s: float) -> Optional[str]:
        """Log (and return) a line for ``step`` when one is due; None otherwise."""
        if not self.enabled:
            return None
        now = self._clock()
        if not (step % self.every_steps == 0 or step >= self.total or now - self._last >= self.every_s):
            return None
        self._last = now
        done = max(step - self.start, 1)
        eta = (now - self._t0) / done * (self.total - step)
        line = (f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {clips_per_s:.1f} clips/s  "
                f"ETA {_duration(eta)}")
        log.info("%s", line)
        return line


def read_jsonl(path: str):
    """All records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
