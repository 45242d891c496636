"""Build open_clip backbones directly on a device and in a dtype, randomly initialised.

``open_clip.create_model(name, device="cuda", precision="bf16")`` first builds the
model on the CPU in fp32 and then moves and casts it: for EVA02-E-14 (4.35 B vision
parameters) that is 17 GB of host memory and a full fp32 copy before the cast. Here
the modules are constructed under ``torch.device(device)`` with the default dtype set
to ``dtype``, so every parameter is allocated once, where it will live, in the dtype it
will train in (8.7 GB in bf16 for ViT-E's vision tower).

Weights are random (this project never downloads checkpoints); load a local
checkpoint afterwards with ``load_state_dict`` if you have one.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, Iterator, Optional, Union

import torch
import torch.nn as nn

log = logging.getLogger("vpeft")


@contextlib.contextmanager
def construct_on(device: Union[str, torch.device], dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside allocate their parameters on ``device`` in ``dtype``.

    Restores the previous default dtype on exit, also after an exception.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _config(name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model config {name!r}; see open_clip.list_models()")
    return cfg


def create_vision_tower(name: str, *, device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The vision tower (``model.visual``) of open_clip config ``name``, built on ``device`` in ``dtype``.

    Works for native ViTs (``ViT-B-16``, ``ViT-L-14``) and timm towers (``EVA02-E-14``:
    a ``TimmModel`` around timm's post-norm ``eva02_enormous_patch14_clip_224``). Pass
    ``device="meta"`` to get shapes only (no memory), e.g. to count parameters.
    """
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = _config(name)
    with construct_on(device, dtype):
        tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                                    quick_gelu=cfg.get("quick_gelu", False))
    return tower.eval()


def create_model(name: str, *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The whole open_clip model (vision and text towers) of config ``name``, built on ``device`` in ``dtype``."""
    import open_clip

    cfg = dict(_config(name))
    custom = cfg.pop("custom_text", False)
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    with construct_on(device, dtype):
        model = cls(**cfg)
    return model.eval()


def create_tiny_eva(*, depth: int = 4, image_size: int = 56, post_norm: bool = True,
                    device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A small open_clip ``TimmModel`` around timm's EVA02-tiny trunk (post-norm blocks like ViT-E).

    For CPU tests and the CPU benchmark: the same module types as EVA02-E-14's tower,
    192 wide, ``depth`` blocks, patch 14.
    """
    import timm
    from open_clip.timm_model import TimmModel

    with construct_on(device, dtype or torch.get_default_dtype()):
        vis = TimmModel("eva02_tiny_patch14_224", embed_dim=32, image_size=image_size, pool="token", proj=None)
        vis.trunk = timm.create_model("eva02_tiny_patch14_224", num_classes=32, global_pool="token",
                                      use_post_norm=post_norm, depth=depth, img_size=image_size)
    return vis.eval()


# ---------------------------------------------------------------------- the one builder by name
# Small backbones for CPU runs (the demo and the tests), by name. ``open_clip`` entries are
# ``open_clip.CLIP(**cfg)`` configs; ``viclip`` entries are :func:`create_viclip` overrides.
TINY_BACKBONES: Dict[str, Dict[str, Any]] = {
    "vpeft-tiny": dict(kind="open_clip", cfg=dict(
        embed_dim=64,
        vision_cfg=dict(layers=4, width=96, patch_size=8, image_size=32, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2))),
    # an open_clip CLIP whose text tower takes real BPE token ids (full vocabulary)
    "clip-tiny-text": dict(kind="open_clip", cfg=dict(
        embed_dim=64,
        vision_cfg=dict(layers=4, width=96, patch_size=8, image_size=32, head_width=32),
        text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2))),
    "viclip-tiny": dict(kind="viclip", cfg=dict(
        image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=2, text_width=64,
        text_layers=3, text_heads=2, embed_dim=64)),
    # the profiling suite's CPU case
    "tiny-vit": dict(kind="open_clip", cfg=dict(
        embed_dim=32,
        vision_cfg=dict(layers=6, width=128, patch_size=8, image_size=32, head_width=64),
        text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=2, layers=6))),
}


class PretrainedUnavailable(RuntimeError):
    """An open_clip pretrained tag could not be fetched (usually: no network)."""


