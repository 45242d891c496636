"""Test configuration.

Without a GPU, Triton kernels run through Triton's CPU interpreter, which must be
switched on before triton is imported; set it here, first thing.
"""
import os

if not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_clip(layers: int = 4, width: int = 64, image_size: int = 32, patch_size: int = 8, text_width: int = 32):
    """A small randomly initialised open_clip CLIP (native ViT vision and text towers), built by the one
    backbone builder (``vpeft.backbones.build.create_backbone``) from its ``vpeft-tiny`` entry."""
    from vpeft.backbones.build import create_backbone

    return create_backbone("vpeft-tiny", config=dict(
        embed_dim=32,
        vision_cfg=dict(layers=layers, width=width, patch_size=patch_size, image_size=image_size, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=100, width=text_width, heads=2, layers=layers),
    ))


def tiny_eva(post_norm: bool = True, depth: int = 2, image_size: int = 28):
    """A small open_clip TimmModel around a timm EVA02 trunk (post-norm blocks like ViT-E)."""
    from vpeft.backbones.build import create_tiny_eva

    return create_tiny_eva(depth=depth, image_size=image_size, post_norm=post_norm).train()


def tiny_backbone(name: str, **kw):
    """A registered tiny backbone by name (``vpeft.backbones.build.BACKBONES``: one per tower family)."""
    from vpeft.backbones.build import create_backbone

    return create_backbone(name, **kw)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (restored afterwards): CPU runs compared bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synthetic_clips(tmp_path_factory):
    """A small synthetic motion dataset (24 training and 8 validation videos of 8 frames, 32 px)."""
    from vpeft.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("syn")
    return write_synthetic(str(root), num_train=24, num_val=8, size=32, frames=8, progress=False)
