"""The two reference points every method is compared with: a linear probe and full fine-tuning.

Neither adds modules to the backbone; both use the default classifier on the pooled
feature (:class:`vpeft.model.ClassifierHead`). ``linear_probe`` runs the frozen backbone
without autograd and trains only the classifier; ``full_finetune`` trains every weight
of the backbone as well.
"""
from __future__ import annotations

from .registry import InjectContext, Injected, MethodSpec, register_method


def _nothing(ctx: InjectContext) -> Injected:
    return Injected()


register_method(MethodSpec("linear_probe", {}, inject=_nothing, backbone_grad=False, checkpointing="none"))
register_method(MethodSpec("full_finetune", {}, inject=_nothing, trains_backbone=True))
