"""Checkpoints: only the trained weights plus what an exact resume needs, written atomically.

A checkpoint is a directory ``checkpoints/step_00000120/`` holding

* ``adapter_model.safetensors``: the task's trained weights (for recognition
  :meth:`VideoModel.adapter_state_dict`: adapters, side network, head and their buffers;
  never the frozen backbone), with the run config as metadata, and
  ``adapter_config.json`` describing them: a checkpoint is also a ``save_pretrained``
  directory (:mod:`vpeft.pretrained`), loadable with ``vpeft.from_pretrained``;
* ``state.pt``: step and epoch position, optimizer, scheduler, grad-scaler and every
  rank's RNG states;
* ``config.yaml``: the run configuration.

It is written into a temporary sibling directory and renamed into place (a rename is
atomic on POSIX), and only then does the ``latest`` pointer file change, itself through
a temporary file and ``os.replace``. A process killed at any moment leaves the previous
checkpoint and pointer intact.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"   # the save_pretrained names (vpeft.pretrained)
ADAPTER_CONFIG = "adapter_config.json"
STATE = "state.pt"
POINTER = "latest"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def save_checkpoint(ckpt_dir: str, step: int, weights: Dict[str, torch.Tensor], state: Dict[str, Any],
                    config_yaml: str, keep: int = 2, adapter_config: Optional[str] = None) -> str:
    """Write checkpoint ``step`` under ``ckpt_dir`` atomically; return its directory.

    ``adapter_config`` (JSON text) is written as ``adapter_config.json`` next to the weights.

    Older checkpoints beyond the newest ``keep`` are removed after the pointer moves.
    """
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step_{step:08d}"
    k = 0
    while os.path.exists(os.path.join(ckpt_dir, name)):   # never overwrite what the pointer may name
        k += 1
        name = f"step_{step:08d}.{k}"
    final = os.path.join(ckpt_dir, name)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=ckpt_dir)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"config": config_yaml, "step": str(step)})
        torch.save(state, os.path.join(tmp, STATE))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
        files = [WEIGHTS, STATE, "config.yaml"]
        if adapter_config is not None:
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
                f.write(adapter_config)
            files.append(ADAPTER_CONFIG)
        for fn in files:
            _fsync_file(os.path.join(tmp, fn))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(ckpt_dir)
    atomic_write_text(os.path.join(ckpt_dir, POINTER), name + "\n")
    _prune(ckpt_dir, keep, protect=name)
    return final


def _complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (WEIGHTS, STATE))


def _prune(ckpt_dir: str, keep: int, protect: str) -> None:
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step_"))
    for n in names[:-keep] if keep > 0 else []:
        if n != protect:
            shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)


def find_checkpoint(path: str) -> str:
    """Resolve a run directory, a ``checkpoints`` directory or a checkpoint directory to
    the checkpoint directory to load (following the ``latest`` pointer)."""
    for cand in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(cand) and _complete(cand):
            return cand
        pointer = os.path.join(cand, POINTER)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                target = os.path.join(cand, f.read().strip())
            if _complete(target):
                return target
            raise FileNotFoundError(f"{pointer} names {target!r}, which is not a complete checkpoint")
    raise FileNotFoundError(f"no checkpoint at {path!r}: expected a run directory, its checkpoints/ directory, "
                            f"or a directory holding {WEIGHTS} and {STATE}")


def load_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Trained weights and the saved config text from a checkpoint (directory or ``.safetensors`` file)."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        f = path
    else:
        f = os.path.join(find_checkpoint(path), WEIGHTS)
    from safetensors import safe_open

    with safe_open(f, "pt") as h:
        meta = h.metadata() or {}
    return load_file(f), meta.get("config")


def load_state(ckpt: str) -> Dict[str, Any]:
    """The resume state (``state.pt``) of a checkpoint directory."""
    return torch.load(os.path.join(find_checkpoint(ckpt), STATE), map_location="cpu", weights_only=False)


__all__ = ["save_checkpoint", "find_checkpoint", "load_weights", "load_state", "atomic_write_text"]
