"""Backbone wrappers: uniform views of the towers of open_clip models, and ViCLIP."""
from .towers import BlockOps, TextTower, VisionTower, block_ops, text_tower, vision_tower
from .viclip import VICLIP_CONFIGS, ViCLIP, ViCLIPConfig, create_viclip, load_viclip_checkpoint

__all__ = ["BlockOps", "TextTower", "VisionTower", "block_ops", "text_tower", "vision_tower",
           "VICLIP_CONFIGS", "ViCLIP", "ViCLIPConfig", "create_viclip", "load_viclip_checkpoint"]
