"""Backbone wrappers: uniform views of the towers of open_clip models."""
from .towers import BlockOps, TextTower, VisionTower, block_ops, text_tower, vision_tower

__all__ = ["BlockOps", "TextTower", "VisionTower", "block_ops", "text_tower", "vision_tower"]
