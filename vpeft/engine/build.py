"""Building a run's parts from its configuration: backbone, adapted model, data loaders."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint as _ckpt
from torch.utils.data import DataLoader

from ..data import EpochSampler, TestTransform, TrainTransform, VideoDataset, collate, read_class_names, read_list
from ..model import VideoModel, adapt
from .config import ConfigError, flip_label_map
from .distributed import DistInfo

log = logging.getLogger("vpeft")

# Small open_clip CLIP configs for CPU runs (the demo and tests). Built with
# ``open_clip.CLIP(**cfg)``; everything else goes to ``open_clip.create_model``.
TINY_BACKBONES: Dict[str, Dict[str, Any]] = {
    "vpeft-tiny": dict(
        embed_dim=64,
        vision_cfg=dict(layers=4, width=96, patch_size=8, image_size=32, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2),
    ),
}


class PretrainedUnavailable(RuntimeError):
    """An open_clip pretrained tag could not be fetched (usually: no network)."""


def create_backbone(name: str, pretrained: Optional[str] = None, checkpoint: Optional[str] = None):
    """An open_clip model by name with random weights, a pretrained tag, or a local weights file.

    Args:
        name: an open_clip model name (``ViT-B-16``, ``ViT-L-14``, ``EVA02-E-14``...) or
            a key of :data:`TINY_BACKBONES`.
        pretrained: an open_clip pretrained tag (downloads; fails offline with a
            :class:`PretrainedUnavailable` that points to ``checkpoint``).
        checkpoint: a local weights file loaded with ``open_clip.load_checkpoint``.
    """
    import open_clip

    if pretrained and checkpoint:
        raise ConfigError("give either model.pretrained (an open_clip tag) or model.checkpoint (a local file), not both")
    if name in TINY_BACKBONES:
        if pretrained:
            raise ConfigError(f"{name} is a vpeft test config with no pretrained weights; drop --pretrained")
        model = open_clip.CLIP(**TINY_BACKBONES[name])
    else:
        if name not in open_clip.list_models():
            raise ConfigError(f"unknown backbone {name!r}: not an open_clip model name nor one of "
                              f"{sorted(TINY_BACKBONES)} (see open_clip.list_models())")
        if pretrained:
            from open_clip import pretrained as oc_pretrained

            pcfg = oc_pretrained.get_pretrained_cfg(name, pretrained)
            if not pcfg:
                tags = oc_pretrained.list_pretrained_tags_by_model(name)
                raise ConfigError(f"open_clip has no pretrained tag {pretrained!r} for {name}; known tags: {tags}. "
                                  "For your own weights file use --checkpoint PATH")
            try:  # fetch first (fails fast offline), build second
                oc_pretrained.download_pretrained(pcfg)
                model = open_clip.create_model(name, pretrained=pretrained)
            except Exception as e:  # noqa: BLE001 - any download failure
                raise PretrainedUnavailable(
                    f"could not download open_clip weights {name!r} pretrained={pretrained!r} "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). This machine may have no "
                    f"network access: download the weights elsewhere and pass the local file with --checkpoint PATH "
                    f"(model.checkpoint=PATH) instead.") from e
        else:
            model = open_clip.create_model(name, pretrained=None)
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"backbone weights file {checkpoint!r} (model.checkpoint / --checkpoint) "
                                    "does not exist")
        import open_clip as oc

        incompatible = oc.load_checkpoint(model, checkpoint)
        log.info("loaded backbone weights from %s (%s)", checkpoint, incompatible)
    return model


def _checkpoint_block(block: torch.nn.Module) -> None:
    """Recompute ``block``'s activations in the backward pass (instance-level patch; state dict unchanged)."""
    inner = block.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return _ckpt(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    block.forward = forward


def build_model(cfg: Dict[str, Any], num_classes: int, device: torch.device) -> VideoModel:
    """The backbone adapted by ``model.method`` with a ``num_classes`` classifier, on ``device``."""
    m = cfg["model"]
    from ..tasks.runner import build_backbone  # ViCLIP names and the text-capable tiny configs, else create_backbone
    backbone = build_backbone(cfg)
    options = dict(m["options"])
    if cfg["train"]["activation_checkpointing"] and m["method"] in ("side4video", "st_adapter", "msta"):
        options.setdefault("checkpointing", True)  # the method's own recomputation regions
    vm = adapt(backbone, m["method"], num_frames=m["num_frames"], num_classes=num_classes,
               dropout=float(m["dropout"]), **options)
    if cfg["train"]["activation_checkpointing"] and m["method"] == "full_finetune":
        for blk in vm.tower.blocks:
            _checkpoint_block(blk)
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
    if train:
        tf = TrainTransform(size, model.tower.mean, model.tower.std, scale=tuple(float(x) for x in d["crop_scale"]),
                            flip=float(d["flip"]), flip_label_map=flip_label_map(d["flip_label_map"]),
                            color_jitter=float(d["color_jitter"]), grayscale=float(d["grayscale"]))
    else:
        tf = TestTransform(size, model.tower.mean, model.tower.std, resize=d["test_resize"], num_crops=d["test_crops"])
    return VideoDataset(root, samples, model.num_frames, tf, sampling=d["sampling"], stride=d["stride"],
                        num_clips=d["test_clips"], seed=cfg["train"]["seed"],
                        max_replacements=d["max_replacements"])


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
