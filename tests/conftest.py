"""Test configuration.

Without a GPU, Triton kernels run through Triton's CPU interpreter, which must be
switched on before triton is imported; set it here, first thing.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("CUDA_VISIBLE_DEVICES", "") not in ("",) and os.path.exists("/dev/nvidia0") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
