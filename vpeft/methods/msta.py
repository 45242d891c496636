"""MSTA, the multimodal spatiotemporal adapter: ``out = block(x) + s * A(first_norm(x))`` per adapted
layer, with vision and text adapters sharing the bottleneck layer (the branch's math is
``vpeft_kernels.reference.msta_adapter``)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..backbones.towers import BlockOps, around_prefix
from . import ops
from .recompute import run_region

DEFAULT_LAST_BLOCKS = 5
"""The released runs adapt blocks 8..12 of 12: the last five blocks of each tower."""

LayerSpec = Union[None, Tuple[int, int], Tuple[Tuple[int, int], Tuple[int, int]]]


def _span(pair, depth: int, tower: str, given) -> range:
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
        raise ValueError(f"layers must be a (first, last) pair of 1-based ints, or a pair of such pairs "
                         f"((vision), (text)); got {given!r}")
    first, last = pair
    if not 1 <= first <= last <= depth:
        raise ValueError(f"layers={tuple(pair)} is outside the model's {tower} tower: "
                         f"expected 1 <= first <= last <= {depth} "
                         f"({tower} depth {depth})")
    return range(first - 1, last)


def msta_layers(layers: LayerSpec, vision_depth: int, text_depth: Optional[int]) -> Tuple[range, Optional[range]]:
    """0-based blocks of the vision and the text tower that get an MSTA layer.

    ``layers``:
      - ``None`` (default): the last :data:`DEFAULT_LAST_BLOCKS` blocks of each tower
        (ViT-L/14 with a 12-block text tower: vision 20..24, text 8..12, 1-based);
      - ``(first, last)``: 1-based, inclusive, the same range in both towers;
      - ``((first_v, last_v), (first_t, last_t))``: a range per tower.

    The k-th adapted vision block and the k-th adapted text block share one
    :class:`FusedMSTA`, so with a text tower both ranges must have the same length.
    ``text_depth=None``: vision adapters only (the text range is None).
    """
    if layers is None:
        n = min(DEFAULT_LAST_BLOCKS, vision_depth, text_depth or vision_depth)
        vis = range(vision_depth - n, vision_depth)
        return vis, (None if text_depth is None else range(text_depth - n, text_depth))
    per_tower = (isinstance(layers, (tuple, list)) and len(layers) == 2
                 and all(isinstance(p, (tuple, list)) for p in layers))
    pv, pt = (layers[0], layers[1]) if per_tower else (layers, layers)
    vis = _span(pv, vision_depth, "vision", layers)
    if text_depth is None:
        return vis, None
    txt = _span(pt, text_depth, "text", layers)
    if len(vis) != len(txt):
        raise ValueError(f"layers={layers!r} adapts {len(vis)} vision and {len(txt)} text blocks; each MSTA layer "
                         "is shared by one vision and one text block, so the two ranges need the same length")
    return vis, txt


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
        num_prefix_tokens: ``P`` vision tokens before the patches (``"bt"``): 1 for a
        [CLS], more with registers, 0 without [CLS]; prefix tokens get the spatial
        branch only (as a [CLS] does), every patch token the full branch.

    Init: Kaiming normal (fan_out, relu) weights, zero biases.
    """

    def __init__(self, vision_width: int, text_width: Optional[int] = None, bottleneck: int = 128,
                 num_frames: int = 8, scale: float = 0.005, dropout: float = 0.1, layout: str = "bt",
                 num_prefix_tokens: int = 1, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend   # the op backend (None: VPEFT_BACKEND, else auto)
        if layout not in ("bt", "nt"):
            raise ValueError(f"layout must be 'bt' (per-frame tokens) or 'nt' (ViCLIP clip tokens), got {layout!r}")
        if num_prefix_tokens < 0 or (layout == "nt" and num_prefix_tokens != 1):
            raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be >= 0 (and 1 for layout 'nt')")
        self.layout = layout
        self.num_prefix_tokens = int(num_prefix_tokens)
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
        common = (self.vision_down.weight, self.vision_down.bias, self.shared.weight, self.shared.bias,
                  self.vision_up.weight, self.vision_up.bias)
        backend = self.backend if backend is None else backend

        def full(z):
            return ops.call("msta_adapter", z, *common, self.vision_tconv_weight, self.vision_tconv_bias,
                            scale=self.scale, num_frames=self.num_frames, dropout_p=self._p(), layout=self.layout,
                            backend=backend)

        def spatial(z):  # extra prefix tokens (registers): the branch a [CLS] gets, no temporal taps
            return ops.call("msta_adapter", z, *common, scale=self.scale, dropout_p=self._p(), backend=backend)

        if self.layout == "nt":
            return full(u)
        return around_prefix(u, self.num_prefix_tokens, full, spatial)

    def text(self, u: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Text branch on normalised tokens ``u`` ``(B, L, D_t)``."""
        if self.text_down is None:
            raise ValueError("this FusedMSTA was built without a text adapter (text_width=None)")
        return ops.call(
            "msta_adapter", u, self.text_down.weight, self.text_down.bias, self.shared.weight, self.shared.bias,
            self.text_up.weight, self.text_up.bias, scale=self.scale, dropout_p=self._p(),
            backend=self.backend if backend is None else backend)


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


# ---------------------------------------------------------------------- registration
from .recompute import CHECKPOINT_OPTIONS, checkpointed_blocks  # noqa: E402
from .registry import (InjectContext, Injected, MethodSpec, Option, fraction, positive_int,  # noqa: E402
                       register_method)


def _inject(ctx: InjectContext) -> Injected:
    """One :class:`FusedMSTA` per adapted layer, shared by the vision block and (with ``text``) the text block."""
    tower, o = ctx.tower, ctx.options
    # a classifier does not use the text tower: no (untrained) text adapters unless asked
    use_text = (ctx.text is not None and ctx.num_classes is None) if o["text"] is None else o["text"]
    if use_text and ctx.text is None:
        raise ValueError("text=True but this model has no text tower")
    t = ctx.text if use_text else None
    vis, txt = msta_layers(o["layers"], tower.depth, len(t.blocks) if t else None)
    ckpt = checkpointed_blocks(o["checkpointing"], o["checkpoint_every"], tower.depth, adapted=vis)
    msta = nn.ModuleList()
    for k, i in enumerate(vis):
        m = FusedMSTA(tower.width, t.width if t else None, o["bottleneck"], ctx.num_frames, scale=o["scale"],
                      dropout=o["adapter_dropout"], layout=tower.layout, num_prefix_tokens=tower.num_prefix_tokens,
                      backend=o["backend"]).to(**ctx.factory)
        msta.append(m)
        tower.blocks[i] = MSTABlock(tower.blocks[i], tower.ops, m, "vision", checkpoint=i in ckpt)
        if t is not None:   # a text block is recomputed when its vision partner is
            t.blocks[txt[k]] = MSTABlock(t.blocks[txt[k]], t.ops, m, "text", checkpoint=i in ckpt)
    return Injected(msta=msta)


register_method(MethodSpec(
    "msta",
    {"bottleneck": positive_int("bottleneck width r (must divide the vision width)", 128),
     "layers": Option(None, (list, tuple), "None (the last blocks of each tower), a 1-based inclusive "
                                           "(first, last) for both towers, or one pair per tower (msta_layers)"),
     "scale": Option(0.005, float, "adapter output scale s"),
     "adapter_dropout": fraction("dropout on the shared bottleneck", 0.1),
     "text": Option(None, bool, "adapt the text tower too (None: when the model has one and there is no classifier)"),
     **CHECKPOINT_OPTIONS},
    inject=_inject, uses_text=True, find_unused_parameters=True, checkpointing="option"))
