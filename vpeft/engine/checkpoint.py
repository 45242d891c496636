"""Checkpoints: only the trained weights plus what an exact resume needs, written atomically
and verified when read.

A checkpoint is a directory ``checkpoints/step_00000120/`` holding

* ``adapter_model.safetensors``: the task's trained weights (for recognition
  :meth:`VideoModel.adapter_state_dict`: adapters, side network, head and their buffers;
  never the frozen backbone), with the run config as metadata, and
  ``adapter_config.json`` describing them: a checkpoint is also a ``save_pretrained``
  directory (:mod:`vpeft.pretrained`), loadable with ``vpeft.from_pretrained``;
* ``state.pt``: step and epoch position, optimizer, scheduler, grad-scaler and every
  rank's RNG states, as plain containers and tensors only (it is read with
  ``torch.load(weights_only=True)``, so a file someone handed you cannot run code);
* ``config.yaml``: the run configuration;
* ``manifest.json``: each file's size and SHA-256, written last.

The files are written into a temporary sibling directory ``.tmp-step_...`` and the
directory is renamed into place (atomic on POSIX); only then does the ``latest``
pointer file change, itself through a temporary file and ``os.replace``. A process
killed at any moment leaves the previous checkpoint and pointer intact; a half-written
temporary directory is removed by :func:`remove_leftovers` when the next run starts.

Reading (:func:`find_checkpoint`) verifies every file against the manifest. When the
checkpoint ``latest`` names is corrupt or incomplete, the newest other checkpoint that
verifies is used and a warning names what was wrong.

Files and directories are created with the process umask (0644 / 0755 under umask 022),
so teammates on a shared filesystem can evaluate or resume them. A full disk or a
read-only filesystem is reported as :class:`CheckpointWriteError` with a plain message,
the previous checkpoint untouched.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import shutil
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

WEIGHTS = "adapter_model.safetensors"   # the save_pretrained names (vpeft.pretrained)
ADAPTER_CONFIG = "adapter_config.json"
STATE = "state.pt"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
POINTER = "latest"
TMP_PREFIX = ".tmp-"

log = logging.getLogger("vpeft")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, unsafe or mismatched); one-line message."""


class NoCheckpoint(CheckpointError, FileNotFoundError):
    """There is no checkpoint at the given place at all (as opposed to a broken one)."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed for a reason outside the program (full disk, read-only filesystem)."""


# ---------------------------------------------------------------------------- writing
def _mount_point(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def _explain(e: OSError, path: str) -> OSError:
    """A plain-language error for the write failures a user can act on; ``e`` itself otherwise."""
    if e.errno == errno.ENOSPC:
        return CheckpointWriteError(errno.ENOSPC, f"no space left on device {_mount_point(path)} writing {path}; "
                                                  "the previous checkpoint is intact")
    if e.errno == errno.EDQUOT:
        return CheckpointWriteError(errno.EDQUOT, f"disk quota exceeded on {_mount_point(path)} writing {path}; "
                                                  "the previous checkpoint is intact")
    if e.errno == errno.EROFS:
        return CheckpointWriteError(errno.EROFS, f"{path} is read-only (filesystem {_mount_point(path)} is mounted "
                                                 "read-only); the previous checkpoint is intact")
    return e


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


def _write_bytes(path: str, data: bytes) -> None:
    """Create ``path`` (mode from the umask), write ``data`` and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (mode from the umask)."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f"{TMP_PREFIX}{os.path.basename(path)}-{os.getpid()}")
    try:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _write_bytes(tmp, text.encode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _explain(e, path) from e
        raise
    _fsync_dir(d)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _serialize(weights: Dict[str, torch.Tensor], state: Dict[str, Any], config_yaml: str, step: int,
               adapter_config: Optional[str] = None):
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    blobs = {WEIGHTS: st_save(tensors, metadata={"config": config_yaml, "step": str(step)}),
             STATE: buf.getvalue(), CONFIG: config_yaml.encode()}
    if adapter_config is not None:
        blobs[ADAPTER_CONFIG] = adapter_config.encode()
    return blobs


def save_checkpoint(ckpt_dir: str, step: int, weights: Dict[str, torch.Tensor], state: Dict[str, Any],
                    config_yaml: str, keep: int = 2, adapter_config: Optional[str] = None) -> str:
    """Write checkpoint ``step`` under ``ckpt_dir`` atomically; return its directory.

    ``adapter_config`` (JSON text) is written as ``adapter_config.json`` next to the weights
    (listed in the manifest like every file). Everything is serialised in memory first, so a failure to write (a full disk) is an
    ``OSError`` with its errno, reported as :class:`CheckpointWriteError`. Saving a step
    that already has a checkpoint replaces it (there is one checkpoint per step). Older
    checkpoints beyond the newest ``keep`` are removed after the pointer moves.
    """
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f"{TMP_PREFIX}{name}-{os.getpid()}")
    blobs = _serialize(weights, state, config_yaml, step, adapter_config)
    where = ckpt_dir
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.mkdir(tmp)
        files = {}
        for fn, data in blobs.items():
            where = os.path.join(tmp, fn)
            _write_bytes(where, data)
            files[fn] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        where = os.path.join(tmp, MANIFEST)
        _write_bytes(where, (json.dumps({"format": 1, "step": step, "files": files}, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        where = final
        if os.path.exists(final):   # the same step again: move the old one aside, never leave two
            old = os.path.join(ckpt_dir, f"{TMP_PREFIX}old-{name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _explain(e, where.replace(tmp, final)) from e
        raise
    _fsync_dir(ckpt_dir)
    atomic_write_text(os.path.join(ckpt_dir, POINTER), name + "\n")
    _prune(ckpt_dir, keep, protect=name)
    return final


def _steps(ckpt_dir: str) -> List[str]:
    """Checkpoint directory names under ``ckpt_dir``, oldest first."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith("step_") and os.path.isdir(os.path.join(ckpt_dir, n)))


def _prune(ckpt_dir: str, keep: int, protect: str) -> None:
    names = _steps(ckpt_dir)
    for n in names[:-keep] if keep > 0 else []:
        if n != protect:
            shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)


