"""The one training loop behind ``vpeft train`` and ``vpeft eval``, for every task.

A :class:`~vpeft.engine.task.Task` supplies the model, data, loss and evaluation
(recognition by default; the video-language tasks from :func:`vpeft.tasks.build_task`).
The loop here owns torchrun DDP, autocast, gradient accumulation, the warm-up + cosine
schedule, gradient clipping, atomic checkpoints with exact mid-epoch resume,
metrics.jsonl / TensorBoard and progress bars.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from . import checkpoint as ckpt
from . import rundir
from .build import build_loader
from .config import ConfigError, dump
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier
from .runlog import ProgressLog, RunLogger
from .task import RecognitionTask, Task

log = logging.getLogger("vpeft")


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp32":
        return None
    if device.type != "cuda":
        raise ConfigError(f"train.precision={precision!r} needs a CUDA device; this run is on {device} "
                          "(use precision=fp32 or auto on CPU)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


_rng_state, _set_rng_state = ckpt.rng_state, ckpt.set_rng_state   # plain containers: weights_only=True loads them


class NonFiniteError(FloatingPointError):
    """A training batch or its loss is NaN/inf; raised before the optimizer step, so the
    weights are never updated with it."""


def _terminal() -> bool:
    """Whether progress bars are visible (tqdm writes to stderr)."""
    try:
        return os.isatty(2)
    except OSError:
        return False


class _LossModule(nn.Module):
    """The trained module plus its task's loss as one forward, so DDP sees the whole step."""

    def __init__(self, model: nn.Module, task: Task, device: torch.device, autocast):
        super().__init__()
        self.model = model
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "autocast", autocast)

    def forward(self, batch):
        return self.task.loss(self.model, batch, self.device, self.autocast)


