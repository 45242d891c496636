"""Video-text recognition: classes as text prompts, and MSTA's evaluation protocols.

A class ``c`` is the text prompt ``"a video of {name_c}"``; a video's logit for ``c``
is ``logit_scale * cos(video embedding, prompt embedding)`` with the backbone's own
(frozen) logit scale, and training minimises the cross-entropy of those logits
against the label (the video-to-text contrastive loss over the class prompts).

Protocols (MSTA, following ViFi-CLIP / X-CLIP):

* zero-shot: evaluate on class subsets given by split files, one accuracy per split
  and their mean (the Kinetics-600 three-split protocol: each split is a set of class
  indices; only videos of those classes are scored, against only those classes);
* few-shot: ``K`` training videos per class (K = 2, 4, 8, 16) drawn with a seed;
* base-to-novel: train on the base classes only, evaluate base accuracy (base prompts
  only) and novel accuracy (novel prompts only) and report their harmonic mean.

Class-subset evaluation works on cached embeddings: :func:`encode_videos` runs the
video tower once; :func:`subset_accuracy` scores any subset of classes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import VideoModel

PROMPT_TEMPLATE = "a video of {}"

__all__ = ["PROMPT_TEMPLATE", "tokenize", "text_context_length", "VideoTextClassifier", "encode_videos",
           "subset_accuracy", "video_text_loss", "read_class_split", "zero_shot", "few_shot_indices", "BaseNovelSplit",
           "base_novel_split", "harmonic_mean", "base_to_novel_eval"]


def text_context_length(model: nn.Module) -> int:
    """The text context length of an open_clip CLIP (77) or a ViCLIP (32)."""
    ctx = getattr(model, "context_length", None)
    if not isinstance(ctx, int):
        raise ValueError(f"{type(model).__name__} has no integer context_length; is it a CLIP-style model?")
    return ctx


def tokenize(model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """CLIP BPE token ids ``(len(texts), context_length)`` for ``model``'s text tower."""
    import open_clip
    ctx = text_context_length(model)
    vocab = getattr(model, "vocab_size", None) or getattr(getattr(model, "token_embedding", None),
                                                             "num_embeddings", None)
    if vocab is not None and vocab < 49408:
        raise ValueError(f"the text tower has a vocabulary of {vocab} tokens, smaller than the CLIP BPE "
                         "vocabulary (49408): text prompts cannot be tokenized for it")
    return open_clip.tokenize(list(texts), context_length=ctx)


