"""Backbones: the tower abstraction and family table (:mod:`.towers`), builders (:mod:`.build`), ViCLIP."""
from .towers import (FAMILIES, BlockOps, TextTower, UnsupportedBackbone, VisionTower, block_ops, register_family,
                     text_tower, vision_tower)
from .viclip import VICLIP_CONFIGS, ViCLIP, ViCLIPConfig, create_viclip, load_viclip_checkpoint

__all__ = ["FAMILIES", "BlockOps", "TextTower", "UnsupportedBackbone", "VisionTower", "block_ops", "register_family",
           "text_tower", "vision_tower", "VICLIP_CONFIGS", "ViCLIP", "ViCLIPConfig", "create_viclip",
           "load_viclip_checkpoint"]