def remove_leftovers(run_dir: str) -> List[str]:
    """Remove ``.tmp-*`` files and directories that interrupted writes left in ``run_dir``
    and ``run_dir/checkpoints``; return what was removed. Call it only while holding the
    run directory's lock (no other writer can be mid-write then)."""
    removed = []
    for d in (run_dir, os.path.join(run_dir, "checkpoints")):
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for n in names:
            if n.startswith(TMP_PREFIX):
                p = os.path.join(d, n)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
                removed.append(p)
    if removed:
        log.info("removed %d leftover temporary file(s) of interrupted writes: %s", len(removed),
                 ", ".join(os.path.basename(p) for p in removed[:5]))
    return removed


# ---------------------------------------------------------------------------- reading
def verify(ckpt: str) -> Optional[str]:
    """Why checkpoint directory ``ckpt`` cannot be used, or None when every file matches its manifest."""
    mpath = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(mpath):
        return f"{MANIFEST} is missing (an incomplete write)"
    try:
        with open(mpath) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for fn in (WEIGHTS, STATE):
        if fn not in files:
            return f"{MANIFEST} does not list {fn}"
    for fn, meta in files.items():
        p = os.path.join(ckpt, fn)
        if not os.path.isfile(p):
            return f"{fn} is missing"
        size = os.path.getsize(p)
        if size != meta["size"]:
            return f"{fn} has {size} bytes, the manifest says {meta['size']} (truncated or overwritten)"
        if _sha256(p) != meta["sha256"]:
            return f"{fn} does not match its SHA-256 in the manifest (corrupted)"
    return None


def _is_checkpoint_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in (MANIFEST, WEIGHTS, STATE))


def find_checkpoint(path: str) -> str:
    """Resolve a run directory, a ``checkpoints`` directory or a checkpoint directory to
    a verified checkpoint directory.

    For a run or ``checkpoints`` directory the ``latest`` pointer's target is tried
    first, then the other kept checkpoints, newest first; each one skipped is logged
    with the reason. A checkpoint directory named directly must verify itself.

    Raises:
        NoCheckpoint: nothing checkpoint-like is there.
        CheckpointError: checkpoints are there but none verifies (each reason listed).
    """
    if os.path.isdir(path) and _is_checkpoint_dir(path):
        why = verify(path)
        if why:
            raise CheckpointError(f"checkpoint {path} is unusable: {why}")
        return path
    for cand in (os.path.join(path, "checkpoints"), path):
        names = _steps(cand)
        pointer = os.path.join(cand, POINTER)
        if not names and not os.path.isfile(pointer):
            continue
        order = list(reversed(names))
        if os.path.isfile(pointer):
            with open(pointer) as f:
                target = f.read().strip()
            order = [target] + [n for n in order if n != target]
        problems = []
        for n in order:
            full = os.path.join(cand, n)
            why = verify(full) if os.path.isdir(full) else "the directory is missing"
            if why is None:
                if problems:
                    log.warning("checkpoint %s is unusable (%s); using the previous kept checkpoint %s instead",
                                problems[0][0], problems[0][1], full)
                return full
            problems.append((full, why))
        raise CheckpointError(f"no usable checkpoint under {cand}: " +
                              "; ".join(f"{os.path.basename(p)}: {w}" for p, w in problems))
    raise NoCheckpoint(f"no checkpoint at {path!r}: expected a run directory, its checkpoints/ directory, "
                       f"or a checkpoint directory holding {WEIGHTS}, {STATE} and {MANIFEST}")


