"""MSTA, the multimodal spatiotemporal adapter (METHODS.md section 2)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

import vpeft_kernels

from ..backbones.towers import BlockOps
from .recompute import run_region


class FusedMSTA(nn.Module):
    """One MSTA layer: vision and text adapters joined by a shared bottleneck layer.

    ``h = dropout(relu(shared(relu(down_m(u)))))``; the vision branch is
    ``up_s(h) + up_t_conv(h)`` (the grouped temporal up-projection on patch tokens
    only), the text branch ``up_t(h)``. :meth:`vision` and :meth:`text` return the
    scaled branch ``scale * A(u)`` with MSTA's gradient scaling, to be added to the
    block output.

    Args:
        vision_width: ``D_v``. text_width: ``D_t`` (None: vision adapter only).
        bottleneck: ``r``, must divide ``D_v``. num_frames: ``T``.
        scale: ``s``. dropout: ``p`` on the bottleneck (active in training mode).
        layout: ``"bt"`` vision tokens ``(B*T, 1+N, D)`` (per-frame CLIP) or ``"nt"``
        ``(B, 1+N*T, D)`` with patches in ``(n t)`` order (ViCLIP).

    Init: Kaiming normal (fan_out, relu) weights, zero biases.
    """

    def __init__(self, vision_width: int, text_width: Optional[int] = None, bottleneck: int = 128,
                 num_frames: int = 8, scale: float = 0.005, dropout: float = 0.1, layout: str = "bt"):
        super().__init__()
        if layout not in ("bt", "nt"):
            raise ValueError(f"layout must be 'bt' (per-frame tokens) or 'nt' (ViCLIP clip tokens), got {layout!r}")
        self.layout = layout
        if bottleneck < 1 or vision_width % bottleneck:
            raise ValueError(f"MSTA bottleneck r={bottleneck} must divide the vision width D={vision_width} "
                             "(the temporal up-projection has groups=r)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if scale == 0:
            raise ValueError("scale must be non-zero")
        self.num_frames = num_frames
        self.scale = float(scale)
        self.dropout = float(dropout)
        r = bottleneck
        self.shared = nn.Linear(r, r)
        self.vision_down = nn.Linear(vision_width, r)
        self.vision_up = nn.Linear(r, vision_width)
        self.vision_tconv_weight = nn.Parameter(torch.empty(vision_width, 3))
        self.vision_tconv_bias = nn.Parameter(torch.zeros(vision_width))
        self.text_down = nn.Linear(text_width, r) if text_width else None
        self.text_up = nn.Linear(r, text_width) if text_width else None
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.shared, self.vision_down, self.vision_up, self.text_down, self.text_up):
            if lin is not None:
                nn.init.kaiming_normal_(lin.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(lin.bias)
        # as Conv3d(r, D_v, (3,1,1), groups=r): fan_out = D_v * 3
        std = math.sqrt(2.0 / (self.vision_tconv_weight.shape[0] * 3))
        nn.init.normal_(self.vision_tconv_weight, 0.0, std)
        nn.init.zeros_(self.vision_tconv_bias)

    def _p(self) -> float:
        return self.dropout if self.training else 0.0

    def vision(self, u: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Vision branch on normalised tokens ``u`` in this layer's ``layout``."""
        return vpeft_kernels.msta_adapter(
            u, self.vision_down.weight, self.vision_down.bias, self.shared.weight, self.shared.bias,
            self.vision_up.weight, self.vision_up.bias, self.vision_tconv_weight, self.vision_tconv_bias,
            scale=self.scale, num_frames=self.num_frames, dropout_p=self._p(), layout=self.layout, backend=backend)

    def text(self, u: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Text branch on normalised tokens ``u`` ``(B, L, D_t)``."""
        if self.text_down is None:
            raise ValueError("this FusedMSTA was built without a text adapter (text_width=None)")
        return vpeft_kernels.msta_adapter(
            u, self.text_down.weight, self.text_down.bias, self.shared.weight, self.shared.bias,
            self.text_up.weight, self.text_up.bias, scale=self.scale, dropout_p=self._p(), backend=backend)


class MSTABlock(nn.Module):
    """A frozen block plus one modality of a shared :class:`FusedMSTA`.

    ``out = block(x) + s * A(first_norm(x))``. The FusedMSTA is owned by the
    enclosing :class:`vpeft.VideoModel` (it is shared by a vision and a text block),
    so it is held here as a plain reference, not a submodule.

    With ``checkpoint=True`` the block and its adapter branch are one recomputation
    region (:func:`vpeft.methods.recompute.run_region`; the adapter's dropout mask is
    drawn again from the same RNG state, so it is the same mask).
    """

    def __init__(self, block: nn.Module, ops: BlockOps, msta: FusedMSTA, modality: str, checkpoint: bool = False):
        super().__init__()
        if modality not in ("vision", "text"):
            raise ValueError(f"modality must be 'vision' or 'text', got {modality!r}")
        self.block = block
        self.ops = ops
        self.modality = modality
        self.checkpoint = bool(checkpoint)
        object.__setattr__(self, "msta", msta)

    def get_weight_dtype(self) -> torch.dtype:
        """open_clip's ``Transformer.get_cast_dtype`` (used by ``encode_text``) asks block 0 for this."""
        return self.block.get_weight_dtype()

    def forward(self, x, *args, **kwargs):
        if self.checkpoint:
            return run_region(self._body, x, *args, **kwargs)
        return self._body(x, *args, **kwargs)

    def _body(self, x, *args, **kwargs):
        y = self.block(x, *args, **kwargs)
        u = self.ops.first_norm(self.block, x)
        branch = self.msta.vision(u) if self.modality == "vision" else self.msta.text(u)
        return y + branch.to(y.dtype)
