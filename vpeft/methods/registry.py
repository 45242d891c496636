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

__all__ = ["Option", "positive_int", "fraction", "InjectContext", "Injected", "MethodSpec", "register_method",
           "get_method", "method_names", "COMMON_OPTIONS"]


@dataclass(frozen=True)
class Option:
    """One keyword option of a method: its default, the Python types it accepts and its range.

    ``types`` are checked with ``isinstance`` (``bool`` never passes for ``int`` or
    ``float``; an ``int`` passes for ``float`` and is converted). ``None`` is accepted
    when the default is ``None`` (meaning: the method derives the value from the model).
    ``choices``, when given, are the only accepted values; ``valid(value)``, when given,
    must hold (``expected`` says what it means, for the error message).
    """

    default: Any
    types: Tuple[type, ...]
    doc: str = ""
    choices: Optional[Tuple[Any, ...]] = None
    valid: Optional[Callable[[Any], bool]] = None
    expected: Optional[str] = None

    def __init__(self, default: Any, types, doc: str = "", choices=None, valid=None, expected=None):
        object.__setattr__(self, "default", default)
        object.__setattr__(self, "types", tuple(types) if isinstance(types, (tuple, list)) else (types,))
        object.__setattr__(self, "doc", doc)
        object.__setattr__(self, "choices", tuple(choices) if choices is not None else None)
        object.__setattr__(self, "valid", valid)
        object.__setattr__(self, "expected", expected)

    def describe(self) -> str:
        """What the option takes, in words."""
        if self.expected:
            return self.expected
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        what = " or ".join(t.__name__ for t in self.types)
        return what + (" or None" if self.default is None else "")

    def check(self, method: str, name: str, value: Any) -> Any:
        """``value`` converted to the option's type; a ValueError names the option, the value and what it takes."""
        if value is None and self.default is None:
            return None
        ok = isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)
        if not ok and float in self.types and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        ok = ok and (self.choices is None or value in self.choices) and (self.valid is None or self.valid(value))
        if not ok:
            raise ValueError(f"{method} option {name}={value!r} ({type(value).__name__}); expected {self.describe()}")
        return value


def positive_int(doc: str, default: Any) -> Option:
    """An option that is a positive int (``None`` allowed when it is the default)."""
    return Option(default, int, doc, valid=lambda v: v >= 1,
                  expected="a positive int" + (" or None" if default is None else ""))


def fraction(doc: str, default: float) -> Option:
    """An option that is a number in [0, 1) (a dropout probability)."""
    return Option(default, float, doc, valid=lambda v: 0 <= v < 1, expected="a number in [0, 1)")


COMMON_OPTIONS: Dict[str, Option] = {
    "dropout": fraction("dropout before the classifier (when num_classes is set)", 0.5),
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
    set); ``extra``: any other trained module (kept under ``VideoModel.extra``);
    ``side_stream``, ``side_recompute_levels``, ``tower_chunk``: how the VideoModel feeds
    a side network (see :mod:`vpeft.methods.recompute`).
    """

    msta: Optional[nn.Module] = None
    side: Optional[nn.Module] = None
    head: Optional[nn.Module] = None
    extra: Optional[nn.Module] = None
    side_stream: bool = False
    side_recompute_levels: bool = False
    tower_chunk: Optional[int] = None


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
        common_defaults: the method's own defaults for common options (e.g. ``dropout``).
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
    common_defaults: Mapping[str, Any] = None

    def all_options(self) -> Dict[str, Option]:
        common = dict(COMMON_OPTIONS)
        for k, v in (self.common_defaults or {}).items():
            o = common[k]
            common[k] = Option(v, o.types, o.doc, choices=o.choices, valid=o.valid, expected=o.expected)
        return {**common, **self.options}

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
    unknown = sorted(set(spec.common_defaults or {}) - set(COMMON_OPTIONS))
    if unknown:
        raise ValueError(f"method {spec.name!r} sets defaults for {unknown}, which are not common options "
                         f"{sorted(COMMON_OPTIONS)}")
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
