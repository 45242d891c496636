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
                log.warning("TensorBoard logging is off (%s: %s); install vpeft[tensorboard]", type(e).__name__, e)

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


def read_jsonl(path: str):
    """All records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
