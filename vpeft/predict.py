"""``vpeft predict``: top-k classes of video files with trained weights.

Works for a recognition model (its classifier) and for a video-text model (class prompts
matched in the joint space, with the saved class names). The weights come from a
``save_pretrained`` directory, an engine checkpoint or a run directory (its latest
checkpoint). A random-init backbone is rebuilt with the run's seed, so that its weights
(checked by the fingerprint) are the ones the adapters were trained on.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger("vpeft")

__all__ = ["load_for_predict", "predict"]


def _resolve(adapters: str) -> str:
    from .engine.checkpoint import find_checkpoint
    from .pretrained import is_pretrained_dir

    if is_pretrained_dir(adapters):
        return adapters
    return find_checkpoint(adapters)


def load_for_predict(adapters: str, device: Optional[str] = None):
    """``(model, class names, template)`` from ``adapters`` (see the module docstring)."""
    import yaml

    from .loading import from_pretrained
    from .pretrained import read_adapter_config

    path = _resolve(adapters)
    cfg = read_adapter_config(path)
    run_cfg: Dict[str, Any] = {}
    if os.path.isfile(os.path.join(path, "config.yaml")):
        with open(os.path.join(path, "config.yaml")) as f:
            run_cfg = yaml.safe_load(f) or {}
    model_cfg = run_cfg.get("model", {})
    torch.manual_seed(int(run_cfg.get("train", {}).get("seed", 0)))   # the run's backbone init
    if cfg["kind"] != "video_model":
        raise ValueError(f"{path} holds a {cfg['kind']} model; vpeft predict classifies videos "
                         "(a recognition or video-text model)")
    vm = from_pretrained(path, checkpoint=model_cfg.get("checkpoint"), device=device)
    names = cfg.get("classes")
    if names is None:
        raise ValueError(f"{path} saved no class names (adapter_config.json 'classes'); train with "
                         "data.class_names or save_pretrained(..., classes=[...])")
    template = run_cfg.get("task", {}).get("template", "a video of {}")
    return vm.eval(), list(names), template


@torch.no_grad()
def predict(videos: Sequence[str], adapters: str, *, topk: int = 5, clips: int = 1, crops: int = 1,
            device: Optional[str] = None) -> List[Dict[str, Any]]:
    """One record per video: ``{"video", "top": [[class, probability], ...]}`` or ``{"video", "error"}``.

    Each video's ``clips x crops`` views are scored and their softmax outputs averaged.
    A missing or undecodable video gets an ``error`` record and is skipped.
    """
    from .data import TestTransform, VideoDataset
    from .data.lists import Sample
    from .data.video import VideoDecodeError
    from .tasks.videotext import VideoTextClassifier

    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    if clips < 1 or crops not in (1, 3):
        raise ValueError(f"--views {clips}x{crops}: expected CLIPSxCROPS with CLIPS >= 1 and CROPS 1 or 3")
    vm, names, template = load_for_predict(adapters, device)
    if vm.num_classes is None:
        if not vm.spec.joint_space or vm.text_tower is None:
            raise ValueError(f"this {vm.method} model has no classifier and no text tower to match class prompts")
        clf = VideoTextClassifier(vm, names, template).eval()
        score = clf
    else:
        if vm.num_classes != len(names):
            raise ValueError(f"the classifier has {vm.num_classes} classes but {len(names)} class names were saved")
        score = vm
    size = vm.tower.image_size[0]
    ds = VideoDataset(os.sep, [Sample(os.path.abspath(v), 0) for v in videos], vm.num_frames,
                      TestTransform(size, vm.tower.mean, vm.tower.std, num_crops=crops), num_clips=clips,
                      max_replacements=0)
    p = next(vm.parameters())
    out = []
    for i, path in enumerate(videos):
        try:
            views, _ = ds._load(i, np.random.default_rng(0))
        except VideoDecodeError as e:
            out.append({"video": path, "error": str(e)})
            continue
        prob = score(views.to(p.device, p.dtype)).float().softmax(-1).mean(0)
        k = min(topk, len(names))
        val, idx = prob.topk(k)
        out.append({"video": path, "top": [[names[int(j)], round(float(v), 4)] for v, j in zip(val, idx)]})
    return out
