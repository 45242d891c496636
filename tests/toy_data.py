"""Small in-memory captioned videos for tests and CPU smoke runs (no files, no downloads).

Each clip shows one coloured square on a dark noisy background moving steadily in one
of four directions. Its attributes are the colour (4), the direction (4) and the size
(2); the caption names all three, e.g. ``"a small red square moving left"``, and the
recognition class is (colour, direction) with the name ``"red square moving left"``.
Position and noise are random per clip, so many clips share an attribute combination.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

COLOURS = {"red": (1.0, -0.6, -0.6), "green": (-0.6, 1.0, -0.6), "blue": (-0.6, -0.6, 1.0),
           "yellow": (1.0, 1.0, -0.6)}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SIZES = {"small": 0.2, "large": 0.35}


@dataclass
class ToyVideos:
    videos: torch.Tensor          # (M, T, 3, S, S), roughly zero-mean
    labels: torch.Tensor          # (M,) class = colour * 4 + direction
    combos: torch.Tensor          # (M,) attribute combination = label * 2 + size
    captions: List[str]

    @staticmethod
    def class_names() -> List[str]:
        return [f"{c} square moving {d}" for c in COLOURS for d in DIRECTIONS]

    @staticmethod
    def combo_caption(combo: int) -> str:
        label, size = divmod(int(combo), 2)
        colour, direction = divmod(label, 4)
        return f"a {list(SIZES)[size]} {list(COLOURS)[colour]} square moving {list(DIRECTIONS)[direction]}"

    def subset(self, idx: Sequence[int]) -> "ToyVideos":
        idx_t = torch.as_tensor(list(idx), dtype=torch.long)
        return ToyVideos(self.videos[idx_t], self.labels[idx_t], self.combos[idx_t], [self.captions[i] for i in idx])


def make_toy_videos(combos: Sequence[int], num_frames: int = 4, size: int = 32, seed: int = 0,
                    noise: float = 0.1) -> ToyVideos:
    """One clip per entry of ``combos`` (each in ``[0, 32)``)."""
    g = torch.Generator().manual_seed(seed)
    m = len(combos)
    videos = noise * torch.randn(m, num_frames, 3, size, size, generator=g) - 0.5
    labels = []
    for i, combo in enumerate(combos):
        label, s = divmod(int(combo), 2)
        colour, direction = divmod(label, 4)
        side = max(2, int(round(list(SIZES.values())[s] * size)))
        dy, dx = list(DIRECTIONS.values())[direction]
        step = max(1, (size - side) // (2 * max(1, num_frames - 1)))
        travel = step * (num_frames - 1)
        lo_y, hi_y = (travel if dy < 0 else 0), size - side - (travel if dy > 0 else 0)
        lo_x, hi_x = (travel if dx < 0 else 0), size - side - (travel if dx > 0 else 0)
        y0 = int(torch.randint(lo_y, hi_y + 1, (1,), generator=g))
        x0 = int(torch.randint(lo_x, hi_x + 1, (1,), generator=g))
        rgb = torch.tensor(list(COLOURS.values())[colour]).view(3, 1, 1)
        for t in range(num_frames):
            y, x = y0 + dy * step * t, x0 + dx * step * t
            videos[i, t, :, y:y + side, x:x + side] = rgb
        labels.append(label)
    combos_t = torch.as_tensor([int(c) for c in combos])
    return ToyVideos(videos, torch.tensor(labels), combos_t, [ToyVideos.combo_caption(c) for c in combos])


def toy_split(per_combo_train: int, num_frames: int = 4, size: int = 32, seed: int = 0,
              combos: Optional[Sequence[int]] = None) -> Tuple[ToyVideos, ToyVideos]:
    """A training set with ``per_combo_train`` clips per combination and a held-out set with
    one clip per combination (different seed), over ``combos`` (default all 32)."""
    combos = list(range(32)) if combos is None else list(combos)
    train = make_toy_videos([c for c in combos for _ in range(per_combo_train)], num_frames, size, seed)
    test = make_toy_videos(combos, num_frames, size, seed + 10_000)
    return train, test


def tensor_batches(n: int, batch_size: int, seed: int, epoch: int):
    """Shuffled index batches of ``range(n)``, reproducible from ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    perm = torch.randperm(n, generator=g)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def fit(module, params, batches, loss_fn, *, epochs: int, lr: float, weight_decay: float = 0.0,
        clip_grad: float = 1.0):
    """A few AdamW steps on in-memory tensors for the tests (the library's loop is the engine's
    Trainer, which reads video files): ``loss_fn(batch)`` for each batch of ``batches(epoch)``."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=(0.9, 0.98),
                            weight_decay=weight_decay)
    module.train()
    losses = []
    for epoch in range(epochs):
        for batch in batches(epoch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_grad)
            opt.step()
            losses.append(loss.item())
    module.eval()
    return losses
