"""vpeft: parameter-efficient adaptation of frozen image and video-language backbones to video.

Quick start::

    import open_clip, vpeft
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    video_model = vpeft.adapt(model, "st_adapter", num_frames=8, num_classes=400, preset="12x384")
    video_model.print_trainable_parameters()
    logits = video_model(video)          # video: (B, 8, 3, 224, 224)

Ops run fused (Triton / C++ extension) where available and fall back to eager
PyTorch otherwise; see :func:`vpeft_kernels.backend_status`.
"""
from ._version import __version__
from .loading import from_pretrained
from .methods import FusedMSTA, SideNetwork, STAdapter, register_method
from .model import METHODS, VideoModel, adapt

__all__ = ["adapt", "from_pretrained", "register_method", "VideoModel", "METHODS", "STAdapter", "FusedMSTA",
           "SideNetwork", "__version__"]
