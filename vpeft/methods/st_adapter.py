"""ST-Adapter (METHODS.md section 1): a bottleneck adapter with a depthwise temporal conv."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

import vpeft_kernels

from ..backbones.towers import BlockOps

PRESETS = {"12x384": ("mlp",), "24x384": ("attn", "mlp")}
"""Adapter placements per block for each preset (both use bottleneck 384)."""


class STAdapter(nn.Module):
    """``A(x) = x + up(dwconv_t(down(x)))`` on patch tokens; [CLS] passes unchanged.

    Args:
        width: backbone width ``D``.
        bottleneck: ``r``.
        num_frames: ``T``; inputs are ``(B*T, 1+N, D)`` in ``(b t)`` order.

    Initialised as the identity: temporal taps, temporal bias and both linear biases
    are zero (the linear weights keep PyTorch's default init).
    """

    def __init__(self, width: int, bottleneck: int = 384, num_frames: int = 8):
        super().__init__()
        if width < 1 or bottleneck < 1:
            raise ValueError(f"width and bottleneck must be positive, got {width} and {bottleneck}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames = num_frames
        self.down = nn.Linear(width, bottleneck)
        self.temporal_weight = nn.Parameter(torch.zeros(bottleneck, 3))
        self.temporal_bias = nn.Parameter(torch.zeros(bottleneck))
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        return vpeft_kernels.st_adapter(
            x, self.down.weight, self.down.bias, self.temporal_weight, self.temporal_bias,
            self.up.weight, self.up.bias, num_frames=self.num_frames, backend=backend)


class STAdapterBlock(nn.Module):
    """A frozen transformer block with ST-Adapters on its residual stream.

    ``x = A1(x); x = x + attn(x); x = A2(x); x = x + mlp(x)`` where ``attn``/``mlp``
    are the block's own residual branches and either adapter may be absent.
    """

    def __init__(self, block: nn.Module, ops: BlockOps, adapter_attn: Optional[STAdapter],
                 adapter_mlp: Optional[STAdapter]):
        super().__init__()
        self.block = block
        self.ops = ops
        self.adapter_attn = adapter_attn
        self.adapter_mlp = adapter_mlp

    def forward(self, x, *args, **kwargs):
        kw = self.ops.call_kwargs(args, kwargs)
        if self.adapter_attn is not None:
            x = self.adapter_attn(x)
        x = x + self.ops.attn(self.block, x, kw)
        if self.adapter_mlp is not None:
            x = self.adapter_mlp(x)
        return x + self.ops.mlp(self.block, x, kw)
