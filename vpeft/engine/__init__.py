"""Training and evaluation engine: configuration, checkpoints, distributed set-up, the loop."""
from .config import ConfigError, load_config, preset_names
from .distributed import DistInfo, init_distributed
from .trainer import Trainer

__all__ = ["Trainer", "load_config", "preset_names", "ConfigError", "DistInfo", "init_distributed"]
