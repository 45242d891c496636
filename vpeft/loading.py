"""``vpeft.from_pretrained``: rebuild a saved model around its backbone and load the trained weights."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch.nn as nn
from safetensors.torch import load_file

from .backbones.build import create_backbone
from .model import adapt
from .pretrained import WEIGHTS_NAME, backbone_fingerprint, check_weights, read_adapter_config

__all__ = ["from_pretrained"]


def from_pretrained(directory: str, backbone: Union[nn.Module, str, None] = None, *,
                    checkpoint: Optional[str] = None, check_fingerprint: bool = True, device=None):
    """Rebuild a model saved by ``save_pretrained`` (or an engine checkpoint) and load its weights.

    Args:
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
        backbone: a fresh (unadapted) backbone model, a backbone name for
            :func:`vpeft.backbones.build.create_backbone`, or None for the saved name.
        checkpoint: a local backbone weights file (with a name).
        check_fingerprint: refuse a backbone whose frozen weights differ from the ones
            the adapters were trained on (the fingerprint in the config).
        device: where to put the model (default: where the backbone is).

    Returns:
        a :class:`vpeft.VideoModel` (``kind: video_model``) or a
        :class:`vpeft.tasks.retrieval.RetrievalModel` (``kind: retrieval``).

    Every mismatch (method, options, backbone name or class, fingerprint, key or shape)
    is a ValueError that names the saved value and the given one.
    """
    cfg = read_adapter_config(directory)
    saved = cfg["backbone"]
    if backbone is None:
        if not saved.get("name"):
            raise ValueError(f"{directory}: the saved config names no backbone; pass backbone=model or a name")
        backbone = saved["name"]
    if isinstance(backbone, str):
        if saved.get("name") and backbone != saved["name"]:
            raise ValueError(f"{directory} was trained on backbone {saved['name']!r}, not {backbone!r}")
        model = create_backbone(backbone, checkpoint=checkpoint, num_frames=cfg["num_frames"])
    else:
        model = backbone
        if type(model).__name__ != saved.get("class"):
            raise ValueError(f"{directory} was trained on a {saved.get('class')} backbone, got a "
                             f"{type(model).__name__}")
    options = dict(cfg["options"])
    vm = adapt(model, cfg["method"], num_frames=int(cfg["num_frames"]), num_classes=cfg["num_classes"], **options)
    vm.backbone_name = saved.get("name")
    if device is not None:
        vm = vm.to(device)
    out = vm
    if cfg["kind"] == "retrieval":
        from .tasks.retrieval import RetrievalModel   # only for this kind: the tasks package is larger

        # built before the fingerprint: the retrieval model also trains a few backbone tensors
        out = RetrievalModel(vm, train_text=bool(cfg["extra"].get("train_text", False)))
    if check_fingerprint and saved.get("fingerprint"):
        got = backbone_fingerprint(vm)
        if got != saved["fingerprint"]:
            raise ValueError(f"{directory}: the backbone's frozen weights (fingerprint {got}) differ from those "
                             f"the adapters were trained on (fingerprint {saved['fingerprint']}); load the same "
                             "backbone weights, or pass check_fingerprint=False to load anyway")
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    if out is not vm:
        check_weights(state, out.trained_state_dict(), directory)
        out.load_trained_state_dict(state)
        return out
    check_weights(state, vm.adapter_state_dict(), directory)
    vm.load_adapter_state_dict(state)
    vm.classes = cfg.get("classes")
    return vm
