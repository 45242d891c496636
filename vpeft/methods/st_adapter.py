"""ST-Adapter: ``x + up(dwconv_t(down(x)))``, a bottleneck adapter with a depthwise temporal conv
(the math is ``vpeft_kernels.reference.st_adapter``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..backbones.towers import BlockOps, around_prefix
from . import ops
from .recompute import run_region

PRESETS = {"12x384": ("mlp",), "24x384": ("attn", "mlp")}
"""Adapter placements per block for each preset (both use bottleneck 384)."""


class STAdapter(nn.Module):
    """``A(x) = x + up(dwconv_t(down(x)))`` on patch tokens; [CLS] passes unchanged.

    Args:
        width: backbone width ``D``.
        bottleneck: ``r``.
        num_frames: ``T``; inputs are ``(B*T, 1+N, D)`` in ``(b t)`` order.
        layout: ``"bt"`` as above, or ``"nt"``: inputs ``(B, 1+N*T, D)`` with one [CLS]
        and patches in ``(n t)`` order (ViCLIP); the patches are regrouped per frame,
        adapted by the same op, and put back, the [CLS] unchanged.
        num_prefix_tokens: ``P`` tokens before the patches (layout ``"bt"``): 1 for a
        [CLS], more with register tokens, 0 for towers without [CLS] (SigLIP); every
        prefix token passes unchanged and every patch token is adapted.

    Initialised as the identity: temporal taps, temporal bias and both linear biases
    are zero (the linear weights keep PyTorch's default init).
    """

    def __init__(self, width: int, bottleneck: int = 384, num_frames: int = 8, layout: str = "bt",
                 num_prefix_tokens: int = 1, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend   # the op backend (None: VPEFT_BACKEND, else auto)
        if layout not in ("bt", "nt"):
            raise ValueError(f"layout must be 'bt' (per-frame tokens) or 'nt' (ViCLIP clip tokens), got {layout!r}")
        if num_prefix_tokens < 0 or (layout == "nt" and num_prefix_tokens != 1):
            raise ValueError(f"num_prefix_tokens={num_prefix_tokens} must be >= 0 (and 1 for layout 'nt')")
        self.layout = layout
        self.num_prefix_tokens = int(num_prefix_tokens)
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

    def _op(self, x, backend):
        return ops.call("st_adapter", x, self.down.weight, self.down.bias, self.temporal_weight, self.temporal_bias,
                        self.up.weight, self.up.bias, num_frames=self.num_frames,
                        backend=self.backend if backend is None else backend)

    def forward(self, x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        if self.layout == "bt":
            return around_prefix(x, self.num_prefix_tokens, lambda y: self._op(y, backend))
        b, nt1, d = x.shape
        t = self.num_frames
        if (nt1 - 1) % t:
            raise ValueError(f"x has {nt1 - 1} patch tokens, not a multiple of num_frames={t} (layout 'nt')")
        n = (nt1 - 1) // t
        patches = x[:, 1:].reshape(b, n, t, d).transpose(1, 2).reshape(b * t, n, d)
        cls = x[:, :1].expand(b, t, d).reshape(b * t, 1, d)   # passes through the op unchanged
        out = self._op(torch.cat([cls, patches], dim=1), backend)[:, 1:]
        out = out.reshape(b, t, n, d).transpose(1, 2).reshape(b, n * t, d)
        return torch.cat([x[:, :1], out], dim=1)


class STAdapterBlock(nn.Module):
    """A frozen transformer block with ST-Adapters on its residual stream.

    ``x = A1(x); x = x + attn(x); x = A2(x); x = x + mlp(x)`` where ``attn``/``mlp``
    are the block's own residual branches and either adapter may be absent.

    With ``checkpoint=True`` the whole block (frozen branches and adapters) is one
    recomputation region (:func:`vpeft.methods.recompute.run_region`): backward keeps
    only the block's input and runs the block's forward again when it gets there.
    With ``recompute_adapters=True`` (and no ``checkpoint``) each adapter and the norm of
    the branch after it are one small region: backward keeps the adapter's input, not the
    norm's input (the adapter's output) nor, on the eager path, the adapter's internals,
    and recomputes the adapter and the norm (a few per cent of the block's FLOPs).
    """

    def __init__(self, block: nn.Module, ops: BlockOps, adapter_attn: Optional[STAdapter],
                 adapter_mlp: Optional[STAdapter], checkpoint: bool = False, recompute_adapters: bool = False):
        super().__init__()
        self.block = block
        self.ops = ops
        self.adapter_attn = adapter_attn
        self.adapter_mlp = adapter_mlp
        self.checkpoint = bool(checkpoint)
        self.recompute_adapters = bool(recompute_adapters) and not self.checkpoint

    def forward(self, x, *args, **kwargs):
        kw = self.ops.call_kwargs(args, kwargs)
        if self.checkpoint:
            return run_region(self._body, x, kw)
        return self._body(x, kw)

    def _body(self, x, kw):
        x = self._branch(x, self.adapter_attn, self.ops.first_norm, self.ops.attn_from, kw)
        return self._branch(x, self.adapter_mlp, self.ops.mlp_norm, self.ops.mlp_from, kw)

    def _branch(self, x, adapter, norm, rest, kw):
        """``y + rest(norm(y))`` with ``y = adapter(x)`` (or ``x``)."""
        if adapter is None:
            return x + rest(self.block, norm(self.block, x), kw)
        if self.recompute_adapters:
            y, n = run_region(self._adapt_and_norm, x, adapter, norm)
        else:
            y = adapter(x)
            n = norm(self.block, y)
        return y + rest(self.block, n, kw)

    def _adapt_and_norm(self, x, adapter, norm):
        y = adapter(x)
        return y, norm(self.block, y)


# ---------------------------------------------------------------------- registration
from .recompute import CHECKPOINT_OPTIONS, RECOMPUTE_ADAPTERS_OPTION, checkpointed_blocks  # noqa: E402
from .registry import InjectContext, Injected, MethodSpec, Option, positive_int, register_method  # noqa: E402


def _inject(ctx: InjectContext) -> Injected:
    """ST-Adapters before each block's MLP (``12x384``) or before attention and MLP (``24x384``)."""
    tower, o = ctx.tower, ctx.options
    where = PRESETS[o["preset"]]
    r = o["bottleneck"]

    def make():
        return STAdapter(tower.width, r, ctx.num_frames, layout=tower.layout, num_prefix_tokens=tower.num_prefix_tokens,
                         backend=o["backend"]).to(**ctx.factory)

    ckpt = checkpointed_blocks(o["checkpointing"], o["checkpoint_every"], tower.depth)
    for i, blk in enumerate(tower.blocks):
        tower.blocks[i] = STAdapterBlock(blk, tower.ops, make() if "attn" in where else None,
                                         make() if "mlp" in where else None, checkpoint=i in ckpt,
                                         recompute_adapters=o["recompute_adapters"])
    return Injected()


register_method(MethodSpec(
    "st_adapter",
    {"preset": Option("12x384", str, "adapter placement: 12x384 (before each MLP) or 24x384 (attention and MLP)",
                      choices=tuple(PRESETS)),
     "bottleneck": positive_int("bottleneck width r", 384),
     **CHECKPOINT_OPTIONS, **RECOMPUTE_ADAPTERS_OPTION},
    inject=_inject, checkpointing="option"))
