"""vpeft: parameter-efficient adaptation of frozen image and video-language backbones to video.

Quick start::

    import open_clip, vpeft
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    video_model = vpeft.adapt(model, "st_adapter", num_frames=8, num_classes=400, preset="12x384")
    video_model.print_trainable_parameters()
    logits = video_model(video)          # video: (B, 8, 3, 224, 224)

Ops run fused (Triton / C++ extension) where available and fall back to eager
PyTorch otherwise; see :func:`vpeft_kernels.backend_status`.

The names below are imported on first use (PEP 562), so ``import vpeft.cli`` (the
``vpeft`` command) does not load torch before a subcommand needs it.
"""
import importlib

from ._version import __version__

_LAZY = {"adapt": "vpeft.model", "VideoModel": "vpeft.model", "METHODS": "vpeft.model",
         "from_pretrained": "vpeft.loading", "register_method": "vpeft.methods",
         "STAdapter": "vpeft.methods", "FusedMSTA": "vpeft.methods", "SideNetwork": "vpeft.methods"}

__all__ = ["adapt", "from_pretrained", "register_method", "VideoModel", "METHODS", "STAdapter", "FusedMSTA",
           "SideNetwork", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vpeft' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
