"""MSTA's spatiotemporal description-guided consistency constraint.

For each class ``c``: ``w_c`` is the trainable text encoder (with MSTA's text adapters)
on the class prompt; ``D_s^c`` and ``D_t^c`` are the frozen text encoder (the same
tower with the adapters bypassed) on the class's spatial and temporal descriptions,
each averaged over the class's descriptions and L2-normalised.

    L_CC = mean_c [ 2 - cos(w_c, D_s^c) - cos(w_c, D_t^c) ]      L = L_CE + alpha * L_CC

The description embeddings are computed once, when the loss is built (so they come
from the pre-trained tower even if training later changes it), and kept as buffers.

Description files are JSON objects mapping a class index (a string, "0", "1", ...) to
a non-empty list of strings; one file holds the spatial and one the temporal
descriptions.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones.viclip import count_truncated
from ..methods.msta import MSTABlock
from ..model import VideoModel
from .videotext import text_context_length, tokenize

__all__ = ["load_descriptions", "check_descriptions", "frozen_text_tower", "ConsistencyLoss", "consistency_loss"]


def check_descriptions(raw: Mapping, classes: Sequence[int], source: str = "descriptions") -> Dict[int, List[str]]:
    """Validate a description mapping for ``classes``; errors name the class."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a JSON object mapping class index -> list of strings, "
                         f"got {type(raw).__name__}")
    out: Dict[int, List[str]] = {}
    for c in classes:
        key = str(int(c))
        if key not in raw:
            raise ValueError(f"{source}: class {c} has no descriptions (key {key!r} missing)")
        items = raw[key]
        if not isinstance(items, list) or not items:
            raise ValueError(f"{source}: class {c} must map to a non-empty list of strings, got {items!r}")
        for j, s in enumerate(items):
            if not isinstance(s, str) or not s.strip():
                raise ValueError(f"{source}: class {c}, description {j} is not a non-empty string: {s!r}")
        out[int(c)] = list(items)
    return out


def load_descriptions(path: str, classes: Sequence[int]) -> Dict[int, List[str]]:
    """Read and validate a description file (JSON: class index string -> list of strings)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"description file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
    return check_descriptions(raw, classes, path)


@contextlib.contextmanager
def frozen_text_tower(video_model: VideoModel) -> Iterator[None]:
    """Within the block, the text tower runs without MSTA's adapters (the pre-trained tower)."""
    text = video_model.text_tower
    swapped = []
    if text is not None:
        for i, blk in enumerate(text.blocks):
            if isinstance(blk, MSTABlock):
                swapped.append((i, blk))
                text.blocks[i] = blk.block
    try:
        yield
    finally:
        for i, blk in swapped:
            text.blocks[i] = blk


def consistency_loss(w: torch.Tensor, d_s: torch.Tensor, d_t: torch.Tensor) -> torch.Tensor:
    """``mean_c [2 - cos(w_c, d_s_c) - cos(w_c, d_t_c)]`` for ``(C, E)`` tensors."""
    return (2.0 - F.cosine_similarity(w, d_s, dim=-1) - F.cosine_similarity(w, d_t, dim=-1)).mean()


class ConsistencyLoss(nn.Module):
    """``alpha * L_CC`` with the frozen description embeddings cached at construction.

    Args:
        video_model: the adapted model (its text tower is run with adapters bypassed).
        spatial, temporal: ``{class: [descriptions]}`` (see :func:`load_descriptions`).
        classes: the class indices, in the order ``forward``'s ``w`` rows use (all classes
            of the task); ``forward(w, rows)`` can pick a subset by position.
        alpha: weight (1.0 in the released runs).
        batch_size: descriptions encoded per forward pass while building the cache.

    Descriptions longer than the text context are truncated (end token kept), with one
    warning that says how many.
    """

    def __init__(self, video_model: VideoModel, spatial: Mapping[int, Sequence[str]],
                 temporal: Mapping[int, Sequence[str]], classes: Sequence[int], alpha: float = 1.0,
                 batch_size: int = 64):
        super().__init__()
        self.alpha = float(alpha)
        self.classes = [int(c) for c in classes]
        spatial = check_descriptions({str(k): list(v) for k, v in spatial.items()}, self.classes, "spatial descriptions")
        temporal = check_descriptions({str(k): list(v) for k, v in temporal.items()}, self.classes,
                                      "temporal descriptions")
        backbone = video_model.backbone
        ctx = text_context_length(backbone)
        every = [s for d in (spatial, temporal) for c in self.classes for s in d[c]]
        n_long = count_truncated(every, ctx)
        if n_long:
            warnings.warn(f"{n_long} of {len(every)} class descriptions are longer than the text context "
                          f"({ctx} tokens) and were truncated", stacklevel=2)
        self.register_buffer("d_spatial", self._embed(video_model, spatial, batch_size), persistent=False)
        self.register_buffer("d_temporal", self._embed(video_model, temporal, batch_size), persistent=False)

    @torch.no_grad()
    def _embed(self, video_model: VideoModel, desc: Mapping[int, List[str]], batch_size: int) -> torch.Tensor:
        backbone = video_model.backbone
        texts = [s for c in self.classes for s in desc[c]]
        owner = [i for i, c in enumerate(self.classes) for _ in desc[c]]
        tok = tokenize(backbone, texts).to(next(backbone.parameters()).device)
        was = video_model.training
        video_model.eval()
        try:
            with frozen_text_tower(video_model):
                emb = torch.cat([backbone.encode_text(tok[i:i + batch_size]).float()
                                 for i in range(0, len(tok), batch_size)])
        finally:
            video_model.train(was)
        sums = torch.zeros(len(self.classes), emb.shape[-1], dtype=emb.dtype, device=emb.device)
        sums.index_add_(0, torch.tensor(owner, device=emb.device), emb)
        counts = torch.tensor([len(desc[c]) for c in self.classes], dtype=emb.dtype, device=emb.device)
        return F.normalize(sums / counts[:, None], dim=-1)

    def forward(self, w: torch.Tensor, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """``alpha * L_CC`` for class prompt embeddings ``w`` ``(C', E)``; ``rows`` are the
        positions in :attr:`classes` of ``w``'s rows (all classes when None)."""
        d_s, d_t = self.d_spatial, self.d_temporal
        if rows is not None:
            idx = torch.as_tensor(list(rows), device=d_s.device)
            d_s, d_t = d_s[idx], d_t[idx]
        if w.shape != d_s.shape:
            raise ValueError(f"w has shape {tuple(w.shape)}, expected {tuple(d_s.shape)} (one row per class)")
        return self.alpha * consistency_loss(w.float(), d_s, d_t)