def has_checkpoint(path: str) -> bool:
    """Whether ``path`` holds anything checkpoint-like (a broken one counts: it is reported on load)."""
    try:
        find_checkpoint(path)
    except NoCheckpoint:
        return False
    except CheckpointError:
        return True
    return True


def load_weights(path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Trained weights and the saved config text from a checkpoint (directory or ``.safetensors`` file)."""
    from safetensors import SafetensorError, safe_open

    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path} is not a .safetensors file nor a checkpoint or run directory")
        f = path
    else:
        f = os.path.join(find_checkpoint(path), WEIGHTS)
    try:
        with safe_open(f, "pt") as h:
            meta = h.metadata() or {}
            return {k: h.get_tensor(k) for k in h.keys()}, meta.get("config")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


def load_state(ckpt: str) -> Dict[str, Any]:
    """The resume state (``state.pt``) of a checkpoint, loaded with ``weights_only=True``."""
    f = os.path.join(find_checkpoint(ckpt), STATE)
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler's errors have many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f} could not be loaded safely (weights_only=True): {first}. A state.pt holds "
                              "only tensors and plain containers; this one holds something else") from None


def _key_summary(label: str, keys: List[str]) -> str:
    return f"{len(keys)} {label}" + (f" (e.g. {', '.join(keys[:3])})" if keys else "")


def backbone_load_error(path: str, model: torch.nn.Module, error: BaseException) -> CheckpointError:
    """A one-line :class:`CheckpointError` for a backbone weights file (``--checkpoint``)
    that failed to load into ``model``: unreadable, or which keys are missing or unexpected
    (with counts) and which shapes differ."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not (isinstance(error, RuntimeError) and "loading state_dict" in str(error)):
        return CheckpointError(f"backbone weights file {path} (--checkpoint / model.checkpoint) is not a readable "
                               f"checkpoint: {type(error).__name__}: {first}")
    try:
        from open_clip.factory import load_state_dict

        sd = load_state_dict(path)
    except Exception:  # noqa: BLE001 - fall back to the raw message
        return CheckpointError(f"backbone weights file {path} does not fit the backbone: {first}")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(getattr(sd[k], "shape", ())))
    return CheckpointError(f"backbone weights file {path} does not fit {type(model).__name__} "
                           f"({len(own)} tensors): {_key_summary('missing keys', missing)}, "
                           f"{_key_summary('unexpected keys', unexpected)}, "
                           f"{_key_summary('shape mismatches', shapes)}; is it for this model.backbone?")


# ---------------------------------------------------------------------------- RNG states
def rng_state() -> Dict[str, Any]:
    """This process's torch, numpy, python (and CUDA) RNG states as tensors and plain
    containers only, so that ``torch.load(weights_only=True)`` reads them back."""
    npst = np.random.get_state(legacy=False)
    st = {"torch": torch.get_rng_state(),
          "numpy": {"bit_generator": npst["bit_generator"], "key": torch.from_numpy(npst["state"]["key"].astype(np.int64)),
                    "pos": int(npst["state"]["pos"]), "has_gauss": int(npst["has_gauss"]),
                    "gauss": float(npst["gauss"])},
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss_next = st["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


__all__ = ["save_checkpoint", "find_checkpoint", "has_checkpoint", "verify", "load_weights", "load_state",
           "atomic_write_text", "remove_leftovers", "backbone_load_error", "rng_state", "set_rng_state", "CheckpointError",
           "NoCheckpoint", "CheckpointWriteError"]
