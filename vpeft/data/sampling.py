"""Which frames of a video make a clip.

Two strategies, both returning ``num_frames`` frame indices in ``[0, total)``:

* **segment** (TSN style, used for SSv2 and by most adapter papers): split the video
  into ``num_frames`` equal segments and take one frame per segment: a random offset
  inside the segment when training, the segment centre when testing. Test clip ``k``
  of ``num_clips`` shifts every centre by ``k / num_clips`` of a segment.
* **dense** (Kinetics style): ``num_frames`` frames ``stride`` apart from one start
  frame: random when training; for test clip ``k`` of ``num_clips`` the starts are
  spread evenly over the video.

A video shorter than the clip repeats frames: segment sampling then gives
non-decreasing indices covering the video evenly; dense sampling clamps to the last
frame.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

STRATEGIES = ("segment", "dense")


def _check(total: int, num_frames: int):
    if not isinstance(total, (int, np.integer)) or total < 1:
        raise ValueError(f"a video needs at least one frame, got total={total!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def segment_indices(total: int, num_frames: int, *, train: bool, rng: Optional[np.random.Generator] = None,
                    clip: int = 0, num_clips: int = 1) -> List[int]:
    """Segment sampling: one frame from each of ``num_frames`` equal segments.

    Args:
        total: number of frames in the video.
        num_frames: frames per clip.
        train: random offset per segment (needs ``rng``) instead of the centre.
        clip, num_clips: at test time, which of ``num_clips`` evenly shifted views.
    """
    _check(total, num_frames)
    seg = total / num_frames
    if train:
        if rng is None:
            raise ValueError("segment sampling for training needs an rng")
        starts = np.arange(num_frames) * seg
        offs = rng.random(num_frames) * seg
        idx = np.floor(starts + offs)
    else:
        if not 0 <= clip < num_clips:
            raise ValueError(f"clip must be in [0, {num_clips}), got {clip}")
        idx = np.floor(np.arange(num_frames) * seg + seg * (clip + 0.5) / num_clips)
    return np.clip(idx.astype(np.int64), 0, total - 1).tolist()


def dense_indices(total: int, num_frames: int, stride: int, *, train: bool,
                  rng: Optional[np.random.Generator] = None, clip: int = 0, num_clips: int = 1) -> List[int]:
    """Dense sampling: ``num_frames`` frames ``stride`` apart.

    Args:
        total: number of frames in the video.
        num_frames: frames per clip.
        stride: gap between sampled frames (>= 1).
        train: random start (needs ``rng``); otherwise the start of test clip ``clip``
            of ``num_clips`` spread evenly over the video (a single clip is centred).
    """
    _check(total, num_frames)
    if stride < 1:
        raise ValueError(f"dense sampling stride must be >= 1, got {stride}")
    span = (num_frames - 1) * stride + 1
    room = max(total - span, 0)
    if train:
        if rng is None:
            raise ValueError("dense sampling for training needs an rng")
        start = int(rng.integers(0, room + 1))
    else:
        if not 0 <= clip < num_clips:
            raise ValueError(f"clip must be in [0, {num_clips}), got {clip}")
        start = int(round(room / 2)) if num_clips == 1 else int(round(room * clip / (num_clips - 1)))
    idx = start + np.arange(num_frames) * stride
    return np.clip(idx, 0, total - 1).astype(np.int64).tolist()


def sample_indices(strategy: str, total: int, num_frames: int, *, train: bool, stride: int = 1,
                   rng: Optional[np.random.Generator] = None, clip: int = 0, num_clips: int = 1) -> List[int]:
    """Dispatch to :func:`segment_indices` or :func:`dense_indices` by ``strategy``."""
    if strategy == "segment":
        return segment_indices(total, num_frames, train=train, rng=rng, clip=clip, num_clips=num_clips)
    if strategy == "dense":
        return dense_indices(total, num_frames, stride, train=train, rng=rng, clip=clip, num_clips=num_clips)
    raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {STRATEGIES}")
