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
from typing import Iterator, Optional, Union

import torch
import torch.nn as nn


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
