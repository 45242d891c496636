"""Running the video-language tasks from a run configuration (``vpeft train/eval --task ...``).

Tasks (``task.name``):

* ``zero_shot``: ``train`` fits the adapters on ``data.train_list`` (all its classes as
  prompts) and then evaluates; ``eval`` only evaluates. Evaluation scores
  ``data.val_list`` on each class split of ``task.splits`` (files of class indices of
  ``task.eval_class_names``, default ``data.class_names``) and reports the mean over
  splits. No split files: one split with every class.
* ``few_shot``: ``task.shots`` videos per class drawn from ``data.train_list`` with
  ``task.seed``; evaluation on ``data.val_list`` over all classes.
* ``base_to_novel``: training on the base classes (``task.base_classes``: a file of class
  indices, default the first half) with ``task.shots`` per class (null: all their
  videos); evaluation reports base, novel and harmonic mean.
* ``retrieval``: Side4Video text-video retrieval; the lists are ``video<TAB>caption``
  files; evaluation reports text-to-video and video-to-text R@1/5/10, MdR, MnR.

MSTA's consistency loss is on when ``task.spatial_descriptions`` and
``task.temporal_descriptions`` are set (weight ``task.alpha``).

Outputs under ``output_dir``: ``adapters.pt`` (the trained weights only, as
:meth:`vpeft.VideoModel.adapter_state_dict`, plus the retrieval head),
``metrics.json``, ``config.yaml``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..data import VideoDataset, collate, read_class_names, read_list
from ..data.lists import Sample
from ..backbones.build import create_backbone
from ..engine.build import dataset_from_samples, resolve_classes
from ..engine.config import ConfigError, dump
from ..model import VideoModel, adapt
from .consistency import ConsistencyLoss, load_descriptions
from .loops import train_retrieval, train_video_text
from .retrieval import RetrievalModel, read_caption_list, retrieval_metrics
from .videotext import (VideoTextClassifier, base_novel_split, base_to_novel_eval, encode_videos, few_shot_indices,
                        read_class_split, subset_accuracy, zero_shot)

log = logging.getLogger("vpeft")

TASKS = ("zero_shot", "few_shot", "base_to_novel", "retrieval")

def build_backbone(cfg: Dict[str, Any]) -> torch.nn.Module:
    """The run's backbone (``model.backbone``, ``model.pretrained``, ``model.checkpoint``) from the
    one backbone table, :func:`vpeft.backbones.build.create_backbone` (ViCLIP names included)."""
    m = cfg["model"]
    return create_backbone(m["backbone"], m["pretrained"], m["checkpoint"], num_frames=m["num_frames"])


def _device(cfg) -> torch.device:
    if cfg["device"] == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _dataset(cfg, samples: Sequence[Sample], vm: VideoModel, train: bool) -> VideoDataset:
    return dataset_from_samples(cfg, samples, vm, train)


def _loader(ds: VideoDataset, batch: int, cfg, train: bool):
    from ..data import EpochSampler
    sampler = EpochSampler(len(ds), shuffle=train, seed=cfg["train"]["seed"], drop_last=False)
    workers = int(cfg["data"]["num_workers"])
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=collate, drop_last=False,
                                         prefetch_factor=2 if workers > 0 else None)
    return loader, sampler


class _Epochs:
    """``batches(epoch)`` for the task loops over a DataLoader: ``(video, label)`` pairs."""

    def __init__(self, loader, sampler, pick=None):
        self.loader, self.sampler, self.pick = loader, sampler, pick

    def __call__(self, epoch: int):
        self.sampler.set_epoch(epoch)
        outer = self

        class _It:
            def __len__(self):
                return len(outer.loader)

            def __iter__(self):
                for b in outer.loader:
                    yield b["video"], (b["label"] if outer.pick is None else outer.pick(b["label"]))
        return _It()


def _save(out_dir: str, cfg, state: Dict[str, torch.Tensor], metrics: Dict[str, Any]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    if state is not None:
        torch.save(state, os.path.join(out_dir, "adapters.pt"))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        f.write(dump(cfg))


def _load_adapters(path: Optional[str], modules: Dict[str, torch.nn.Module]) -> None:
    if not path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter weights {path!r} (task.adapters) do not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for prefix, mod in modules.items():
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if prefix == "video_model":
            mod.load_adapter_state_dict(part)
        else:
            mod.load_state_dict(part)
    log.info("loaded trained weights from %s", path)


# ---------------------------------------------------------------------- recognition tasks
def _recognition(cfg: Dict[str, Any], train: bool) -> Dict[str, Any]:
    t, tr = cfg["task"], cfg["train"]
    name = t["name"]
    device = _device(cfg)
    num_classes, names = resolve_classes(cfg)
    if names is None:
        raise ConfigError("video-text tasks need data.class_names: the classes are text prompts")
    backbone = build_backbone(cfg)
    vm = adapt(backbone, cfg["model"]["method"], num_frames=cfg["model"]["num_frames"], num_classes=None,
               **dict(cfg["model"]["options"])).to(device)
    clf = VideoTextClassifier(vm, names, t["template"])
    _load_adapters(t["adapters"], {"video_model": vm})
    metrics: Dict[str, Any] = {"task": name}

    split = base_novel_split(num_classes, read_class_split(t["base_classes"], num_classes)
                             if t["base_classes"] else None) if name == "base_to_novel" else None
    if train:
        samples = read_list(cfg["data"]["train_list"], num_classes=num_classes, class_names=names)
        labels = [s.label for s in samples]
        if name == "few_shot":
            if t["shots"] is None:
                raise ConfigError("task.shots must be set for few_shot (2, 4, 8 or 16 in the MSTA protocol)")
            idx = few_shot_indices(labels, int(t["shots"]), int(t["seed"]))
            classes = sorted(set(labels))
        elif name == "base_to_novel":
            idx = split.train_indices(labels, None if t["shots"] is None else int(t["shots"]), int(t["seed"]))
            classes = list(split.base)
        else:
            idx = list(range(len(samples)))
            classes = sorted(set(labels))
        metrics["train_videos"] = len(idx)
        metrics["train_classes"] = classes
        ds = _dataset(cfg, [samples[i] for i in idx], vm, train=True)
        loader, sampler = _loader(ds, min(int(tr["batch_size"]), len(idx)), cfg, train=True)
        cc = None
        if t["spatial_descriptions"] or t["temporal_descriptions"]:
            if not (t["spatial_descriptions"] and t["temporal_descriptions"]):
                raise ConfigError("set both task.spatial_descriptions and task.temporal_descriptions (or neither)")
            cc = ConsistencyLoss(vm, load_descriptions(t["spatial_descriptions"], classes),
                                 load_descriptions(t["temporal_descriptions"], classes), classes,
                                 alpha=float(t["alpha"])).to(device)
        steps = len(loader)
        losses = train_video_text(
            clf, _Epochs(loader, sampler), classes=classes, epochs=int(tr["epochs"]), lr=float(tr["lr"]),
            weight_decay=float(tr["weight_decay"]), warmup=int(round(float(tr["warmup_epochs"]) * steps)),
            final_lr=float(tr["min_lr"]), consistency=cc, clip_grad=float(tr["clip_grad"] or 0.0),
            log=lambda r: log.info("epoch %d step %d loss %.4f ce %.4f lr %.2e", r["epoch"], r["step"], r["loss"],
                                   r["ce"], r["lr"]) if r["step"] % int(tr["log_every"]) == 0 else None)
        metrics["loss_first"], metrics["loss_last"] = losses[0], losses[-1]

    val = read_list(cfg["data"]["val_list"], num_classes=num_classes, class_names=names)
    if name == "zero_shot" and t["eval_class_names"]:
        eval_names = read_class_names(t["eval_class_names"])
        clf = VideoTextClassifier(vm, eval_names, t["template"])
        val = read_list(cfg["data"]["val_list"], num_classes=len(eval_names), class_names=eval_names)
    ds = _dataset(cfg, val, vm, train=False)
    loader, sampler = _loader(ds, int(tr["batch_size"]), cfg, train=False)
    feats, labels = encode_videos(clf, ((b["video"], b["label"]) for b in loader))
    if name == "zero_shot":
        splits = [read_class_split(p, len(clf.classnames)) for p in t["splits"]] or [list(range(len(clf.classnames)))]
        metrics.update(zero_shot(clf, feats, labels, splits))
    elif name == "few_shot":
        metrics.update(subset_accuracy(clf, feats, labels, sorted(set(labels.tolist())), topk=(1, 5)))
    else:
        metrics.update(base_to_novel_eval(clf, feats, labels, split))
    state = {"video_model." + k: v for k, v in vm.adapter_state_dict().items()} if train else None
    _save(cfg["output_dir"], cfg, state, metrics)
    return metrics


# ---------------------------------------------------------------------- retrieval
def _caption_samples(path: str) -> Tuple[List[Sample], List[str], List[int], List[Sample]]:
    """Pairs -> (one Sample per pair with label = pair index, captions, caption -> video, unique videos)."""
    pairs = read_caption_list(path)
    videos: Dict[str, int] = {}
    c2v = []
    for v, _ in pairs:
        c2v.append(videos.setdefault(v, len(videos)))
    samples = [Sample(v, i) for i, (v, _) in enumerate(pairs)]
    unique = [Sample(v, i) for v, i in videos.items()]
    return samples, [c for _, c in pairs], c2v, unique


def _retrieval(cfg: Dict[str, Any], train: bool) -> Dict[str, Any]:
    t, tr = cfg["task"], cfg["train"]
    if cfg["model"]["method"] != "side4video":
        raise ConfigError(f"task retrieval is Side4Video's; model.method={cfg['model']['method']!r}")
    device = _device(cfg)
    backbone = build_backbone(cfg)
    vm = adapt(backbone, "side4video", num_frames=cfg["model"]["num_frames"], num_classes=None,
               **dict(cfg["model"]["options"])).to(device)
    rm = RetrievalModel(vm, train_text=bool(t["train_text"]))
    _load_adapters(t["adapters"], {"video_model": vm, "head": rm.head, "matching": rm.matching})
    metrics: Dict[str, Any] = {"task": "retrieval"}
    if train:
        samples, captions, _, _ = _caption_samples(cfg["data"]["train_list"])
        tokens = rm.tokenize(captions)
        ds = _dataset(cfg, samples, vm, train=True)
        loader, sampler = _loader(ds, int(tr["batch_size"]), cfg, train=True)
        steps = len(loader)
        losses = train_retrieval(
            rm, _Epochs(loader, sampler, pick=lambda lab: tokens[lab]), epochs=int(tr["epochs"]),
            lr=float(tr["lr"]), text_lr=float(t["text_lr"]), weight_decay=float(tr["weight_decay"]),
            warmup=int(round(float(tr["warmup_epochs"]) * steps)), clip_grad=float(tr["clip_grad"] or 0.0),
            log=lambda r: log.info("epoch %d step %d loss %.4f lr %.2e", r["epoch"], r["step"], r["loss"], r["lr"])
            if r["step"] % int(tr["log_every"]) == 0 else None)
        metrics["loss_first"], metrics["loss_last"] = losses[0], losses[-1]
    metrics.update(evaluate_retrieval(rm, cfg))
    state = None
    if train:
        state = {"video_model." + k: v for k, v in vm.adapter_state_dict().items()}
        state.update({"head." + k: v for k, v in rm.head.state_dict().items()})
        state.update({"matching." + k: v for k, v in rm.matching.state_dict().items()})
    _save(cfg["output_dir"], cfg, state, metrics)
    return metrics


@torch.no_grad()
def evaluate_retrieval(rm: RetrievalModel, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Embed each distinct video of ``data.val_list`` once (first test view), every caption once."""
    _, captions, c2v, unique = _caption_samples(cfg["data"]["val_list"])
    rm.eval()
    ds = _dataset(cfg, unique, rm.video_model, train=False)
    loader, _ = _loader(ds, int(cfg["train"]["batch_size"]), cfg, train=False)
    frames = []
    for b in loader:
        video = b["video"]
        frames.append(rm.frame_embeddings(video[:, 0] if video.dim() == 6 else video))
    frames = torch.cat(frames)
    words, mask = rm.text_embeddings(rm.tokenize(captions))
    sim = torch.cat([rm.matching(words[i:i + 64], mask[i:i + 64], frames) for i in range(0, len(words), 64)])
    out = retrieval_metrics(sim, c2v)
    out["captions"], out["videos"] = len(captions), len(unique)
    return out


def run_task(cfg: Dict[str, Any], train: bool) -> Dict[str, Any]:
    """Train (then evaluate) or only evaluate the video-language task ``cfg["task"]["name"]``."""
    name = cfg["task"]["name"]
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r}; expected one of {TASKS}")
    torch.manual_seed(int(cfg["train"]["seed"]))
    if name == "retrieval":
        return _retrieval(cfg, train)
    return _recognition(cfg, train)
