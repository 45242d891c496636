"""Decoding frames from video files: decord first, PyAV when decord cannot read a file."""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np


class VideoDecodeError(RuntimeError):
    """A video that is missing, empty or cannot be decoded; the message names the file."""


def _decord_read(path: str) -> Tuple[int, Callable[[Sequence[int]], np.ndarray]]:
    import decord

    vr = decord.VideoReader(path, num_threads=1)
    total = len(vr)

    def get(indices):
        return vr.get_batch(list(indices)).asnumpy()

    return total, get


def _pyav_read(path: str) -> Tuple[int, Callable[[Sequence[int]], np.ndarray]]:
    import av

    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    if not frames:
        raise VideoDecodeError(f"{path}: no video frames")
    arr = np.stack(frames)
    return len(arr), lambda indices: arr[np.asarray(indices, dtype=np.int64)]


def read_frames(path: str, choose: Callable[[int], List[int]]) -> np.ndarray:
    """Decode the frames ``choose(total_frames)`` of ``path`` as ``uint8 (K, H, W, 3)``.

    Raises :class:`VideoDecodeError` when neither decord nor PyAV can read the file.
    """
    import os

    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: file does not exist")
    errors = []
    for name, reader in (("decord", _decord_read), ("pyav", _pyav_read)):
        try:
            total, get = reader(path)
            if total < 1:
                raise VideoDecodeError(f"{path}: no video frames")
            out = get(choose(total))
            if out.ndim != 4 or out.shape[-1] != 3 or out.shape[0] == 0:
                raise VideoDecodeError(f"{path}: decoded frames have shape {out.shape}")
            return out
        except Exception as e:  # noqa: BLE001 - any decoder failure means "try the next one"
            errors.append(f"{name}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    raise VideoDecodeError(f"{path}: cannot decode ({'; '.join(errors)})")
