"""Training and evaluation engine: configuration, checkpoints, distributed set-up, the one loop.

``Trainer`` and the distributed helpers are imported on first use, so reading a
configuration (``vpeft.engine.config``) does not load torch.
"""
import importlib

from .config import ConfigError, load_config, preset_names

_LAZY = {"Trainer": ".trainer", "Task": ".task", "RecognitionTask": ".task", "DistInfo": ".distributed",
         "init_distributed": ".distributed"}

__all__ = ["Trainer", "Task", "RecognitionTask", "load_config", "preset_names", "ConfigError", "DistInfo",
           "init_distributed"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vpeft.engine' has no attribute {name!r}")