class Trainer:
    """Trains a task's model on its training data and evaluates it.

    Everything that can be wrong with the configuration, the files or the model is
    checked here, in the constructor, before the first step.

    Args:
        cfg: a configuration from :func:`vpeft.engine.config.load_config`.
        info: this process's place in the process group (single process by default).
        task: what to train (default: recognition with a classifier; the video-language
            tasks come from :func:`vpeft.tasks.build_task`).
        resume: a checkpoint (directory, run directory or ``checkpoints/``) to continue.
        progress: show tqdm progress bars (rank 0 only).
        train: set up training (False: only evaluate, e.g. ``vpeft eval``).
        overwrite: a training run may replace a previous run in ``output_dir``
            (otherwise that is refused; see :func:`vpeft.engine.rundir.claim`).
        require_checkpoint: with ``resume``, a missing checkpoint is an error; with False
            the run starts fresh and says so (``--resume`` in a retry loop).

    A training Trainer holds ``output_dir``'s lock (rank 0) from construction until
    :meth:`fit` returns or :meth:`close` is called.
    """

    def __init__(self, cfg: Dict[str, Any], info: Optional[DistInfo] = None, *, task: Optional[Task] = None,
                 resume: Optional[str] = None, progress: bool = True, train: bool = True, overwrite: bool = False,
                 require_checkpoint: bool = True):
        self.cfg = cfg
        self.info = info or DistInfo()
        self.progress = progress and self.info.is_main   # bars only on rank 0, and only on a terminal
        self.run_lock = None
        if task is None:
            if cfg["task"]["name"] != "recognition":
                raise ConfigError(f"task.name={cfg['task']['name']!r}: pass task=vpeft.tasks.build_task(cfg, info)")
            task = RecognitionTask(cfg, self.info)
        self.task = task
        if train:
            resume = self._claim_output_dir(resume, overwrite, require_checkpoint)
        try:
            self._build(cfg, resume, train)
        except BaseException:
            self.close()   # a run that cannot start does not keep the directory locked
            raise

    def _build(self, cfg: Dict[str, Any], resume: Optional[str], train: bool) -> None:
        t, d = cfg["train"], cfg["data"]
        self.device = self.info.device
        self.amp_dtype = _autocast_dtype(t["precision"], self.device)
        seed = int(t["seed"])
        torch.manual_seed(seed)          # identical backbone and adapter init on every rank
        np.random.seed(seed)
        random.seed(seed)

        self.task.check(train)
        self.model = self.task.build(self.device)
        self.video_model = self.task.video_model(self.model)
        if d["num_frames"] is not None and d["num_frames"] != self.video_model.num_frames:
            raise ConfigError(f"data.num_frames={d['num_frames']} does not match the model's "
                              f"num_frames={self.video_model.num_frames}")
        self.train_ds = self.task.train_dataset(self.model) if train else None
        torch.manual_seed(seed + 1 + self.info.rank)   # dropout differs per rank

        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.history: List[Dict[str, Any]] = []
        self.skipped_total = 0
        self.train_time = 0.0
        self.train_clips = 0
        self.ddp = None
        if train:
            self._setup_training()
        if resume:
            self._resume(resume, train=train)

    # ------------------------------------------------------------------ set-up
    def _claim_output_dir(self, resume: Optional[str], overwrite: bool, require: bool) -> Optional[str]:
        """Lock ``output_dir`` on rank 0 (every rank learns the outcome); return the resume path or None."""
        if self.cfg["output_dir"] is None:
            self.cfg["output_dir"] = rundir.default_output_dir(None)
        self.cfg["output_dir"] = all_gather_objects(self.cfg["output_dir"], self.info)[0]   # rank 0's timestamp
        out = self.cfg["output_dir"]
        if resume and not require and not ckpt.has_checkpoint(resume):
            log.warning("--resume: no checkpoint in %s yet; starting a fresh run", resume)
            resume, overwrite = None, True    # what is there holds nothing to continue from
        error = None
        if self.info.is_main:
            try:
                self.run_lock = rundir.claim(out, resume=resume is not None, overwrite=overwrite)
            except rundir.RunDirError as e:
                error = str(e)
        error = all_gather_objects(error, self.info)[0]
        if error:
            raise rundir.RunDirError(error)
        return resume

    def close(self) -> None:
        """Release ``output_dir``'s lock (also done when :meth:`fit` returns)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _setup_training(self):
        t = self.cfg["train"]
        world, accum, gb = self.info.world, t["grad_accum"], t["batch_size"]
        if gb % (world * accum):
            raise ConfigError(f"train.batch_size={gb} (global) must be divisible by world size {world} x "
                              f"train.grad_accum={accum}")
        self.per_rank = gb // (world * accum)
        if len(self.train_ds) < gb:
            raise ConfigError(f"the training list has {len(self.train_ds)} videos, fewer than one global batch "
                              f"of train.batch_size={gb}")
        self.steps_per_epoch = len(self.train_ds) // gb
        self.total_steps = t["max_steps"] or t["epochs"] * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warmup = int(round(float(t["warmup_epochs"]) * self.steps_per_epoch))
        groups = [g for g in self.task.param_groups(self.model) if g["params"]]
        if not groups:
            raise ConfigError(f"method {self.video_model.method!r} left nothing to train")
        self.optimizer = torch.optim.AdamW(groups, lr=float(t["lr"]), betas=tuple(float(b) for b in t["betas"]),
                                           fused=self.device.type == "cuda")
        min_ratio = float(t["min_lr"]) / float(t["lr"]) if float(t["lr"]) > 0 else 0.0
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, total, warmup, min_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step_module = _LossModule(self.model, self.task, self.device, self._autocast)
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=ids,
                find_unused_parameters=self.video_model.spec.find_unused_parameters or self.task.find_unused_parameters)
        self.loader, self.sampler = build_loader(self.train_ds, self.per_rank, self.info, self.cfg, train=True)

    def _resume(self, path: str, train: bool):
        from ..pretrained import WEIGHTS_NAME, is_pretrained_dir, read_adapter_config

        if not train and is_pretrained_dir(path) and not os.path.isfile(os.path.join(path, ckpt.STATE)):
            # a save_pretrained directory: weights only
            saved = read_adapter_config(path)
            for key, mine in (("method", self.video_model.method), ("num_frames", self.video_model.num_frames)):
                if saved[key] != mine:
                    raise ConfigError(f"{path} holds weights for {key}={saved[key]!r}, this run has {key}={mine!r}")
            path = os.path.join(path, WEIGHTS_NAME)
        elif not (os.path.isfile(path) and path.endswith(".safetensors")):
            path = ckpt.find_checkpoint(path)   # verified once; a broken latest falls back with a warning
        weights, saved_cfg_text = ckpt.load_weights(path)
        if saved_cfg_text:
            import yaml

            saved = yaml.safe_load(saved_cfg_text)
            for key in ("backbone", "method", "num_frames"):
                if saved["model"][key] != self.cfg["model"][key]:
                    raise ConfigError(f"checkpoint {path!r} was trained with model.{key}={saved['model'][key]!r}, "
                                      f"this run has model.{key}={self.cfg['model'][key]!r}")
        self.task.load_state_dict(self.model, weights)
        if not train:
            return
        st = ckpt.load_state(path)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        self.global_step, self.epoch, self.step_in_epoch = st["step"], st["epoch"], st["step_in_epoch"]
        self._saved_step = self.global_step
        self.skipped_total = st.get("skipped_total", 0)
        self.history = list(st.get("history", []))
        rng = st["rng"]
        if len(rng) != self.info.world:
            log.warning("checkpoint holds RNG states for %d ranks, this run has %d: dropout masks after the "
                        "resume will not match an uninterrupted run", len(rng), self.info.world)
        _set_rng_state(rng[self.info.rank % len(rng)])
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", path,
                 self.global_step, self.epoch, self.step_in_epoch)

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _save(self, out_dir: str):
        if getattr(self, "_saved_step", None) == self.global_step:
            return   # this step is on disk already: one checkpoint per step
        rngs = all_gather_objects(_rng_state(), self.info)
        if not self.info.is_main:
            self._saved_step = self.global_step
            return
        state = {"step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": rngs, "skipped_total": self.skipped_total,
                 "history": self.history, "world": self.info.world}
        self._saved_step = self.global_step
        path = ckpt.save_checkpoint(os.path.join(out_dir, "checkpoints"), self.global_step,
                                    self.task.state_dict(self.model), state, dump(self.cfg),
                                    keep=int(self.cfg["train"]["keep_checkpoints"]),
                                    adapter_config=json.dumps(self.task.pretrained_config(self.model), indent=2))
        log.info("saved checkpoint %s", path)

    def _clip_status(self, batch) -> List[Any]:
        """``(file name, pixels all finite)`` for each clip of a training batch."""
        v = batch["video"]
        ok = torch.isfinite(v.flatten(1)).all(1).tolist() if v.is_floating_point() else [True] * v.shape[0]
        return [(self.train_ds.samples[int(i)].path, bool(f)) for i, f in zip(batch["index"], ok)]

    def _stop_nonfinite(self, step_loss: float, clips: List[Any], grad_norm: Optional[float] = None) -> None:
        """Raise :class:`NonFiniteError` on every rank, naming the step, the clips and a hint."""
        bad = [p for p, ok in clips if not ok]
        everyone = [p for names in all_gather_objects(bad or [p for p, _ in clips], self.info) for p in names]
        bad_anywhere = any(all_gather_objects(bool(bad), self.info))
        shown = ", ".join(everyone[:8]) + (f" and {len(everyone) - 8} more" if len(everyone) > 8 else "")
        step = self.global_step + 1
        if bad_anywhere:
            raise NonFiniteError(
                f"training stopped before optimizer step {step}: NaN/inf pixels in the batch, clip(s) {shown}; "
                "the weights were not updated. Hint: check how these files decode and what the transforms do "
                "with them (the clips a model gets must be finite)")
        what = f"the loss is {step_loss}" if grad_norm is None else f"the gradient norm is {grad_norm}"
        raise NonFiniteError(
            f"training stopped before optimizer step {step}: {what} although the batch is finite "
            f"(clips {shown}); the weights were not updated. Hint: lower train.lr, set train.clip_grad "
            "(e.g. 1.0), or use train.precision=fp32")

    # ------------------------------------------------------------------ training
    def fit(self) -> Dict[str, Any]:
        """Train to the end of the schedule (or ``stop_at_step``); return a summary dict."""
        cfg, t = self.cfg, self.cfg["train"]
        out = cfg["output_dir"]
        if self.info.is_main:
            os.makedirs(out, exist_ok=True)
            ckpt.remove_leftovers(out)   # safe: this process holds the directory's lock
        logger = RunLogger(out, enabled=self.info.is_main, tensorboard=bool(cfg["tensorboard"]))
        if self.info.is_main:
            ckpt.atomic_write_text(os.path.join(out, "config.yaml"), dump(cfg))
        logger.write({"event": "start" if self.global_step == 0 else "resume", "step": self.global_step,
                      "task": self.task.name, "method": self.video_model.method,
                      "trainable_parameters": self._trainable(),
                      "world": self.info.world, "device": str(self.device)})
        step_module = self.ddp or self.step_module
        accum = t["grad_accum"]
        eval_every = int(t["eval_every"])
        stop_at = t.get("stop_at_step")
        last_eval: Dict[str, Any] = {}
        lines = ProgressLog(self.total_steps, self.global_step, every_steps=int(t["log_every"]),
                            enabled=self.info.is_main and not (self.progress and _terminal()))
        try:
            while self.global_step < self.total_steps and (stop_at is None or self.global_step < stop_at):
                epoch = self.epoch
                self.sampler.set_epoch(epoch, start=self.step_in_epoch * accum * self.per_rank)
                self.model.train()
                it = iter(self.loader)
                skipped = torch.zeros(1, dtype=torch.long)
                skipped_names: List[str] = []      # this rank's unreadable videos, for the epoch summary
                epoch_steps = min(self.steps_per_epoch, self.total_steps - (self.global_step - self.step_in_epoch))
                bar = tqdm(total=epoch_steps, initial=self.step_in_epoch, disable=None if self.progress else True,
                           desc=f"epoch {epoch + 1}/{self.epochs} train", unit="step", leave=False)
                while (self.step_in_epoch < self.steps_per_epoch and self.global_step < self.total_steps
                       and (stop_at is None or self.global_step < stop_at)):
                    t0 = time.perf_counter()
                    losses, clips = [], []
                    for k in range(accum):
                        batch = next(it)
                        if batch["failed"]:
                            skipped += len(batch["failed"])
                            skipped_names.extend(p for p in batch["failed"] if p not in skipped_names)
                            log.warning("rank %d: %d unreadable video(s) replaced: %s", self.info.rank,
                                        len(batch["failed"]), batch["failed"][:3])
                        clips += self._clip_status(batch)
                        sync = self.ddp.no_sync() if (self.ddp is not None and k < accum - 1) \
                            else contextlib.nullcontext()
                        with sync:
                            loss = step_module(batch)
                            self.scaler.scale(loss / accum).backward()
                        losses.append(loss.detach())
                    # before the optimizer step: a NaN/inf batch or loss on any rank stops every rank
                    n_bad = sum(1 for _, ok in clips if not ok)
                    red = all_reduce_sum(torch.stack([torch.stack(losses).mean().float().cpu(),
                                                      torch.tensor(float(n_bad))]), self.info)
                    step_loss = float(red[0]) / self.info.world
                    if not math.isfinite(step_loss) or float(red[1]) > 0:
                        self._stop_nonfinite(step_loss, clips)
                    if t["clip_grad"]:
                        self.scaler.unscale_(self.optimizer)
                        norm = nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                                        float(t["clip_grad"]))
                        if not self.scaler.is_enabled() and not math.isfinite(float(norm)):   # fp16: scaler skips
                            self._stop_nonfinite(step_loss, clips, grad_norm=float(norm))
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.scheduler.step()
                    self.global_step += 1
                    self.step_in_epoch += 1
                    self.train_time += time.perf_counter() - t0
                    self.train_clips += t["batch_size"]
                    self.history.append({"step": self.global_step, "loss": step_loss, "lr": lr})
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                    lines.step(self.global_step, step_loss, lr, self.train_clips / max(self.train_time, 1e-9))
                    if self.global_step % int(t["log_every"]) == 0 or self.global_step == self.total_steps:
                        logger.write({"split": "train", "step": self.global_step, "epoch": epoch + 1,
                                      "loss": step_loss, "lr": lr,
                                      "clips_per_s": self.train_clips / max(self.train_time, 1e-9)},
                                     step=self.global_step)
                    ce = int(t["checkpoint_every"])
                    if ce and self.global_step % ce == 0:
                        self._save(out)
                bar.close()
                epoch_end = self.step_in_epoch >= self.steps_per_epoch or self.global_step >= self.total_steps
                n_skipped = int(all_reduce_sum(skipped, self.info))
                self.skipped_total += n_skipped
                if n_skipped:
                    log.warning("epoch %d: %d unreadable video(s) were skipped and replaced: %s%s", epoch + 1, n_skipped,
                                ", ".join(skipped_names[:20]), f" and {len(skipped_names) - 20} more on rank "
                                f"{self.info.rank}" if len(skipped_names) > 20 else "")
                if not epoch_end:
                    self._save(out)   # stopped early (stop_at_step): keep the exact position
                    break
                self.epoch += 1
                self.step_in_epoch = 0
                logger.write({"event": "epoch_end", "epoch": self.epoch, "step": self.global_step,
                              "skipped_videos": n_skipped, "skipped_videos_total": self.skipped_total,
                              "skipped_video_names": skipped_names})
                if not int(t["checkpoint_every"]):
                    self._save(out)
                finished = self.global_step >= self.total_steps
                if self.task.has_eval() and (finished or (eval_every and self.epoch % eval_every == 0)):
                    last_eval = self.evaluate()
                    logger.write({"split": "val", "step": self.global_step, "epoch": self.epoch, **last_eval},
                                 step=self.global_step)
            if getattr(self, "_saved_step", None) != self.global_step:
                self._save(out)   # the final (or stop_at_step) position is always on disk
        finally:
            logger.close()
            self.close()
        barrier(self.info)
        return {"steps": self.global_step, "epochs": self.epoch, "history": self.history,
                "skipped_videos": self.skipped_total, "eval": last_eval,
                "train_time_s": self.train_time, "clips_per_s": self.train_clips / max(self.train_time, 1e-9),
                "trainable_parameters": self._trainable()}

    def _trainable(self) -> int:
        return sum(p.numel() for g in self.task.param_groups(self.model) for p in g["params"])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Dict[str, Any]:
        """The task's evaluation (for recognition: top-1, top-5, mean-class accuracy and loss)."""
        if not self.task.has_eval():
            raise ConfigError("data.val_list is not set: nothing to evaluate")
        return self.task.evaluate(self.model, self.device, self._autocast, progress=self.progress)
