"""What a task gives the one training loop, and the recognition task (a classifier head).

The :class:`~vpeft.engine.trainer.Trainer` owns the loop: torchrun DDP, autocast,
gradient accumulation, the warm-up + cosine schedule, atomic checkpoints with exact
mid-epoch resume, metrics.jsonl and TensorBoard, progress. A :class:`Task` supplies the
rest: the trained module, the training set, the loss of a batch, the optimizer's
parameter groups, the evaluation, and the weights to save. The video-language tasks
(zero-shot, few-shot, base-to-novel, retrieval) live in :mod:`vpeft.tasks` and subclass
this; the engine never imports them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from .build import build_dataset, build_loader, build_video_model, check_data, resolve_classes
from .config import ConfigError
from .distributed import DistInfo, all_gather_objects, all_reduce_sum

log = logging.getLogger("vpeft")


class Task:
    """One kind of run. Subclasses set :attr:`name` and implement the methods below.

    The trained module returned by :meth:`build` is what the optimizer, DDP and the
    checkpoints see; :meth:`video_model` finds the :class:`vpeft.VideoModel` inside it.
    :meth:`loss` runs inside DDP's forward, so every trained parameter it touches is
    synchronised.
    """

    name = "task"
    find_unused_parameters = False
    """Whether some trained parameters get no gradient from :meth:`loss` (DDP must look for them),
    beyond what the method itself declares."""

    def __init__(self, cfg: Dict[str, Any], info: Optional[DistInfo] = None):
        self.cfg = cfg
        self.info = info or DistInfo()

    # -- set-up ------------------------------------------------------------
    def check(self, train: bool) -> None:
        """Fail early (before the backbone is built) on bad files or settings."""

    def build(self, device: torch.device) -> nn.Module:
        """The trained module, on ``device``."""
        raise NotImplementedError

    def video_model(self, model: nn.Module):
        """The :class:`vpeft.VideoModel` in ``model``."""
        return model

    def train_dataset(self, model: nn.Module):
        """The training dataset (items as :class:`vpeft.data.VideoDataset`'s)."""
        raise NotImplementedError

    def has_eval(self) -> bool:
        """Whether :meth:`evaluate` has data to run on."""
        return bool(self.cfg["data"]["val_list"])

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """AdamW groups: weight decay on matrices, none on biases, norms and temporal taps."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decay = float(self.cfg["train"]["weight_decay"])
        return [{"params": [p for n, p in params if p.ndim >= 2], "weight_decay": decay},
                {"params": [p for n, p in params if p.ndim < 2], "weight_decay": 0.0}]

    # -- the step ----------------------------------------------------------
    def loss(self, model: nn.Module, batch: Dict[str, Any], device: torch.device,
             autocast: Callable[[], Any]) -> torch.Tensor:
        """The scalar loss of one (per-rank) micro-batch."""
        raise NotImplementedError

    # -- evaluation --------------------------------------------------------
    def evaluate(self, model: nn.Module, device: torch.device, autocast: Callable[[], Any],
                 progress: bool = False) -> Dict[str, Any]:
        """Metrics on the evaluation data (every rank calls it; all return the same dict)."""
        raise NotImplementedError

    # -- trained weights ---------------------------------------------------
    def state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """Only the trained weights of ``model`` (what a checkpoint holds)."""
        return self.video_model(model).adapter_state_dict()

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`state_dict`'s output (strict: a mismatch names the keys)."""
        self.video_model(model).load_adapter_state_dict(state)

    def pretrained_config(self, model: nn.Module) -> Dict[str, Any]:
        """The ``adapter_config.json`` record saved next to :meth:`state_dict`'s weights."""
        return self.video_model(model).pretrained_config(classes=self.classes())

    def classes(self) -> Optional[List[str]]:
        """Class names saved with the weights (for ``vpeft predict``), or None."""
        return None


def eval_batch_size(cfg: Dict[str, Any], info: DistInfo) -> int:
    """Per-rank clips per evaluation batch: the training micro-batch divided by the views per video."""
    d, t = cfg["data"], cfg["train"]
    views = d["test_clips"] * d["test_crops"]
    batch = max(1, int(t["batch_size"]) // (info.world * int(t["grad_accum"])))
    return max(1, batch // views)


class RecognitionTask(Task):
    """Classification with a head on the adapted backbone (``task.name: recognition``)."""

    name = "recognition"

    def __init__(self, cfg, info=None):
        super().__init__(cfg, info)
        self.num_classes, self.class_names = resolve_classes(cfg)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=float(cfg["train"]["label_smoothing"]))
        self.val_ds = None

    def check(self, train: bool) -> None:
        check_data(self.cfg, self.num_classes, self.class_names, train=train)

    def build(self, device):
        model = build_video_model(self.cfg, self.num_classes, device)
        if self.cfg["data"]["val_list"]:
            self.val_ds = build_dataset(self.cfg, "val", model, self.num_classes, self.class_names)
            # evaluation never substitutes: unreadable videos are excluded and reported
            self.val_ds.on_unreadable = "raise" if self.cfg["data"]["strict"] else "skip"
        return model

    def train_dataset(self, model):
        return build_dataset(self.cfg, "train", model, self.num_classes, self.class_names)

    def classes(self):
        return self.class_names

    def loss(self, model, batch, device, autocast):
        video = batch["video"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with autocast():
            logits = model(video)
        return self.criterion(logits.float(), label)

    @torch.no_grad()
    def evaluate(self, model, device, autocast, progress=False):
        """Top-1, top-5 and mean-class accuracy (percent) and loss on ``data.val_list``.

        Each video's ``test_clips x test_crops`` views are classified separately and their
        softmax outputs averaged. Ranks evaluate disjoint shares; counts are all-reduced.
        """
        if self.val_ds is None:
            raise ConfigError("data.val_list is not set: nothing to evaluate")
        d = self.cfg["data"]
        views = d["test_clips"] * d["test_crops"]
        loader, sampler = build_loader(self.val_ds, eval_batch_size(self.cfg, self.info), self.info, self.cfg,
                                       train=False)
        sampler.set_epoch(0)
        was_training = model.training
        model.eval()
        C = self.num_classes
        correct = torch.zeros(C, dtype=torch.float64)
        total = torch.zeros(C, dtype=torch.float64)
        top5 = torch.zeros(1, dtype=torch.float64)
        nll = torch.zeros(1, dtype=torch.float64)
        skipped = torch.zeros(1, dtype=torch.float64)
        skipped_names: List[str] = []
        k = min(5, C)
        for b in tqdm(loader, disable=None if progress else True, desc="eval", unit="batch", leave=False):
            skipped += len(b["failed"])                      # unreadable: excluded, never replaced
            skipped_names += b["failed"]
            v = b["video"]                                   # (B, V, T, 3, S, S), readable videos only
            if v is None:
                continue
            n = v.shape[0]
            with autocast():
                logits = model(v.flatten(0, 1).to(device, non_blocking=True))
            prob = logits.float().softmax(-1).reshape(n, views, C).mean(1).cpu()
            label = b["label"]
            pred = prob.topk(k, dim=-1).indices
            hit1 = (pred[:, 0] == label).double()
            correct.index_add_(0, label, hit1)
            total.index_add_(0, label, torch.ones(n, dtype=torch.float64))
            top5 += (pred == label[:, None]).any(-1).double().sum()
            nll += -prob.gather(1, label[:, None]).clamp_min(1e-12).log().double().sum()
        stats = all_reduce_sum(torch.cat([correct, total, top5, nll, skipped]).to(device), self.info).cpu()
        correct, total = stats[:C], stats[C:2 * C]
        top5, nll, skipped = stats[2 * C], stats[2 * C + 1], stats[2 * C + 2]
        n = float(total.sum())
        seen = total > 0
        model.train(was_training)
        skipped_names = sorted(p for names in all_gather_objects(skipped_names, self.info) for p in names)
        if skipped:
            log.warning("evaluation: %d unreadable video(s) excluded (metrics are over the other %d): %s",
                        int(skipped), int(n), ", ".join(skipped_names[:8]))
        if n == 0:
            raise ValueError(f"evaluation: none of the {int(skipped)} videos of data.val_list could be read "
                             f"(e.g. {skipped_names[:3]}); check data.root and the list file")
        return {"top1": 100.0 * float(correct.sum()) / n, "top5": 100.0 * float(top5) / n,
                "mean_class": 100.0 * float((correct[seen] / total[seen]).mean()), "loss": float(nll) / n,
                "videos": int(n), "videos_evaluated": int(n), "videos_skipped": int(skipped),
                "videos_skipped_names": skipped_names, "views": views}
