"""The method registry: the one place that says which methods exist and what they take.

Each method file registers itself (at its bottom) with :func:`register_method`, giving

* its options, each with a default and the types it accepts (:class:`Option`);
* ``inject(ctx)``: how it puts itself into the model (wraps tower blocks, builds its
  own modules) and returns the parts the :class:`vpeft.VideoModel` holds;
* its flags: whether it uses the text tower, whether DDP must look for unused
  parameters, how activation checkpointing applies, whether the frozen backbone runs
  without autograd, whether the backbone itself is trained, whether its video
  embedding lies in the joint image-text space.

:func:`vpeft.adapt` loops over this registry and nothing else in the package branches
on a method's name. A name is registered once; a second registration of the same name
is refused (HF PEFT's ``register_peft_method`` habit). A method defined outside the
package registers the same way::

    from vpeft.methods.registry import MethodSpec, Option, register_method
    register_method(MethodSpec("my_method", {"width": Option(8, int)}, inject=my_inject))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch.nn as nn

__all__ = ["Option", "InjectContext", "Injected", "MethodSpec", "register_method", "get_method", "method_names",
           "COMMON_OPTIONS"]


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: its default and the Python types it accepts.

    ``types`` are checked with ``isinstance`` (``bool`` never passes for ``int`` or
    ``float``; an ``int`` passes for ``float`` and is converted). ``None`` is accepted
    when the default is ``None`` (meaning: the method derives the value from the model).
    ``choices``, when given, are the only accepted values.
    """

    default: Any
    types: Tuple[type, ...]
    doc: str = ""
    choices: Optional[Tuple[Any, ...]] = None

    def __init__(self, default: Any, types, doc: str = "", choices=None):
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "types", tuple(types) if isinstance(types, (tuple, list)) else (types,))
        object.__setattr__(self, "doc", doc)
        object.__setattr__(self, "choices", tuple(choices) if choices is not None else None)

    def check(self, method: str, name: str, value: Any) -> Any:
        """``value`` converted to the option's type; a ValueError names the option and what it takes."""
        if value is None and self.default is None:
            return None
        expected = "/".join(t.__name__ for t in self.types)
        ok = isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)
        if not ok and float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ValueError(f"option {name}={value!r} of method {method!r} must be {expected}"
                             f"{' or None' if self.default is None else ''}, got {type(value).__name__}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"option {name}={value!r} of method {method!r}: expected one of {self.choices}")
        return value


COMMON_OPTIONS: Dict[str, Option] = {
    "dropout": Option(0.5, float, "dropout before the classifier (when num_classes is set)"),
    "backend": Option(None, str, "op backend of the method's modules (None: $VPEFT_BACKEND, else auto)",
                      choices=("auto", "triton", "extension", "eager")),
}
"""Options every method takes."""


@dataclass
class InjectContext:
    """What ``inject`` gets: the model being adapted and its resolved options.

    Attributes:
        model: the user's model (modified in place). tower / text: its vision tower and
        text tower adapters (:mod:`vpeft.backbones.towers`; ``text`` may be None).
        num_frames, num_classes: as given to :func:`vpeft.adapt`. options: every option
        of the method, defaults filled in and types checked. factory: ``dict(dtype=...)``
        for new modules (they are built on the backbone's device already).
    """

    model: nn.Module
    tower: Any
    text: Any
    num_frames: int
    num_classes: Optional[int]
    options: Dict[str, Any]
    factory: Dict[str, Any]


@dataclass
class Injected:
    """What ``inject`` returns: the method's own modules the VideoModel holds.

    ``msta``: MSTA-style shared layers; ``side``: a side network (the VideoModel then
    takes its video feature from the side network); ``head``: a classifier (None: the
    default linear classifier on the pooled feature is added when ``num_classes`` is
    set); ``extra``: any other trained module (kept under ``VideoModel.extra``).
    """

    msta: Optional[nn.Module] = None
    side: Optional[nn.Module] = None
    head: Optional[nn.Module] = None
    extra: Optional[nn.Module] = None
    side_stream: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Args:
        name: the name :func:`vpeft.adapt` takes.
        options: the method's own options (the common ``dropout`` is added).
        inject: ``inject(ctx: InjectContext) -> Injected``.
        uses_text: can adapt the text tower (video-text tasks train it through prompts).
        find_unused_parameters: DDP must look for parameters without a gradient (e.g.
            text adapters under a classification loss).
        checkpointing: how ``train.activation_checkpointing`` applies: ``"blocks"``
            (recompute each backbone block), ``"option"`` (set the method's own
            ``checkpointing`` option) or ``"none"``.
        backbone_grad: the frozen backbone's forward builds an autograd graph (False:
            it runs under ``no_grad``, as for a linear probe).
        trains_backbone: the backbone's own weights are trained (full fine-tuning).
        joint_space: ``encode_video`` lies in the image-text space (usable with text prompts).
    """

    name: str
    options: Mapping[str, Option]
    inject: Callable[[InjectContext], Injected]
    uses_text: bool = False
    find_unused_parameters: bool = False
    checkpointing: str = "blocks"
    backbone_grad: bool = True
    trains_backbone: bool = False
    joint_space: bool = True

    def all_options(self) -> Dict[str, Option]:
        return {**COMMON_OPTIONS, **self.options}

    def resolve(self, given: Mapping[str, Any]) -> Dict[str, Any]:
        """Every option with defaults filled in; an unknown option is refused, listing the known ones."""
        known = self.all_options()
        unknown = sorted(set(given) - set(known))
        if unknown:
            listing = ", ".join(f"{k} (default {o.default!r})" for k, o in sorted(known.items()))
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; its options are: {listing}")
        return {k: o.check(self.name, k, given[k]) if k in given else o.default for k, o in known.items()}


_REGISTRY: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry; a name already registered is refused."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method takes a MethodSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    if spec.checkpointing not in ("blocks", "option", "none"):
        raise ValueError(f"checkpointing={spec.checkpointing!r}; expected 'blocks', 'option' or 'none'")
    if spec.checkpointing == "option" and "checkpointing" not in spec.options:
        raise ValueError(f"method {spec.name!r} declares checkpointing='option' but has no 'checkpointing' option")
    clash = sorted(set(spec.options) & set(COMMON_OPTIONS))
    if clash:
        raise ValueError(f"method {spec.name!r} redeclares the common option(s) {clash}")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; a ValueError lists the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; expected one of {method_names()}") from None


def method_names() -> Tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)