def _merged(base: Dict[str, Any], over: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _open_clip_pretrained(name: str, pretrained: str) -> nn.Module:
    import open_clip
    from open_clip import pretrained as oc_pretrained

    from ..engine.config import ConfigError

    pcfg = oc_pretrained.get_pretrained_cfg(name, pretrained)
    if not pcfg:
        tags = oc_pretrained.list_pretrained_tags_by_model(name)
        raise ConfigError(f"open_clip has no pretrained tag {pretrained!r} for {name}; known tags: {tags}. "
                          "For your own weights file use --checkpoint PATH")
    try:  # fetch first (fails fast offline), build second
        oc_pretrained.download_pretrained(pcfg)
        return open_clip.create_model(name, pretrained=pretrained)
    except Exception as e:  # noqa: BLE001 - any download failure
        raise PretrainedUnavailable(
            f"could not download open_clip weights {name!r} pretrained={pretrained!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). This machine may have no "
            f"network access: download the weights elsewhere and pass the local file with --checkpoint PATH "
            f"(model.checkpoint=PATH) instead.") from e


def create_backbone(name: str, *, pretrained: Optional[str] = None, checkpoint: Optional[str] = None,
                    num_frames: Optional[int] = None, device: Union[str, torch.device, None] = None,
                    dtype: Optional[torch.dtype] = None, config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """A backbone by name: the one builder the engine, the tasks, profiling and the tests use.

    Args:
        name: an open_clip model name (``ViT-B-16``, ``EVA02-E-14``...), a ViCLIP size
            (``ViCLIP-B-16``, ``ViCLIP-L-14``), or a key of :data:`TINY_BACKBONES`.
        pretrained: an open_clip pretrained tag (downloads; fails offline with a
            :class:`PretrainedUnavailable` that points to ``checkpoint``).
        checkpoint: a local weights file (open_clip's ``load_checkpoint``; for ViCLIP the
            official file layout).
        num_frames: frames per clip (ViCLIP's temporal position embedding has this length).
        device, dtype: where and in what to allocate the weights (default: CPU, the
            default dtype). Random-init open_clip models are built in place (see
            :func:`construct_on`).
        config: for a tiny backbone, entries overriding its config (nested dicts merge).

    Weights are random unless ``pretrained`` or ``checkpoint`` is given.
    """
    import os

    import open_clip

    from ..engine.config import ConfigError
    from .viclip import VICLIP_CONFIGS, create_viclip, load_viclip_checkpoint

    if pretrained and checkpoint:
        raise ConfigError("give either model.pretrained (an open_clip tag) or model.checkpoint (a local file), not both")
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"backbone weights file {checkpoint!r} (model.checkpoint / --checkpoint) "
                                "does not exist")
    if config and name not in TINY_BACKBONES:
        raise ConfigError(f"config overrides are only for the tiny backbones {sorted(TINY_BACKBONES)}, not {name!r}")
    device = device or "cpu"
    dtype = dtype or torch.get_default_dtype()
    entry = TINY_BACKBONES.get(name)
    is_viclip = name in VICLIP_CONFIGS or (entry is not None and entry["kind"] == "viclip")
    if is_viclip:
        if pretrained:
            raise ConfigError("ViCLIP weights come from a local file: set model.checkpoint, not model.pretrained")
        kw = _merged(entry["cfg"], config) if entry is not None else {}
        if num_frames is not None:
            kw["num_frames"] = num_frames
        with construct_on(device, dtype):
            model = create_viclip(None if entry is not None else name, **kw)
        if checkpoint:
            load_viclip_checkpoint(model, checkpoint)
        return model
    if entry is not None:
        if pretrained:
            raise ConfigError(f"{name} is a vpeft test config with no pretrained weights; drop --pretrained")
        with construct_on(device, dtype):
            model = open_clip.CLIP(**_merged(entry["cfg"], config))
    elif name not in open_clip.list_models():
        raise ConfigError(f"unknown backbone {name!r}: not an open_clip model name, a ViCLIP size "
                          f"{sorted(VICLIP_CONFIGS)}, nor one of {sorted(TINY_BACKBONES)} (see open_clip.list_models())")
    elif pretrained:
        model = _open_clip_pretrained(name, pretrained).to(device=device, dtype=dtype)
    elif str(device) == "cpu" and dtype == torch.float32:
        model = open_clip.create_model(name, pretrained=None)   # open_clip's own preprocessing config too
    else:
        model = create_model(name, device=device, dtype=dtype)   # allocated once, in place (large models)
    if checkpoint:
        try:
            incompatible = open_clip.load_checkpoint(model, checkpoint)
        except Exception as e:  # noqa: BLE001 - unreadable or mismatched: one line naming the file
            from ..engine.checkpoint import backbone_load_error

            raise backbone_load_error(checkpoint, model, e) from None
        log.info("loaded backbone weights from %s (%s)", checkpoint, incompatible)
    return model
