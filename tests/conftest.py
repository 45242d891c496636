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
