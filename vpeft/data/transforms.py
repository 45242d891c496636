"""Clip augmentations. One random draw per clip: every frame gets the same crop, flip
and colour change, so motion is left intact.

Input clips are ``uint8`` arrays ``(T, H, W, 3)``; outputs are float tensors
``(T, 3, S, S)`` normalised with the backbone's own mean and std. All randomness comes
from the ``numpy.random.Generator`` passed in, so a clip's augmentation depends only
on how that generator was seeded (see :class:`~vpeft.data.dataset.VideoDataset`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def _to_float(frames: np.ndarray) -> torch.Tensor:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a clip must be (T, H, W, 3), got shape {frames.shape}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


from ..engine.config import INTERPOLATIONS  # noqa: E402,F401 - the schema declares the choices (one place)


def _resize(x: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """Antialiased resize of ``(T, 3, H, W)`` in ``[0, 1]``; bicubic overshoot is clipped."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {mode!r} (data.resize); expected one of {INTERPOLATIONS}")
    out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    return out.clamp_(0, 1) if mode == "bicubic" else out


def backbone_interpolation(visual) -> str:
    """The resize filter of a backbone's own image preprocessing: the ``interpolation`` of
    open_clip's ``preprocess_cfg`` on the vision tower, else open_clip's default, bicubic."""
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mode = str(cfg.get("interpolation") or "bicubic")
    return mode if mode in INTERPOLATIONS else "bicubic"


def resolve_interpolation(choice: str, visual) -> str:
    """``data.resize``: ``auto`` (the backbone's own, see :func:`backbone_interpolation`),
    ``bicubic`` or ``bilinear`` (both antialiased)."""
    if choice == "auto" and visual is not None:
        return backbone_interpolation(visual)
    if choice not in INTERPOLATIONS:
        raise ValueError(f"data.resize={choice!r}; expected 'auto' or one of {INTERPOLATIONS}")
    return choice


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


@dataclass
class TrainTransform:
    """Training augmentation: random resized crop, flip, colour jitter, grayscale, normalise.

    Args:
        size: output side ``S`` (the backbone's image size).
        mean, std: the backbone's normalisation (``VideoModel.tower.mean/std``).
        scale: area fraction range of the random crop.
        ratio: aspect-ratio range of the random crop.
        flip: probability of a horizontal flip.
        flip_label_map: ``{label: label_after_flip}`` for classes whose meaning a flip
            changes (SSv2's "left to right" / "right to left"); the map is applied as
            given, so list both directions.
        color_jitter: strength ``s`` of brightness, contrast and saturation jitter
            (factors uniform in ``[1 - s, 1 + s]``), applied with probability ``color_jitter_p``.
        grayscale: probability of converting the clip to grayscale.
        interpolation: ``bicubic`` (open_clip's preprocessing) or ``bilinear``, both antialiased.
    """

    size: int
    mean: Sequence[float]
    std: Sequence[float]
    scale: Tuple[float, float] = (0.25, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    flip_label_map: Dict[int, int] = field(default_factory=dict)
    color_jitter: float = 0.0
    color_jitter_p: float = 0.8
    grayscale: float = 0.0
    interpolation: str = "bicubic"

    def __post_init__(self):
        resolve_interpolation(self.interpolation, None)

    def crop_box(self, h: int, w: int, rng: np.random.Generator) -> Tuple[int, int, int, int]:
        """``(top, left, height, width)`` of a random resized crop (torchvision's rule)."""
        area = h * w
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(lo, hi))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        s = min(h, w)  # fall back to a centre square
        return (h - s) // 2, (w - s) // 2, s, s

    def __call__(self, frames: np.ndarray, label: int, rng: np.random.Generator) -> Tuple[torch.Tensor, int]:
        """Augment one clip; returns ``((T, 3, S, S) tensor, label after any flip)``."""
        x = _to_float(frames)
        t, l, ch, cw = self.crop_box(x.shape[-2], x.shape[-1], rng)
        x = _resize(x[..., t:t + ch, l:l + cw], (self.size, self.size), self.interpolation)
        if rng.random() < self.flip:
            x = x.flip(-1)
            label = int(self.flip_label_map.get(label, label))
        if self.color_jitter > 0 and rng.random() < self.color_jitter_p:
            s = self.color_jitter
            b, c, sat = (rng.uniform(max(0.0, 1 - s), 1 + s) for _ in range(3))
            x = x * b
            m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * c + m
            g = _gray(x)
            x = (x - g) * sat + g
            x = x.clamp_(0, 1)
        if self.grayscale > 0 and rng.random() < self.grayscale:
            x = _gray(x).expand(-1, 3, -1, -1).contiguous()
        return normalize(x, self.mean, self.std), label


@dataclass
class TestTransform:
    """Test-time views: resize the short side to ``resize``, then ``num_crops`` crops of ``size``.

    ``num_crops`` 1 is the centre crop; 3 takes the two ends and the centre along the
    long side (the usual "3 crops" protocol). ``interpolation`` as in :class:`TrainTransform`.
    """

    __test__ = False  # not a pytest test class

    size: int
    mean: Sequence[float]
    std: Sequence[float]
    resize: Optional[int] = None
    num_crops: int = 1
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.num_crops not in (1, 3):
            raise ValueError(f"test crops must be 1 or 3, got {self.num_crops}")
        resolve_interpolation(self.interpolation, None)

    def __call__(self, frames: np.ndarray) -> List[torch.Tensor]:
        """All spatial views of one clip, each ``(T, 3, S, S)``."""
        x = _to_float(frames)
        h, w = x.shape[-2:]
        short = self.resize or self.size
        if min(h, w) != short:
            nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
            x = _resize(x, (nh, nw), self.interpolation)
            h, w = nh, nw
        s = self.size
        if self.num_crops == 1:
            offsets = [((h - s) // 2, (w - s) // 2)]
        elif w >= h:
            offsets = [((h - s) // 2, o) for o in (0, (w - s) // 2, w - s)]
        else:
            offsets = [(o, (w - s) // 2) for o in (0, (h - s) // 2, h - s)]
        return [normalize(x[..., a:a + s, b:b + s], self.mean, self.std) for a, b in offsets]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel on ``(T, 3, H, W)`` in ``[0, 1]``."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd
