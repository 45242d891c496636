"""Trained weights on disk, PEFT's way: ``adapter_config.json`` + ``adapter_model.safetensors``.

``adapter_config.json`` says how to rebuild the model around the weights: the method and
its options, ``num_frames``, ``num_classes`` and the class names, the backbone's name
and a fingerprint of its frozen weights, the kind of model (a :class:`vpeft.VideoModel`
or a retrieval model around one) and the vpeft version. ``adapter_model.safetensors``
holds only the trained weights (:meth:`vpeft.VideoModel.adapter_state_dict`; for
retrieval also the retrieval head and matching MLPs).

The engine's checkpoints are such directories too (plus the resume state), so
``vpeft.from_pretrained(run_dir / "checkpoints" / "step_00000120")`` (:mod:`vpeft.loading`)
and ``--adapters`` take either. This module is the format only and imports no model code.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from ._version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KINDS = ("video_model", "retrieval")

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_config", "save_pretrained", "backbone_fingerprint",
           "is_pretrained_dir", "read_adapter_config", "check_weights"]


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def backbone_fingerprint(video_model) -> str:
    """SHA-256 (first 16 hex digits) of the frozen backbone weights: every backbone tensor that is
    not trained, in key order, shape and bytes. Two models with the same method and options on the
    same backbone weights have the same fingerprint."""
    trained = video_model._trained_keys()
    h = hashlib.sha256()
    for k, v in sorted(video_model.state_dict().items()):
        if not k.startswith("backbone.") or k in trained:
            continue
        t = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def adapter_config(video_model, *, kind: str = "video_model", classes: Optional[Sequence[str]] = None,
                   backbone_name: Optional[str] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``adapter_config.json`` record of ``video_model`` (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    return {"vpeft_version": __version__, "kind": kind, "method": video_model.method,
            "options": _jsonable(video_model.options), "num_frames": video_model.num_frames,
            "num_classes": video_model.num_classes, "classes": list(classes) if classes is not None else None,
            "backbone": {"name": backbone_name or getattr(video_model, "backbone_name", None),
                         "class": type(video_model.backbone).__name__,
                         "fingerprint": backbone_fingerprint(video_model)},
            "extra": dict(extra or {})}


def save_pretrained(directory: str, config: Dict[str, Any], state: Mapping[str, torch.Tensor]) -> str:
    """Write ``config`` and ``state`` (the trained tensors) into ``directory``; return it."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return directory


def is_pretrained_dir(path: str) -> bool:
    """Whether ``path`` holds ``adapter_config.json`` and ``adapter_model.safetensors``."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))


def read_adapter_config(directory: str) -> Dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``directory`` (a clear error when it is missing or not JSON)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a saved vpeft model: {CONFIG_NAME} is missing "
                                f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, written by save_pretrained)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("kind", "method", "options", "num_frames", "num_classes", "backbone"):
        if key not in cfg:
            raise ValueError(f"{path}: no {key!r} entry; was it written by vpeft's save_pretrained?")
    return cfg


def check_weights(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse ``state`` unless its keys and shapes are exactly ``expected``'s, naming both sides."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: the saved weights do not fit the rebuilt model: {len(missing)} missing "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{where}: {k} is {tuple(v.shape)} in the saved weights, "
                             f"{tuple(expected[k].shape)} in the rebuilt model")
