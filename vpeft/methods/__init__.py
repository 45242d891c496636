"""The methods as modules, each registered in :mod:`vpeft.methods.registry` by its own file."""
from . import baselines, st_adapter, msta, side4video  # noqa: F401,I001 - registration order = METHODS order
from .msta import FusedMSTA, MSTABlock
from .registry import InjectContext, Injected, MethodSpec, Option, get_method, method_names, register_method
from .side4video import LadderProjection, SideBlock, SideHead, SideNetwork, SideStem, ladder_layers
from .st_adapter import PRESETS, STAdapter, STAdapterBlock

BUILTIN_METHODS = method_names()
"""The methods shipped with vpeft, in registration order (methods registered later are not in it)."""

__all__ = ["FusedMSTA", "MSTABlock", "LadderProjection", "SideBlock", "SideHead", "SideNetwork", "SideStem",
           "ladder_layers", "PRESETS", "STAdapter", "STAdapterBlock", "MethodSpec", "Option", "InjectContext",
           "Injected", "register_method", "get_method", "method_names", "BUILTIN_METHODS"]
