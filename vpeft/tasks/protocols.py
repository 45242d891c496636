"""The video-language tasks as tasks of the one engine (``vpeft train/eval --task ...``).

Tasks (``task.name``):

* ``zero_shot``: ``train`` fits the adapters on ``data.train_list`` (all its classes as
  prompts); evaluation scores ``data.val_list`` on each class split of ``task.splits``
  (files of class indices of ``task.eval_class_names``, default ``data.class_names``)
  and reports the mean over splits. No split files: one split with every class.
* ``few_shot``: ``task.shots`` videos per class drawn from ``data.train_list`` with
  ``task.seed``; evaluation on ``data.val_list`` over all classes.
* ``base_to_novel``: training on the base classes (``task.base_classes``: a file of class
  indices, default the first half) with ``task.shots`` per class (null: all their
  videos); evaluation reports base, novel and harmonic mean.
* ``retrieval``: text-video retrieval with a side network (Side4Video); the lists are
  ``video<TAB>caption`` files; evaluation reports text-to-video and video-to-text
  R@1/5/10, MdR, MnR. Under DDP the contrastive loss is over the global batch (every
  rank's embeddings are gathered), so its negatives are those of one process.

MSTA's consistency loss is on when ``task.spatial_descriptions`` and
``task.temporal_descriptions`` are set (weight ``task.alpha``).

Training, checkpoints, resume, DDP, precision and logging are the engine's
(:class:`vpeft.engine.Trainer`); :func:`build_task` gives the task to pass it.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data import read_class_names, read_list
from ..data.lists import Sample
from ..engine.build import build_loader, build_video_model, dataset_from_samples, method_spec, resolve_classes
from ..engine.config import ConfigError
from ..engine.distributed import DistInfo, all_gather_objects
from ..engine.task import RecognitionTask, Task, eval_batch_size
from .consistency import ConsistencyLoss, load_descriptions
from .retrieval import RetrievalModel, contrastive_loss, read_caption_list, retrieval_metrics
from .videotext import (VideoTextClassifier, base_novel_split, base_to_novel_eval, few_shot_indices,
                        read_class_split, subset_accuracy, video_text_loss, zero_shot)

log = logging.getLogger("vpeft")

__all__ = ["VideoTextTask", "RetrievalTask", "build_task", "gather_with_grad"]


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' ``x`` concatenated along dim 0; the backward sums the gradient over ranks
    and returns this rank's slice (works on gloo: only all_gather and all_reduce)."""

    @staticmethod
    def forward(ctx, x):
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long))
        if len({int(s) for s in sizes}) != 1:
            raise ValueError(f"ranks hold different batch sizes {[int(s) for s in sizes]}")
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's ``x`` (rank order) with gradients flowing back to each rank's own part.

    With DDP averaging the parameter gradients, a loss over the gathered batch then has
    the gradient a single process computing it over the whole batch would have.
    """
    return _GatherWithGrad.apply(x) if info.enabled else x


def _gather_by_index(index: torch.Tensor, rows: Sequence[torch.Tensor], info: DistInfo) -> List[torch.Tensor]:
    """Per-rank evaluation outputs put back into dataset order (ranks evaluate disjoint shares)."""
    parts = all_gather_objects((index.cpu(), [r.cpu() for r in rows]), info)
    idx = torch.cat([p[0] for p in parts])
    order = idx.argsort()
    return [torch.cat([p[1][j] for p in parts])[order] for j in range(len(rows))]


def _eval_dataset(cfg: Dict[str, Any], samples: Sequence[Sample], video_model):
    """An evaluation dataset that never substitutes: an unreadable video is excluded (and reported),
    or with ``data.strict`` an error."""
    ds = dataset_from_samples(cfg, samples, video_model, train=False)
    ds.on_unreadable = "raise" if cfg["data"]["strict"] else "skip"
    return ds


def _skipped_report(skipped: List[str], info: DistInfo) -> Dict[str, Any]:
    names = sorted(p for part in all_gather_objects(list(skipped), info) for p in part)
    if names:
        log.warning("evaluation: %d unreadable video(s) excluded: %s", len(names), ", ".join(names[:8]))
    return {"videos_skipped": len(names), "videos_skipped_names": names}


def _check_files(cfg: Dict[str, Any], train: bool) -> None:
    import os

    d = cfg["data"]
    if not d["root"]:
        raise ConfigError("data.root is not set: the directory the list files' video paths are relative to")
    if not os.path.isdir(d["root"]):
        raise FileNotFoundError(f"video directory {d['root']!r} (data.root) does not exist")
    for key in (["train_list"] if train else []) + ["val_list"]:
        if not d[key]:
            raise ConfigError(f"data.{key} is not set")
        if not os.path.isfile(d[key]):
            raise FileNotFoundError(f"list file {d[key]!r} (data.{key}) does not exist")


# ---------------------------------------------------------------------- prompt-based recognition
class VideoTextTask(Task):
    """Zero-shot, few-shot and base-to-novel recognition with class prompts (MSTA's protocols)."""

    def __init__(self, cfg, info=None):
        super().__init__(cfg, info)
        self.name = cfg["task"]["name"]
        self.num_classes, self.names = resolve_classes(cfg)
        if self.names is None:
            raise ConfigError("video-text tasks need data.class_names: the classes are text prompts")
        t = cfg["task"]
        self.split = None
        if self.name == "base_to_novel":
            self.split = base_novel_split(self.num_classes, read_class_split(t["base_classes"], self.num_classes)
                                          if t["base_classes"] else None)
        self.consistency: Optional[ConsistencyLoss] = None
        self.summary: Dict[str, Any] = {}

    def check(self, train):
        t = self.cfg["task"]
        spec = method_spec(self.cfg)
        if not spec.joint_space:
            raise ConfigError(f"task.name={self.name} matches videos with class prompts in the joint space; "
                              f"{spec.name}'s video feature is not in it (use task.name=retrieval or recognition)")
        if train and self.name == "few_shot" and t["shots"] is None:
            raise ConfigError("task.shots must be set for few_shot (2, 4, 8 or 16 in the MSTA protocol)")
        if bool(t["spatial_descriptions"]) != bool(t["temporal_descriptions"]):
            raise ConfigError("set both task.spatial_descriptions and task.temporal_descriptions (or neither)")
        _check_files(self.cfg, train)

    def build(self, device):
        vm = build_video_model(self.cfg, None, device)
        return VideoTextClassifier(vm, self.names, self.cfg["task"]["template"])

    def video_model(self, model):
        return model.video_model

    def classes(self):
        return self.names

    def train_dataset(self, model):
        t, d = self.cfg["task"], self.cfg["data"]
        samples = read_list(d["train_list"], num_classes=self.num_classes, class_names=self.names)
        labels = [s.label for s in samples]
        if self.name == "few_shot":
            idx = few_shot_indices(labels, int(t["shots"]), int(t["seed"]))
            classes = sorted(set(labels))
        elif self.name == "base_to_novel":
            idx = self.split.train_indices(labels, None if t["shots"] is None else int(t["shots"]), int(t["seed"]))
            classes = list(self.split.base)
        else:
            idx = list(range(len(samples)))
            classes = sorted(set(labels))
        self.train_classes = [int(c) for c in classes]
        self.summary = {"train_videos": len(idx), "train_classes": self.train_classes}
        if t["spatial_descriptions"]:
            device = next(model.parameters()).device
            self.consistency = ConsistencyLoss(
                model.video_model, load_descriptions(t["spatial_descriptions"], self.train_classes),
                load_descriptions(t["temporal_descriptions"], self.train_classes), self.train_classes,
                alpha=float(t["alpha"])).to(device)
        return dataset_from_samples(self.cfg, [samples[i] for i in idx], model.video_model, train=True)

    def loss(self, model, batch, device, autocast):
        with autocast():
            return video_text_loss(model, batch["video"].to(device, non_blocking=True), batch["label"],
                                   self.train_classes, self.consistency,
                                   label_smoothing=float(self.cfg["train"]["label_smoothing"]))

    @torch.no_grad()
    def evaluate(self, model, device, autocast, progress=False):
        t, d = self.cfg["task"], self.cfg["data"]
        clf, names = model, self.names
        if self.name == "zero_shot" and t["eval_class_names"]:
            names = read_class_names(t["eval_class_names"])
            clf = VideoTextClassifier(model.video_model, names, t["template"])
        val = read_list(d["val_list"], num_classes=len(names), class_names=names)
        ds = _eval_dataset(self.cfg, val, model.video_model)
        loader, sampler = build_loader(ds, eval_batch_size(self.cfg, self.info), self.info, self.cfg,
                                       train=False)
        sampler.set_epoch(0)
        was = model.training
        model.eval()
        feats, labels, index, skipped = [], [], [], []
        try:
            for b in loader:
                skipped += b["failed"]
                if b["video"] is None:
                    continue
                video = b["video"].to(device)
                bsz, v = video.shape[:2]
                with autocast():
                    e = clf.video_embeddings(video.flatten(0, 1)).float().reshape(bsz, v, -1).mean(1)
                feats.append(F.normalize(e, dim=-1).cpu())
                labels.append(b["label"])
                index.append(b["index"])
        finally:
            model.train(was)
        empty = torch.zeros(0, dtype=torch.long)
        feats, labels = _gather_by_index(torch.cat(index) if index else empty,
                                         [torch.cat(feats) if feats else torch.zeros(0, 1),
                                          torch.cat(labels) if labels else empty], self.info)
        out: Dict[str, Any] = dict(self.summary)
        out.update(_skipped_report(skipped, self.info))
        if self.name == "zero_shot":
            splits = [read_class_split(p, len(names)) for p in t["splits"]] or [list(range(len(names)))]
            out.update(zero_shot(clf, feats, labels, splits))
        elif self.name == "few_shot":
            out.update(subset_accuracy(clf, feats, labels, sorted(set(labels.tolist())), topk=(1, 5)))
        else:
            out.update(base_to_novel_eval(clf, feats, labels, self.split))
        return out


# ---------------------------------------------------------------------- retrieval
def caption_samples(path: str) -> Tuple[List[Sample], List[str], List[int], List[Sample]]:
    """Pairs -> (one Sample per pair with label = pair index, captions, caption -> video, unique videos)."""
    pairs = read_caption_list(path)
    videos: Dict[str, int] = {}
    c2v = []
    for v, _ in pairs:
        c2v.append(videos.setdefault(v, len(videos)))
    samples = [Sample(v, i) for i, (v, _) in enumerate(pairs)]
    unique = [Sample(v, i) for v, i in videos.items()]
    return samples, [c for _, c in pairs], c2v, unique


class RetrievalTask(Task):
    """Text-video retrieval with a side network's frame embeddings and token-wise matching."""

    name = "retrieval"
    find_unused_parameters = True   # the side network's recognition head (SideHead) is not used here

    def check(self, train):
        if int(self.cfg["train"]["batch_size"]) // int(self.cfg["train"]["grad_accum"]) < 2:
            raise ConfigError("retrieval's contrastive loss needs at least 2 (caption, video) pairs per micro-batch: "
                              "raise train.batch_size or lower train.grad_accum")
        _check_files(self.cfg, train)

    def build(self, device):
        vm = build_video_model(self.cfg, None, device)
        try:
            return RetrievalModel(vm, train_text=bool(self.cfg["task"]["train_text"]))
        except ValueError as e:
            raise ConfigError(f"task.name=retrieval: {e}") from None

    def video_model(self, model):
        return model.video_model

    def param_groups(self, model):
        text_ids = {id(p) for p in model.backbone_parameters()}   # at task.text_lr (the released coef_lr)
        new = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in text_ids]
        wd = float(self.cfg["train"]["weight_decay"])
        groups = [{"params": [p for n, p in new if p.ndim >= 2], "weight_decay": wd},
                  {"params": [p for n, p in new if p.ndim < 2], "weight_decay": 0.0}]
        text = model.backbone_parameters()
        if text:
            groups.append({"params": text, "weight_decay": wd, "lr": float(self.cfg["task"]["text_lr"])})
        return groups

    def train_dataset(self, model):
        samples, captions, _, _ = caption_samples(self.cfg["data"]["train_list"])
        self.tokens = model.tokenize(captions)
        return dataset_from_samples(self.cfg, samples, model.video_model, train=True)

    def loss(self, model, batch, device, autocast):
        video = batch["video"].to(device, non_blocking=True)
        tokens = self.tokens[batch["label"]].to(device)
        with autocast():
            frames = model.frame_embeddings(video)
            words, mask = model.text_embeddings(tokens)
        frames = gather_with_grad(frames.float(), self.info)
        words = gather_with_grad(words.float(), self.info)
        mask = gather_with_grad(mask, self.info) if self.info.enabled else mask
        return contrastive_loss(model.matching(words, mask, frames), model.logit_scale)

    def state_dict(self, model):
        return model.trained_state_dict()

    def load_state_dict(self, model, state):
        model.load_trained_state_dict(state)

    def pretrained_config(self, model):
        return model.pretrained_config()

    @torch.no_grad()
    def evaluate(self, model, device, autocast, progress=False):
        """Embed each distinct video of ``data.val_list`` once (first test view), every caption once."""
        _, captions, c2v, unique = caption_samples(self.cfg["data"]["val_list"])
        ds = _eval_dataset(self.cfg, unique, model.video_model)
        loader, sampler = build_loader(ds, eval_batch_size(self.cfg, self.info), self.info, self.cfg, train=False)
        sampler.set_epoch(0)
        was = model.training
        model.eval()
        try:
            frames, index, skipped = [], [], []
            for b in loader:
                skipped += b["failed"]
                if b["video"] is None:
                    continue
                with autocast():
                    frames.append(model.frame_embeddings(b["video"][:, 0].to(device)).float().cpu())
                index.append(b["index"])
            empty = torch.zeros(0, dtype=torch.long)
            kept, frames = _gather_by_index(torch.cat(index) if index else empty,
                                            [torch.cat(index) if index else empty,
                                             torch.cat(frames) if frames else torch.zeros(0)], self.info)
            if not len(kept):
                raise ValueError(f"evaluation: none of the {len(unique)} videos of data.val_list could be read")
            # captions of an excluded (unreadable) video are left out with it
            new_id = {int(v): j for j, v in enumerate(kept.tolist())}
            keep = [q for q, v in enumerate(c2v) if v in new_id]
            captions, c2v = [captions[q] for q in keep], [new_id[c2v[q]] for q in keep]
            words, mask = model.text_embeddings(model.tokenize(captions))
            frames = frames.to(words.device)
            sim = torch.cat([model.matching(words[i:i + 64].float(), mask[i:i + 64], frames)
                             for i in range(0, len(words), 64)])
        finally:
            model.train(was)
        out = retrieval_metrics(sim, c2v)
        out["captions"], out["videos"] = len(captions), len(kept)
        out.update(_skipped_report(skipped, self.info))
        return out


TASKS = {"recognition": RecognitionTask, "zero_shot": VideoTextTask, "few_shot": VideoTextTask,
         "base_to_novel": VideoTextTask, "retrieval": RetrievalTask}


def build_task(cfg: Dict[str, Any], info: Optional[DistInfo] = None) -> Task:
    """The task ``cfg["task"]["name"]`` for :class:`vpeft.engine.Trainer`."""
    name = cfg["task"]["name"]
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r}; expected one of {tuple(TASKS)}")
    return TASKS[name](cfg, info)
