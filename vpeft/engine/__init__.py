"""Training and evaluation engine: configuration, checkpoints, distributed set-up, the one loop.

The names below are loaded on first use, so that ``vpeft.engine.config`` (the schema,
imported by every layer) does not pull in the loop and the model code.
"""

__all__ = ["Trainer", "Task", "RecognitionTask", "load_config", "preset_names", "ConfigError", "DistInfo",
           "init_distributed"]


def __getattr__(name):
    if name in ("Trainer",):
        from .trainer import Trainer
        return Trainer
    if name in ("Task", "RecognitionTask"):
        from . import task
        return getattr(task, name)
    if name in ("load_config", "preset_names", "ConfigError"):
        from . import config
        return getattr(config, name)
    if name in ("DistInfo", "init_distributed"):
        from . import distributed
        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
