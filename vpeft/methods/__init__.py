"""The three methods as modules."""
from .msta import FusedMSTA, MSTABlock
from .side4video import LadderProjection, SideBlock, SideHead, SideNetwork, SideStem, ladder_layers
from .st_adapter import PRESETS, STAdapter, STAdapterBlock

__all__ = ["FusedMSTA", "MSTABlock", "LadderProjection", "SideBlock", "SideHead", "SideNetwork", "SideStem",
           "ladder_layers", "PRESETS", "STAdapter", "STAdapterBlock"]
