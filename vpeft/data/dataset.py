"""A video classification dataset over real files listed in a list file."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .lists import Sample
from .sampling import STRATEGIES, sample_indices
from .transforms import TestTransform, TrainTransform
from .video import DEFAULT_FRAME_TEMPLATE, VideoDecodeError, read_frames, resolve_decoder

log = logging.getLogger("vpeft.data")


class VideoDataset(Dataset):
    """Clips of ``num_frames`` frames from the videos of a list file.

    Args:
        root: directory the list's paths are relative to (must exist).
        samples: entries from :func:`~vpeft.data.lists.read_list`.
        num_frames: frames per clip ``T``.
        transform: a :class:`TrainTransform` (training) or :class:`TestTransform` (testing).
        sampling: ``"segment"`` or ``"dense"`` (see :mod:`vpeft.data.sampling`).
        stride: frame stride for dense sampling.
        num_clips: temporal views per video at test time.
        seed: base seed. A clip's frame choice and augmentation are drawn from a
            generator seeded with ``(seed, epoch, index, attempt)``, so they do not depend
            on worker processes, world size, or where a run was resumed.
        max_replacements: how many other videos to try when a video fails.
        on_unreadable: what a video that cannot be decoded becomes: ``"replace"`` (another
            sample, up to ``max_replacements`` tries; training), ``"skip"`` (an item whose
            ``video`` is None, which :func:`collate` leaves out of the batch while keeping
            its path in ``failed``; evaluation over exactly the readable set) or
            ``"raise"`` (a :class:`VideoDecodeError` naming the file; ``--strict-data``).
        decoder: ``data.decoder``: ``auto``, ``decord``, ``torchcodec`` or ``pyav`` (see
            :mod:`vpeft.data.video`); resolved (and announced) once, here.
        frame_template, frame_start_index: file names inside frame-folder samples.
        min_frames: a video with fewer frames is unreadable ("too short").

    Whether a sample is readable is decided in one place, :meth:`try_load`: a missing,
    empty, corrupt, truncated or too-short video gives ``(None, reason)`` there.
    ``__getitem__`` then applies ``on_unreadable``.

    Items are dicts: ``video`` ``(T, 3, S, S)`` when training, ``(V, T, 3, S, S)`` with
    ``V = num_clips * crops`` when testing; ``label``; ``index``; ``failed``: the paths
    that failed and were replaced on the way to this item (usually empty). A sampler may
    pass ``(index, epoch)`` keys; a plain int means epoch 0.
    """

    def __init__(self, root: str, samples: Sequence[Sample], num_frames: int,
                 transform: Union[TrainTransform, TestTransform], *, sampling: str = "segment", stride: int = 1,
                 num_clips: int = 1, seed: int = 0, max_replacements: int = 20, on_unreadable: str = "replace",
                 decoder: str = "auto", frame_template: str = DEFAULT_FRAME_TEMPLATE, frame_start_index: int = 1,
                 min_frames: int = 1):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"video directory {root!r} does not exist (data.root)")
        if not samples:
            raise ValueError("a VideoDataset needs at least one sample")
        if sampling not in STRATEGIES:
            raise ValueError(f"unknown sampling strategy {sampling!r}; expected one of {STRATEGIES}")
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        if on_unreadable not in ("replace", "skip", "raise"):
            raise ValueError(f"on_unreadable={on_unreadable!r}; expected 'replace', 'skip' or 'raise'")
        self.on_unreadable = on_unreadable
        self.root = root
        self.samples = list(samples)
        self.num_frames = int(num_frames)
        self.transform = transform
        self.train = isinstance(transform, TrainTransform)
        self.sampling = sampling
        self.stride = int(stride)
        self.num_clips = 1 if self.train else int(num_clips)
        self.seed = int(seed)
        self.max_replacements = int(max_replacements)
        if min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {min_frames}")
        self.decoder = resolve_decoder(decoder)     # the backend order; workers inherit it
        self.read_options = dict(frame_template=frame_template, frame_start_index=int(frame_start_index),
                                 min_frames=int(min_frames))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> List[int]:
        return [s.label for s in self.samples]

    def _load(self, index: int, rng: np.random.Generator) -> Tuple[torch.Tensor, int]:
        s = self.samples[index]
        path = os.path.join(self.root, s.path)
        opts = dict(decoder=self.decoder, start=s.start, end=s.end, **self.read_options)
        if self.train:
            frames = read_frames(path, lambda n: sample_indices(
                self.sampling, n, self.num_frames, train=True, stride=self.stride, rng=rng), **opts)
            return self.transform(frames, s.label, rng)
        per_clip: List[List[int]] = []

        def choose(n):
            per_clip.extend(sample_indices(self.sampling, n, self.num_frames, train=False, stride=self.stride,
                                           clip=k, num_clips=self.num_clips) for k in range(self.num_clips))
            return sorted({i for c in per_clip for i in c})

        frames = read_frames(path, choose, **opts)
        where = {f: j for j, f in enumerate(sorted({i for c in per_clip for i in c}))}
        views = []
        for clip in per_clip:
            views.extend(self.transform(frames[[where[i] for i in clip]]))
        return torch.stack(views), s.label

    def try_load(self, index: int, rng: np.random.Generator) -> Tuple[Optional[Tuple[torch.Tensor, int]], Optional[str]]:
        """``((video, label), None)`` for a readable sample, ``(None, reason)`` for an
        unreadable one. The one place that decides a sample is unreadable."""
        try:
            return self._load(index, rng), None
        except VideoDecodeError as e:
            return None, str(e)

    def __getitem__(self, key) -> Dict[str, Any]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        failed: List[str] = []
        current = index
        for attempt in range(self.max_replacements + 1):
            rng = np.random.default_rng([self.seed, epoch, index, attempt])
            loaded, why = self.try_load(current, rng)
            if loaded is not None:
                return {"video": loaded[0], "label": loaded[1], "index": current, "failed": failed}
            path = self.samples[current].path
            if self.on_unreadable == "raise":
                raise VideoDecodeError(f"unreadable video {path!r} under {self.root!r} ({why}); without "
                                       "--strict-data (data.strict=false) evaluation excludes it and reports it")
            if self.on_unreadable == "skip":
                log.warning("excluding unreadable video %s (%s)", path, why)
                return {"video": None, "label": self.samples[current].label, "index": current, "failed": [path]}
            log.warning("skipping video %d (%s); replacing it with another sample", current, why)
            failed.append(path)
            current = int(rng.integers(len(self.samples)))
        raise RuntimeError(f"{len(failed)} videos in a row could not be decoded, starting at "
                           f"{self.samples[index].path!r} under {self.root!r}: {failed[:5]}; "
                           "check data.root and the list file")


def collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack a list of :class:`VideoDataset` items into a batch (``failed`` is concatenated).

    Items without a video (excluded unreadable videos, ``on_unreadable="skip"``) are left
    out; when none has one, ``video`` is None.
    """
    kept = [it for it in items if it["video"] is not None]
    return {
        "video": torch.stack([it["video"] for it in kept]) if kept else None,
        "label": torch.tensor([it["label"] for it in kept], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in kept], dtype=torch.long),
        "failed": [p for it in items for p in it["failed"]],
    }


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, epoch)`` keys: a seeded shuffle per epoch, split across ranks.

    Rank ``r`` of ``world`` takes every ``world``-th key of the epoch's order starting at
    ``r``, so a global batch of ``B`` made of ``world`` per-rank batches of ``B / world``
    holds exactly the samples a single process would put in its batch of ``B``.
    ``start`` skips the first keys of the epoch (this rank's count), for resuming
    mid-epoch. With ``drop_last`` (training) the order is cut to a multiple of
    ``world * per_rank_multiple``; without it (evaluation) ranks get uneven shares and
    nothing is duplicated.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1,
                 drop_last: bool = False, per_rank_multiple: int = 1):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world = rank, world
        self.drop_last, self.multiple = drop_last, per_rank_multiple
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        self.epoch, self.start = epoch, start

    def _order(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch, 7919]).permutation(self.size)
        return np.arange(self.size)

    def __len__(self) -> int:
        if self.drop_last:
            per = self.size // (self.world * self.multiple) * self.multiple
        else:
            per = len(range(self.rank, self.size, self.world))
        return max(per - self.start, 0)

    def __iter__(self):
        order = self._order()
        if self.drop_last:
            keep = self.size // (self.world * self.multiple) * (self.world * self.multiple)
            order = order[:keep]
        mine = order[self.rank::self.world][self.start:]
        return iter([(int(i), self.epoch) for i in mine])