class VideoTextClassifier(nn.Module):
    """Recognition by matching videos against class prompts.

    Args:
        video_model: a :class:`vpeft.VideoModel` built without a classifier
            (``num_classes=None``) on a model with a text tower (open_clip CLIP or
            ViCLIP), with any method whose video embedding is in the joint space
            (``msta``, ``st_adapter``, ``linear_probe``, ``full_finetune``).
        classnames: the class names, in label order.
        template: the prompt, with ``{}`` for the class name.

    ``forward(video, classes)`` returns ``(B, len(classes))`` logits over the chosen
    classes (all classes when None). The prompts go through the (possibly adapted)
    text tower at every call, since MSTA trains its text adapters.
    """

    def __init__(self, video_model: VideoModel, classnames: Sequence[str], template: str = PROMPT_TEMPLATE):
        super().__init__()
        if not isinstance(video_model, VideoModel):
            raise ValueError("video_model must be a vpeft.VideoModel (from vpeft.adapt)")
        if video_model.num_classes is not None:
            raise ValueError("build the VideoModel with num_classes=None: classes are text prompts here")
        if not video_model.spec.joint_space:
            raise ValueError(f"{video_model.method}'s pooled feature is not in the joint video-text space; use the "
                             "retrieval task (vpeft.tasks.retrieval) for a side network with text")
        if video_model.text_tower is None or not hasattr(video_model.backbone, "encode_text"):
            raise ValueError("video-text recognition needs a backbone with a text tower")
        if "{}" not in template:
            raise ValueError(f"template {template!r} must contain '{{}}' for the class name")
        self.video_model = video_model
        self.classnames = list(classnames)
        self.template = template
        self.register_buffer("prompt_tokens", tokenize(video_model.backbone, self.prompts()), persistent=False)

    def prompts(self) -> List[str]:
        return [self.template.format(c) for c in self.classnames]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.video_model.backbone.logit_scale.exp().detach()

    def class_embeddings(self, classes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """L2-normalised prompt embeddings ``(C, E)`` (a subset of classes if given)."""
        tok = self.prompt_tokens if classes is None else self.prompt_tokens[torch.as_tensor(list(classes))]
        return F.normalize(self.video_model.encode_text(tok), dim=-1)

    def video_embeddings(self, video: torch.Tensor) -> torch.Tensor:
        """L2-normalised video embeddings ``(B, E)``."""
        return F.normalize(self.video_model.encode_video(video), dim=-1)

    def logits(self, video_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * video_emb @ class_emb.t().to(video_emb.dtype)

    def forward(self, video: torch.Tensor, classes: Optional[Sequence[int]] = None) -> torch.Tensor:
        return self.logits(self.video_embeddings(video), self.class_embeddings(classes))


def video_text_loss(clf: VideoTextClassifier, video: torch.Tensor, label: torch.Tensor, classes: Sequence[int],
                    consistency: Optional[nn.Module] = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """The training loss of prompt-based recognition over ``classes`` (global class indices).

    Cross-entropy of the logits over ``classes`` against each video's position in them
    (the video-to-text contrastive loss over the class prompts), plus ``consistency(w)``
    (MSTA's description consistency, built for the same classes) when given. A label
    outside ``classes`` is an error: for base-to-novel this is the guard that no novel
    class is trained on.
    """
    classes = [int(c) for c in classes]
    pos = {c: i for i, c in enumerate(classes)}
    bad = sorted({int(x) for x in label} - set(pos))
    if bad:
        raise ValueError(f"training batch has labels {bad} outside the trained classes")
    w = clf.class_embeddings(classes)
    logits = clf.logits(clf.video_embeddings(video), w)
    target = torch.tensor([pos[int(x)] for x in label], device=logits.device)
    loss = F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    if consistency is not None:
        loss = loss + consistency(w.float())
    return loss


@torch.no_grad()
def encode_videos(clf: VideoTextClassifier, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Embed every video once: ``(M, E)`` normalised embeddings and ``(M,)`` labels.

    ``batches`` yields ``(video, label)`` with ``video`` ``(B, T, 3, H, W)`` or, for
    multi-view testing, ``(B, V, T, 3, H, W)`` (view embeddings averaged).
    """
    was = clf.training
    clf.eval()
    feats, labels = [], []
    try:
        for video, label in batches:
            if video.dim() == 6:
                b, v = video.shape[:2]
                e = clf.video_embeddings(video.flatten(0, 1)).reshape(b, v, -1).mean(1)
                e = F.normalize(e, dim=-1)
            else:
                e = clf.video_embeddings(video)
            feats.append(e.float().cpu())
            labels.append(torch.as_tensor(label).reshape(-1).cpu())
    finally:
        clf.train(was)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def subset_accuracy(clf: VideoTextClassifier, feats: torch.Tensor, labels: torch.Tensor,
                    classes: Sequence[int], topk: Tuple[int, ...] = (1,)) -> Dict[str, float]:
    """Top-k accuracy (in %) of the videos whose label is in ``classes``, scored against those classes only."""
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes is empty")
    was = clf.training
    clf.eval()
    try:
        class_emb = clf.class_embeddings(classes).float().cpu()
    finally:
        clf.train(was)
    pos = {c: i for i, c in enumerate(classes)}
    keep = torch.tensor([int(l) in pos for l in labels], dtype=torch.bool)
    if not keep.any():
        raise ValueError(f"no video has a label in the {len(classes)} evaluated classes")
    target = torch.tensor([pos[int(l)] for l in labels[keep]])
    logits = feats[keep] @ class_emb.t()
    out = {"videos": int(keep.sum())}
    for k in topk:
        k_eff = min(k, len(classes))
        hit = (logits.topk(k_eff, dim=1).indices == target[:, None]).any(1).float().mean().item()
        out[f"top{k}"] = 100.0 * hit
    return out


# ---------------------------------------------------------------------- zero-shot
def read_class_split(path: str, num_classes: Optional[int] = None) -> List[int]:
    """Class indices of one evaluation split: a JSON list of ints, or one int per line
    (blank lines and ``#`` comments skipped). Duplicates and out-of-range indices are errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class split file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        items = [(i + 1, v) for i, v in enumerate(values)]
    else:
        items = [(n, ln.split("#")[0].strip()) for n, ln in enumerate(text.splitlines(), start=1)]
        items = [(n, v) for n, v in items if v]
    out: List[int] = []
    for where, v in items:
        try:
            c = int(v)
            if isinstance(v, float) or isinstance(v, bool):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{path}: entry {where}: {v!r} is not a class index") from None
        if c < 0 or (num_classes is not None and c >= num_classes):
            raise ValueError(f"{path}: entry {where}: class index {c} outside [0, {num_classes})")
        if c in out:
            raise ValueError(f"{path}: entry {where}: class index {c} appears twice")
        out.append(c)
    if not out:
        raise ValueError(f"{path}: the split lists no classes")
    return out


def zero_shot(clf: VideoTextClassifier, feats: torch.Tensor, labels: torch.Tensor,
              splits: Sequence[Sequence[int]]) -> Dict[str, object]:
    """Accuracy on each class split and the mean and standard deviation over splits."""
    if not splits:
        raise ValueError("zero_shot needs at least one class split")
    per = [subset_accuracy(clf, feats, labels, s, topk=(1, 5)) for s in splits]
    top1 = [p["top1"] for p in per]
    mean = sum(top1) / len(top1)
    std = math.sqrt(sum((a - mean) ** 2 for a in top1) / len(top1))
    return {"splits": per, "top1_mean": mean, "top1_std": std,
            "top5_mean": sum(p["top5"] for p in per) / len(per)}


# ---------------------------------------------------------------------- few-shot
def few_shot_indices(labels: Sequence[int], shots: int, seed: int,
                     classes: Optional[Sequence[int]] = None) -> List[int]:
    """Indices of ``shots`` samples per class, drawn without replacement with ``seed``.

    The draw depends only on (labels, shots, seed, classes): each class's candidates
    (in dataset order) are permuted by a generator seeded with ``seed`` and the class
    index, so adding or removing another class does not change this class's draw.
    Classes default to every label present. A class with fewer than ``shots`` samples
    is an error naming it. Returns sorted dataset indices.
    """
    if not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    labels = [int(l) for l in labels]
    by_class: Dict[int, List[int]] = {}
    for i, l in enumerate(labels):
        by_class.setdefault(l, []).append(i)
    wanted = sorted(by_class) if classes is None else [int(c) for c in classes]
    out: List[int] = []
    for c in wanted:
        cand = by_class.get(c, [])
        if len(cand) < shots:
            raise ValueError(f"class {c} has {len(cand)} training samples, fewer than shots={shots}")
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + c)
        perm = torch.randperm(len(cand), generator=g)[:shots].tolist()
        out.extend(cand[p] for p in perm)
    return sorted(out)


# ---------------------------------------------------------------------- base-to-novel
@dataclass(frozen=True)
class BaseNovelSplit:
    """Disjoint base (trained) and novel (never seen in training) class indices."""

    base: Tuple[int, ...]
    novel: Tuple[int, ...]

    def __post_init__(self):
        if not self.base or not self.novel:
            raise ValueError("base and novel class sets must both be non-empty")
        overlap = sorted(set(self.base) & set(self.novel))
        if overlap:
            raise ValueError(f"classes {overlap} are both base and novel")

    def train_indices(self, labels: Sequence[int], shots: Optional[int] = None, seed: int = 0) -> List[int]:
        """Training samples: base classes only (``shots`` per class when given, as in the
        K-shot base-to-novel protocol). Never returns a novel-class sample."""
        if shots is None:
            base = set(self.base)
            idx = [i for i, l in enumerate(labels) if int(l) in base]
        else:
            idx = few_shot_indices(labels, shots, seed, classes=self.base)
        novel = set(self.novel)
        assert not any(int(labels[i]) in novel for i in idx)  # bookkeeping invariant, cheap to keep
        return idx

    def to_base_label(self, label: int) -> int:
        """Position of a base class in :attr:`base` (the target index during training)."""
        return self.base.index(int(label))


def base_novel_split(num_classes: int, base: Optional[Sequence[int]] = None) -> BaseNovelSplit:
    """The base/novel split: given base classes, or by default the first half of the
    class indices (``ceil(C/2)``) as base and the rest as novel (ViFi-CLIP's protocol)."""
    if num_classes < 2:
        raise ValueError(f"base-to-novel needs at least 2 classes, got {num_classes}")
    if base is None:
        base = range((num_classes + 1) // 2)
    base = sorted(int(c) for c in base)
    bad = [c for c in base if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"base classes {bad} outside [0, {num_classes})")
    novel = [c for c in range(num_classes) if c not in set(base)]
    return BaseNovelSplit(tuple(base), tuple(novel))


def harmonic_mean(base_acc: float, novel_acc: float) -> float:
    """``2 b n / (b + n)``, 0 when both are 0."""
    if base_acc < 0 or novel_acc < 0:
        raise ValueError("accuracies must be non-negative")
    s = base_acc + novel_acc
    return 0.0 if s == 0 else 2.0 * base_acc * novel_acc / s


def base_to_novel_eval(clf: VideoTextClassifier, feats: torch.Tensor, labels: torch.Tensor,
                       split: BaseNovelSplit) -> Dict[str, float]:
    """Base accuracy (base prompts only), novel accuracy (novel prompts only), harmonic mean."""
    b = subset_accuracy(clf, feats, labels, split.base)["top1"]
    n = subset_accuracy(clf, feats, labels, split.novel)["top1"]
    return {"base": b, "novel": n, "hm": harmonic_mean(b, n)}
