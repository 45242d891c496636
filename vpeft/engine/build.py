"""Building a run's parts from its configuration: backbone, adapted model, data loaders."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint as _ckpt
from torch.utils.data import DataLoader

# the backbone table and its one builder live in vpeft.backbones.build (re-exported here)
from ..backbones.build import TINY_BACKBONES, PretrainedUnavailable, create_backbone  # noqa: F401
from ..data import EpochSampler, TestTransform, TrainTransform, VideoDataset, collate, read_class_names, read_list
from ..data.transforms import resolve_interpolation
from ..methods.registry import get_method
from ..model import VideoModel, adapt
from .config import ConfigError, flip_label_map
from .distributed import DistInfo

log = logging.getLogger("vpeft")

def _checkpoint_block(block: torch.nn.Module) -> None:
    """Recompute ``block``'s activations in the backward pass (instance-level patch; state dict unchanged)."""
    inner = block.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return _ckpt(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    block.forward = forward


def backbone_from_config(cfg: Dict[str, Any], device: Optional[torch.device] = None) -> torch.nn.Module:
    """The backbone ``model.backbone`` with ``model.pretrained`` / ``model.checkpoint`` (the one builder)."""
    m = cfg["model"]
    return create_backbone(m["backbone"], pretrained=m["pretrained"], checkpoint=m["checkpoint"],
                           num_frames=m["num_frames"], device=device)


def method_spec(cfg: Dict[str, Any]):
    """The registered method ``model.method`` (a ConfigError lists the registered ones)."""
    try:
        return get_method(cfg["model"]["method"])
    except ValueError as e:
        raise ConfigError(f"model.method: {e}") from None


def build_video_model(cfg: Dict[str, Any], num_classes: Optional[int], device: torch.device) -> VideoModel:
    """The backbone adapted by ``model.method`` (with a ``num_classes`` classifier, or none), on ``device``.

    ``train.activation_checkpointing`` applies as the method declares: recomputing each
    backbone block, or through the method's own ``checkpointing`` option.
    """
    m = cfg["model"]
    spec = method_spec(cfg)
    backbone = backbone_from_config(cfg)
    options = dict(m["options"])
    ac = bool(cfg["train"]["activation_checkpointing"])
    if ac and spec.checkpointing == "option":
        options.setdefault("checkpointing", True)   # the method's own recomputation regions
    try:
        vm = adapt(backbone, spec.name, num_frames=m["num_frames"], num_classes=num_classes,
                   dropout=float(m["dropout"]), **options)
    except ValueError as e:
        raise ConfigError(f"model.options: {e}") from None
    if ac and spec.checkpointing == "blocks":
        for blk in vm.tower.blocks:
            _checkpoint_block(blk)
    vm.backbone_name = m["backbone"]
    return vm.to(device)


def resolve_classes(cfg: Dict[str, Any]) -> Tuple[int, Optional[list]]:
    """``(num_classes, class names or None)`` from ``data.class_names`` / ``data.num_classes``."""
    d = cfg["data"]
    names = read_class_names(d["class_names"]) if d["class_names"] else None
    n = d["num_classes"]
    if n is None:
        if names is None:
            raise ConfigError("set data.num_classes or data.class_names")
        n = len(names)
    if names is not None and len(names) != n:
        raise ConfigError(f"data.num_classes={n} but {d['class_names']} lists {len(names)} classes")
    return int(n), names


def _root(cfg) -> str:
    root = cfg["data"]["root"]
    if not root:
        raise ConfigError("data.root is not set: the directory the list files' video paths are relative to")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"video directory {root!r} (data.root) does not exist")
    return root


def check_data(cfg: Dict[str, Any], num_classes: int, names, *, train: bool = True) -> None:
    """Fail early (before a possibly large backbone is built) on a missing video directory,
    an unset, missing, malformed or empty list file."""
    d = cfg["data"]
    _root(cfg)
    keys = (["train_list"] if train else []) + (["val_list"] if d["val_list"] or not train else [])
    for key in keys:
        if not d[key]:
            raise ConfigError(f"data.{key} is not set")
        read_list(d[key], num_classes=num_classes, class_names=names)


def build_dataset(cfg: Dict[str, Any], split: str, model: VideoModel, num_classes: int, names) -> VideoDataset:
    """The ``train`` or ``val`` :class:`VideoDataset`, normalised with the model's own mean and std."""
    d = cfg["data"]
    key = "train_list" if split == "train" else "val_list"
    if not d[key]:
        raise ConfigError(f"data.{key} is not set")
    samples = read_list(d[key], num_classes=num_classes, class_names=names)
    return dataset_from_samples(cfg, samples, model, train=(split == "train"))


def dataset_from_samples(cfg: Dict[str, Any], samples, model: VideoModel, train: bool) -> VideoDataset:
    """A :class:`VideoDataset` over ``samples`` under ``data.root`` with the config's sampling and
    the train or test transform, normalised with the model's own mean and std."""
    d = cfg["data"]
    root = _root(cfg)
    size = model.tower.image_size[0]
    interp = resolve_interpolation(d["resize"], model.tower.visual)
    if train:
        tf = TrainTransform(size, model.tower.mean, model.tower.std, scale=tuple(float(x) for x in d["crop_scale"]),
                            flip=float(d["flip"]), flip_label_map=flip_label_map(d["flip_label_map"]),
                            color_jitter=float(d["color_jitter"]), grayscale=float(d["grayscale"]),
                            interpolation=interp)
    else:
        tf = TestTransform(size, model.tower.mean, model.tower.std, resize=d["test_resize"], num_crops=d["test_crops"],
                           interpolation=interp)
    return VideoDataset(root, samples, model.num_frames, tf, sampling=d["sampling"], stride=d["stride"],
                        num_clips=d["test_clips"], seed=cfg["train"]["seed"],
                        max_replacements=d["max_replacements"], decoder=d["decoder"],
                        frame_template=d["frame_template"], frame_start_index=d["frame_start_index"],
                        min_frames=d["min_frames"])


def build_loader(ds: VideoDataset, batch: int, info: DistInfo, cfg: Dict[str, Any], *, train: bool):
    """A DataLoader over ``ds`` with an :class:`EpochSampler` for this rank.

    The loader gets its own generator so creating an iterator never draws from the
    global RNG (which would shift dropout masks between a resumed and an uninterrupted run).
    Training workers persist across epochs: items carry their epoch in the sampler's keys,
    so the dataset copies in the workers hold no per-epoch state.
    """
    sampler = EpochSampler(len(ds), shuffle=train, seed=cfg["train"]["seed"], rank=info.rank, world=info.world,
                           drop_last=train, per_rank_multiple=batch)
    workers = int(cfg["data"]["num_workers"])
    g = torch.Generator()
    g.manual_seed(int(cfg["train"]["seed"]))
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate,
                        pin_memory=info.device.type == "cuda", drop_last=train, generator=g,
                        persistent_workers=train and workers > 0, prefetch_factor=2 if workers > 0 else None)
    return loader, sampler
