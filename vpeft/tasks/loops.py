"""Task-specific training loops for video-text recognition and retrieval.

Small, explicit loops over ``(video, target)`` batches: AdamW, linear warm-up then
cosine decay, gradient clipping. They take ``batches(epoch)``, a function returning an
iterable of batches (a list, or a DataLoader: anything with ``len``; other iterables are
read into a list first), so they run on in-memory tensors (tests, smoke runs) as well
as on video files.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .consistency import ConsistencyLoss
from .retrieval import RetrievalModel
from .videotext import VideoTextClassifier

__all__ = ["tensor_batches", "cosine_lr", "train_video_text", "train_retrieval"]


def tensor_batches(n: int, batch_size: int, seed: int, epoch: int) -> List[torch.Tensor]:
    """Shuffled index batches of ``range(n)``, reproducible from ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    perm = torch.randperm(n, generator=g)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, final: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to ``final``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * min(1.0, t)))


def _epoch(batches, epoch):
    it = batches(epoch)
    if not hasattr(it, "__len__"):
        it = list(it)
    return it, len(it)


def _optimizer(params, lr, weight_decay, betas):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, clip_grad: float) -> float:
    """One optimizer step on ``loss`` with optional gradient-norm clipping; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_grad)
    opt.step()
    return loss.item()


def train_video_text(clf: VideoTextClassifier, batches: Callable[[int], Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                     *, classes: Sequence[int], epochs: int, lr: float = 1e-3, weight_decay: float = 0.001,
                     warmup: int = 0, final_lr: float = 1e-5, consistency: Optional[ConsistencyLoss] = None,
                     clip_grad: float = 1.0, betas: Tuple[float, float] = (0.9, 0.98),
                     log: Optional[Callable[[Dict], None]] = None) -> List[float]:
    """Train prompt-based recognition over ``classes`` (global class indices).

    ``batches(epoch)`` yields ``(video, label)`` with global labels, all in ``classes``
    (a label outside them is an error: for base-to-novel this is the guard that no
    novel class is trained on). Loss: cross-entropy of the logits over ``classes``
    (+ ``consistency`` when given). Returns the loss of every step.
    """
    classes = [int(c) for c in classes]
    pos = {c: i for i, c in enumerate(classes)}
    rows = None
    if consistency is not None:
        cpos = {c: i for i, c in enumerate(consistency.classes)}
        missing = [c for c in classes if c not in cpos]
        if missing:
            raise ValueError(f"the consistency loss has no descriptions for classes {missing[:8]}")
        rows = [cpos[c] for c in classes]
    opt = _optimizer(clf.parameters(), lr, weight_decay, tuple(betas))
    steps_per_epoch = None
    losses: List[float] = []
    step = 0
    clf.train()
    for epoch in range(epochs):
        batch_list, n = _epoch(batches, epoch)
        steps_per_epoch = steps_per_epoch or n
        total = steps_per_epoch * epochs
        for video, label in batch_list:
            bad = sorted({int(l) for l in label} - set(pos))
            if bad:
                raise ValueError(f"training batch has labels {bad} outside the trained classes")
            target = torch.tensor([pos[int(l)] for l in label])
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, lr, warmup, final_lr)
            w = clf.class_embeddings(classes)
            logits = clf.logits(clf.video_embeddings(video), w)
            loss = F.cross_entropy(logits.float(), target.to(logits.device))
            ce = loss.item()
            if consistency is not None:
                loss = loss + consistency(w, rows)
            losses.append(_step(opt, loss, clip_grad))
            if log is not None:
                log({"epoch": epoch, "step": step, "loss": losses[-1], "ce": ce, "lr": opt.param_groups[0]["lr"]})
            step += 1
    clf.eval()
    return losses


def train_retrieval(model: RetrievalModel, batches: Callable[[int], Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                    *, epochs: int, lr: float = 1e-4, text_lr: float = 1e-7, weight_decay: float = 0.2,
                    warmup: int = 0, clip_grad: float = 1.0, betas: Tuple[float, float] = (0.9, 0.98),
                    log: Optional[Callable[[Dict], None]] = None) -> List[float]:
    """Train Side4Video retrieval on ``batches(epoch)`` of ``(video, caption token ids)`` pairs.

    AdamW, betas (0.9, 0.98) by default as in the paper; ``text_lr`` is used for the text
    tower when the model fine-tunes it. Returns the loss of every step.
    """
    new = list(model.video_model.side.parameters()) + list(model.head.parameters()) + \
        list(model.matching.parameters())
    ids = {id(p) for p in new}
    groups = [{"params": new, "lr": lr, "base_lr": lr}]
    text = [p for p in model.trainable_parameters() if id(p) not in ids]
    if text:
        groups.append({"params": text, "lr": text_lr, "base_lr": text_lr})
    opt = torch.optim.AdamW(groups, betas=tuple(betas), weight_decay=weight_decay)
    losses: List[float] = []
    step = 0
    model.train()
    steps_per_epoch = None
    for epoch in range(epochs):
        batch_list, n = _epoch(batches, epoch)
        steps_per_epoch = steps_per_epoch or n
        total = steps_per_epoch * epochs
        for video, tokens in batch_list:
            if len(video) < 2:
                continue  # a contrastive batch needs negatives
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, g["base_lr"], warmup)
            losses.append(_step(opt, model(tokens, video), clip_grad))
            if log is not None:
                log({"epoch": epoch, "step": step, "loss": losses[-1], "lr": opt.param_groups[0]["lr"]})
            step += 1
    model.eval()
    return losses
