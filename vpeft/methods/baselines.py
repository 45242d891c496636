"""The two reference points every method is compared with: a linear probe and full fine-tuning.

Neither adds modules to the backbone; both use the default classifier on the pooled
feature (:class:`vpeft.model.ClassifierHead`). ``linear_probe`` runs the frozen backbone
without autograd and trains only the classifier; ``full_finetune`` trains the vision
tower as well (its projection only when there is no classifier, since a classifier reads
the pre-projection feature), and with ``text=True`` (tasks that encode text) the text
side of the model too. A recognition run therefore leaves no trained parameter unused,
which DDP requires.
"""
from __future__ import annotations

from ..backbones.towers import text_parameters
from .registry import InjectContext, Injected, MethodSpec, Option, register_method


def _nothing(ctx: InjectContext) -> Injected:
    return Injected()


def _full_finetune(ctx: InjectContext) -> Injected:
    for p in ctx.tower.trainable_parameters(projection=ctx.num_classes is None):
        p.requires_grad_(True)
    if ctx.options["text"]:
        params = text_parameters(ctx.model) if hasattr(ctx.model, "visual") else []
        if not params:
            raise ValueError(f"text=True but {type(ctx.model).__name__} has no text tower")
        for p in params:
            p.requires_grad_(True)
    return Injected()


register_method(MethodSpec("linear_probe", {}, inject=_nothing, backbone_grad=False, checkpointing="none"))
register_method(MethodSpec(
    "full_finetune",
    {"text": Option(False, bool, "also train the text side (tasks that encode text); default: the vision tower")},
    inject=_full_finetune, trains_backbone=True))
