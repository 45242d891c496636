"""Side4Video: a side network fed by multi-level backbone features (ops: ``vpeft_kernels.reference``).

The backbone runs without an autograd graph; the side network reads chosen layers'
token features through the ladder projection, keeps its own patch tokens (no
[CLS]), mixes time with a depthwise temporal conv, and lets each frame's patches
attend to a [CLS] token shifted in from the neighbouring frames.

Backbones without a [CLS] token (SigLIP, PE-Core bigG, ViTamin): the shifted token is
the backbone's own pooled feature of each frame at that level (its attention pool or
patch mean), projected by the ladder like a [CLS] would be; register tokens are not
read. This is vpeft's extension of the paper, which only uses CLIP/EVA [CLS] models
(see :meth:`vpeft.backbones.towers.VisionTower.side_view`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vpeft_kernels.reference import temporal_taps

from . import ops
from .recompute import recomputing, run_region

HEAD_DIM = 64
RELEASED_INIT_DEPTH = 12
"""Depth in the released side blocks' output-projection init ``d^-0.5 * (2 * 12)^-0.5`` (fixed there)."""


def ladder_layers(backbone_layers: int, side_layers: int) -> List[int]:
    """0-based backbone layers read by the side blocks.

    ``side_layers == backbone_layers`` uses every layer; fewer side blocks read every
    ``backbone_layers // side_layers``-th layer ending at the last one (for half as
    many: 1, 3, 5, ... 0-based).
    """
    if side_layers < 1 or side_layers > backbone_layers:
        raise ValueError(f"side_layers={side_layers} must be between 1 and the backbone depth {backbone_layers}")
    if backbone_layers % side_layers:
        raise ValueError(f"side_layers={side_layers} must divide the backbone depth {backbone_layers}")
    step = backbone_layers // side_layers
    return [(i + 1) * step - 1 for i in range(side_layers)]


class _RecomputeSafeBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose running statistics are updated exactly once per forward pass of a step.

    In training mode a forward that runs inside the backward pass (the recomputation of
    an activation-checkpointed region) normalises with the same batch statistics as the
    first forward, so it gives the same output, but leaves ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` alone. The released EVA side blocks get
    the same effect by keeping their BatchNorms outside the checkpointed functions; this
    way any checkpoint region (one per sub-block or one per side block) is safe.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and recomputing() and self.running_mean is not None:
            self._check_input_dim(x)
            # Scratch copies of the statistics: the op saves the same tensors for backward as
            # the first forward did (the checkpoint checks that), and the real buffers stay put.
            return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias,
                                True, 0.0, self.eps)
        return super().forward(x)


class VideoBatchNorm(_RecomputeSafeBatchNorm, nn.BatchNorm3d):
    """``BatchNorm3d`` on ``(B, d, T, H, W)``, safe under activation checkpointing."""


class TokenBatchNorm(_RecomputeSafeBatchNorm, nn.BatchNorm1d):
    """BatchNorm over the channel (last) dim of tokens ``(..., d)``.

    Same statistics and parameters as ``BatchNorm3d`` on the ``(B, d, T, H, W)`` view;
    safe under activation checkpointing (see :class:`_RecomputeSafeBatchNorm`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


class TemporalTaps(nn.Module):
    """Depthwise 3-tap temporal conv with bias on ``(B*T, N, C)`` tokens (a Conv3d(C, C, (3,1,1), groups=C))."""

    def __init__(self, channels: int, num_frames: int):
        super().__init__()
        self.num_frames = num_frames
        self.weight = nn.Parameter(torch.empty(channels, 3))
        self.bias = nn.Parameter(torch.empty(channels))
        bound = 1.0 / math.sqrt(3.0)  # Conv3d's default: fan_in = 1 * 3 * 1 * 1
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bt, n, c = x.shape
        h = x.reshape(bt // self.num_frames, self.num_frames, n, c)
        return temporal_taps(h, self.weight, self.bias).reshape(bt, n, c)


class SideStem(nn.Module):
    """``BN3d(Conv3d(3 -> d, (3, p, p), stride (1, p, p), padding (1, 0, 0)))`` -> ``(B*T, N, d)``."""

    def __init__(self, width: int, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(in_chans, width, (3, patch_size, patch_size), stride=(1, patch_size, patch_size),
                              padding=(1, 0, 0))
        self.norm = VideoBatchNorm(width)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``video`` ``(B, 3, T, H, W)`` -> ``(B*T, N, d)``."""
        x = self.norm(self.conv(video))                         # (B, d, T, h, w)
        b, d, t = x.shape[:3]
        return x.flatten(3).permute(0, 2, 3, 1).reshape(b * t, -1, d)


class LadderProjection(nn.Module):
    """Per-level LayerNorm and Linear from backbone width ``D`` to side width ``d``.

    ``norm="pre"``: ``Linear(LN_D(z))`` (CLIP); ``norm="post"``: ``LN_d(Linear(z))`` (EVA).
    Parameters are stacked over levels so the fused op sees them as one tensor each.
    """

    def __init__(self, levels: int, backbone_width: int, side_width: int, norm: str = "pre",
                 backend: Optional[str] = None):
        super().__init__()
        self.backend = backend   # the op backend (None: VPEFT_BACKEND, else auto)
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        self.norm = norm
        ln_dim = backbone_width if norm == "pre" else side_width
        self.ln_weight = nn.Parameter(torch.ones(levels, ln_dim))
        self.ln_bias = nn.Parameter(torch.zeros(levels, ln_dim))
        self.weight = nn.Parameter(torch.empty(levels, side_width, backbone_width))
        self.bias = nn.Parameter(torch.empty(levels, side_width))
        bound = 1.0 / math.sqrt(backbone_width)  # nn.Linear's default init, per level
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``L`` tensors ``(..., D)`` -> ``(L, ..., d)``."""
        return ops.call("ladder_projection", list(features), self.ln_weight, self.ln_bias, self.weight, self.bias,
                        norm=self.norm, backend=self.backend)

    def level(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """Project one level: ``z`` ``(..., D)`` through level ``i``'s norm and Linear -> ``(..., d)``.

        Same op as :meth:`forward` on a one-level list (the parameters are sliced, so
        gradients land in the same stacked tensors).
        """
        return self._project(z, *(p[i:i + 1] for p in self._stacked()))

    def _stacked(self):
        return self.ln_weight, self.ln_bias, self.weight, self.bias

    def _project(self, z, ln_weight, ln_bias, weight, bias) -> torch.Tensor:
        return ops.call("ladder_projection", [z], ln_weight, ln_bias, weight, bias, norm=self.norm,
                        backend=self.backend)[0]

    def level_recomputed(self, i: int, z: torch.Tensor, grads: "LevelGradients") -> torch.Tensor:
        """:meth:`level` without keeping ``z`` for backward (``recompute_levels``).

        The output is the same; its gradient is handed to ``grads``, which computes the
        ladder's parameter gradients once every level's gradient has arrived, from
        levels produced again by a second frozen forward.
        """
        return _RecomputedLevel.apply(z, *self._stacked(), i, grads)


class LevelGradients:
    """The ladder's parameter gradients of one forward pass under ``recompute_levels``.

    The forward keeps no level input; backward hands each level's output gradient
    ``dL/du_i`` ``(B*T, 1+N, d)`` here (``d``-wide: a third of the ``D``-wide input at
    ViT-E). When the last one arrives, ``levels()`` runs the frozen tower a second time
    (under ``no_grad``, level by level) and each level's parameter gradients are
    computed from it, exactly as the kept-input path computes them, and the level and
    its output gradient are released before the next.

    Args:
        ladder: the :class:`LadderProjection`. count: number of levels.
        levels: returns a fresh iterator over the ``count`` level inputs.
    """

    def __init__(self, ladder: "LadderProjection", count: int, levels: Callable[[], Iterator[torch.Tensor]]):
        self.ladder = ladder
        self.count = count
        self.levels = levels
        self._reset()

    def _reset(self):
        self.grads: List[Optional[torch.Tensor]] = [None] * self.count
        self.pending = self.count

    def received(self, i: int, grad: torch.Tensor):
        """Store level ``i``'s output gradient; after the last, return the 4 stacked parameter gradients."""
        if self.grads[i] is not None:
            raise RuntimeError(f"ladder level {i} received a second gradient before the others arrived")
        self.grads[i] = grad
        self.pending -= 1
        if self.pending:
            return None
        try:
            return self._parameter_grads()
        finally:
            self._reset()  # a second backward over a retained graph starts afresh

    def _parameter_grads(self):
        params = self.ladder._stacked()
        full = [torch.zeros_like(p) for p in params]
        produced = 0
        with torch.enable_grad():
            for i, z in enumerate(self.levels()):
                if i >= self.count:
                    break
                rows = [p.detach()[i:i + 1].requires_grad_() for p in params]
                u = self.ladder._project(z, *rows)
                for buf, g in zip(full, torch.autograd.grad(u, rows, self.grads[i])):
                    buf[i:i + 1] = g
                self.grads[i] = u = z = rows = None
                produced += 1
        if produced != self.count:
            raise RuntimeError(f"the second frozen forward gave {produced} ladder levels, expected {self.count}")
        return full


class _RecomputedLevel(torch.autograd.Function):
    """One ladder level whose input is not saved: see :class:`LevelGradients`."""

    @staticmethod
    def forward(ctx, z, ln_weight, ln_bias, weight, bias, i, grads):
        ctx.i, ctx.grads = i, grads
        ladder = grads.ladder
        return ladder._project(z, ln_weight[i:i + 1], ln_bias[i:i + 1], weight[i:i + 1], bias[i:i + 1])

    @staticmethod
    def backward(ctx, grad):
        full = ctx.grads.received(ctx.i, grad)
        if full is None:
            return (None,) * 7
        return (None, *full, None, None)


class SideBlock(nn.Module):
    """One side block: temporal conv, [CLS] token-shift attention, MLP.

    Pre-norm (CLIP): ``s += pw2(dw_t(pw1(BN(s))))``; ``s += MHA(LN(...))``;
    ``s += fc2(gelu(fc1(BN(s))))``. Post-norm (EVA): ``s += BN(conv(s))``;
    ``s += LN(attn(...))``; ``s += BN(mlp(s))``. Heads of width 64.

    ``checkpointing``: the whole block is one recomputation region
    (:func:`vpeft.methods.recompute.run_region`): backward keeps its inputs ``s``, ``c``
    (and ``pos``, a parameter) and nothing else, and runs the block again when it gets
    there. The BatchNorms inside update their running statistics in the forward only
    (:class:`TokenBatchNorm`).
    """

    def __init__(self, width: int, num_frames: int, post_norm: bool = False, mlp_ratio: float = 4.0,
                 checkpointing: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend   # the op backend (None: VPEFT_BACKEND, else auto)
        if width % HEAD_DIM:
            raise ValueError(f"side_width={width} must be a multiple of {HEAD_DIM} (attention head width)")
        self.num_frames = num_frames
        self.num_heads = width // HEAD_DIM
        self.post_norm = post_norm
        self.checkpointing = checkpointing
        hidden = int(width * mlp_ratio)
        self.conv_norm = TokenBatchNorm(width)
        self.pw1 = nn.Linear(width, width)
        self.dw = TemporalTaps(width, num_frames)
        self.pw2 = nn.Linear(width, width)
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = TokenBatchNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        if not post_norm:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released CLIP recognition side blocks' init (``Recognition/clip/model.py``,
        ``AttnCBlock.__init__``); with ``d`` the side width:

        - attention qkv ``N(0, d^-0.5)``, its bias 0 (``nn.MultiheadAttention``'s own);
        - attention output and ``fc2`` ``N(0, d^-0.5 * (2 * 12)^-0.5)``, the output bias 0;
        - ``fc1`` ``N(0, (2d)^-0.5)``;
        - everything else (the temporal conv, the ``fc1``/``fc2`` biases, the norms) keeps
          PyTorch's default init, as it does there.

        The depth factor ``(2 * 12)^-0.5`` is a constant in the released code (it does not
        follow the number of side blocks; the L/14 side network with 24 blocks uses it too),
        so it is :data:`RELEASED_INIT_DEPTH` here, whatever the depth. The post-norm (EVA)
        blocks keep PyTorch's defaults, as the released EVA code does.
        """
        d = self.qkv.in_features
        proj_std = d ** -0.5 * (2 * RELEASED_INIT_DEPTH) ** -0.5
        nn.init.normal_(self.qkv.weight, std=d ** -0.5)
        nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.out.weight, std=proj_std)
        nn.init.zeros_(self.out.bias)
        nn.init.normal_(self.fc1.weight, std=(2 * d) ** -0.5)
        nn.init.normal_(self.fc2.weight, std=proj_std)

    def _conv(self, s):
        if self.post_norm:
            return self.conv_norm(self.pw2(self.dw(self.pw1(s))))
        return self.pw2(self.dw(self.pw1(self.conv_norm(s))))

    def _attn(self, s, c, pos):
        ln_w, ln_b = (None, None) if self.post_norm else (self.attn_norm.weight, self.attn_norm.bias)
        a = ops.call(
            "token_shift_attention", s, c, pos, ln_w, ln_b, self.qkv.weight, self.qkv.bias, self.out.weight,
            self.out.bias, num_frames=self.num_frames, num_heads=self.num_heads, eps=self.attn_norm.eps,
            backend=self.backend)
        return self.attn_norm(a) if self.post_norm else a

    def _mlp(self, s):
        if self.post_norm:
            return self.mlp_norm(self.fc2(F.gelu(self.fc1(s))))
        return self.fc2(F.gelu(self.fc1(self.mlp_norm(s))))

    def _body(self, s, c, pos):
        s = s + self._conv(s)
        s = s + self._attn(s, c, pos)
        return s + self._mlp(s)

    def forward(self, s: torch.Tensor, c: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``s`` ``(B*T, N, d)`` side tokens, ``c`` ``(B*T, d)`` projected [CLS], ``pos`` ``(N, d)``
        (or ``(N+1, d)`` with a [CLS] row, see :meth:`SideNetwork.add_cls_position`)."""
        if self.checkpointing:
            return run_region(self._body, s, c, pos)
        return self._body(s, c, pos)


class SideNetwork(nn.Module):
    """The Side4Video side network (stem, position embedding, ladder, side blocks).

    Args:
        backbone_width, backbone_layers: ``D`` and ``L`` of the frozen vision tower.
        side_width, side_layers: ``d`` and ``l``.
        num_frames: ``T``. patch_size: the backbone's patch size. num_patches: ``N``.
        post_norm: post-norm side blocks and ``Linear -> LN`` ladder (EVA).
        fusion: ``"mean"`` (released code: ``0.5 s + 0.5 u``) or ``"sum"`` (paper Eq. 2).
        pos_std: init std of the position embedding (0.01 CLIP, 0.02 EVA).
        checkpointing: recompute side blocks in backward (one region per block, see
            :class:`SideBlock`): ``True`` for all, or a collection of 0-based block indices.
    """

    def __init__(self, backbone_width: int, backbone_layers: int, side_width: int = 320, side_layers: int = 12,
                 num_frames: int = 8, patch_size: int = 16, num_patches: int = 196, post_norm: bool = False,
                 fusion: str = "mean", pos_std: Optional[float] = None,
                 checkpointing: Union[bool, Iterable[int]] = False, backend: Optional[str] = None):
        super().__init__()
        if fusion not in ("mean", "sum"):
            raise ValueError(f"fusion must be 'mean' or 'sum', got {fusion!r}")
        self.layer_ids = ladder_layers(backbone_layers, side_layers)
        self.post_norm = post_norm
        self.fusion = fusion
        self.num_frames = num_frames
        self.stem = SideStem(side_width, patch_size)
        self.num_patches = num_patches
        self.pos = nn.Parameter(torch.randn(num_patches, side_width) * (pos_std or (0.02 if post_norm else 0.01)))
        self.ladder = LadderProjection(side_layers, backbone_width, side_width, "post" if post_norm else "pre",
                                       backend=backend)
        ckpt = set(range(side_layers)) if checkpointing is True else set(checkpointing or ())
        self.blocks = nn.ModuleList(
            SideBlock(side_width, num_frames, post_norm=post_norm, checkpointing=i in ckpt, backend=backend)
            for i in range(side_layers))

    def add_cls_position(self, std: float = 0.01) -> None:
        """Make the position embedding ``(N+1, d)``, ``N(0, std)``: row 0 is added to the
        shifted [CLS] in every side block, rows ``1..N`` to the patches (the released
        retrieval side network, ``Retrieval/modules/module_clip.py``)."""
        p = self.pos
        self.pos = nn.Parameter(torch.randn(self.num_patches + 1, p.shape[1], device=p.device, dtype=p.dtype) * std)

    def forward(self, video: torch.Tensor, features: Union[Sequence[torch.Tensor], Iterable[torch.Tensor]],
                recompute_levels: Optional[Callable[[], Iterator[torch.Tensor]]] = None) -> torch.Tensor:
        """``video`` ``(B, 3, T, H, W)``; ``features[i]`` ``(B*T, 1+N, D)`` is the output of
        backbone layer ``layer_ids[i]``. Returns side tokens ``(B*T, N, d)``.

        ``features`` is either a list/tuple of all levels (projected together by one
        ladder call), or an iterator that yields them one at a time (streaming: each
        level is projected and fused into its side block as soon as it arrives, so the
        producer can advance the frozen tower lazily; see
        :meth:`vpeft.model.VideoModel._side_tokens`). Both give the same result.

        ``recompute_levels``: a callable returning a fresh iterator over the same levels
        (a second frozen forward). Given, the ladder keeps no level input for backward
        (:class:`LevelGradients`); levels are then projected one at a time either way.
        """
        grads = None
        if recompute_levels is not None:
            grads = LevelGradients(self.ladder, len(self.blocks), recompute_levels)
            levels = iter(features)
            project = lambda i, z: self.ladder.level_recomputed(i, z, grads)  # noqa: E731
        elif isinstance(features, (list, tuple)):
            if len(features) != len(self.blocks):
                raise ValueError(f"expected {len(self.blocks)} ladder features, got {len(features)}")
            u = self.ladder(features)                           # (l, B*T, 1+N, d)
            levels = iter(u.unbind(0))
            del u  # one storage for all levels: alive until the last level's view is consumed
            project = lambda i, z: z  # noqa: E731 - already projected
        else:
            levels = iter(features)
            project = self.ladder.level
        s = self.stem(video)
        if s.shape[1] != self.num_patches:
            raise ValueError(f"stem produced {s.shape[1]} patches per frame, expected {self.num_patches}")
        pos = self.pos.to(s.dtype)
        for i, block in enumerate(self.blocks):
            z = next(levels, None)
            if z is None:
                raise ValueError(f"expected {len(self.blocks)} ladder features, the iterator gave {i}")
            ui = project(i, z)
            del z  # streaming: the level's features live on only where autograd saved them
            patches = ui[:, 1:].to(s.dtype)
            # the projected [CLS] is copied: a view would keep all of ui alive as long as
            # the block's backward keeps c (a checkpoint region's input)
            c = ui[:, 0].to(s.dtype, copy=True)
            s = 0.5 * s + 0.5 * patches if self.fusion == "mean" else s + patches
            del ui, patches
            s = block(s, c, pos)
            del c
        return s


class SideHead(nn.Module):
    """Recognition head: ``BN3d``, mean over ``T*N``, dropout, ``Linear(d -> classes)``.

    ``norm=False`` drops the BatchNorm (mean only): the released EVA head (the post-norm
    side network's ``side_post_bn`` is commented out there). ``dropout`` defaults to 0,
    the ``drop_fc`` of every released Side4Video config. With ``num_classes=None`` only
    the pooled features are offered (no classifier); the classifier keeps ``nn.Linear``'s
    default init, as in the released ``train_vision.py``.
    """

    def __init__(self, width: int, num_classes: Optional[int] = None, dropout: float = 0.0, num_frames: int = 8,
                 norm: bool = True):
        super().__init__()
        self.num_frames = num_frames
        self.norm = TokenBatchNorm(width) if norm else None
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes) if num_classes else None

    def features(self, s: torch.Tensor) -> torch.Tensor:
        """``(B*T, N, d)`` -> ``(B, d)``."""
        x = self.norm(s) if self.norm is not None else s
        bt, n, d = x.shape
        return x.reshape(bt // self.num_frames, self.num_frames * n, d).mean(1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(s)))


# ---------------------------------------------------------------------- registration
from ..backbones.towers import UnsupportedBackbone, refusal  # noqa: E402
from .recompute import CHECKPOINT_OPTIONS, checkpointed_blocks  # noqa: E402
from .registry import InjectContext, Injected, MethodSpec, Option, positive_int, register_method  # noqa: E402


def _inject(ctx: InjectContext) -> Injected:
    """A :class:`SideNetwork` reading the frozen tower's layers, and a :class:`SideHead` (always: its
    pooling defines the video feature)."""
    tower, o = ctx.tower, ctx.options
    if tower.layout != "bt":
        raise ValueError("side4video is not defined on ViCLIP: the side network's ladder, [CLS] token shift and "
                         "retrieval head need per-frame features with a [CLS] token per frame, and ViCLIP has one "
                         "[CLS] for the whole clip (joint space-time attention). Use an open_clip CLIP or EVA "
                         "backbone for side4video, or msta/st_adapter on ViCLIP.")
    with torch.no_grad():  # a tower without [CLS] must pool to token width (its pooled feature is the shifted token)
        p0 = next(ctx.model.parameters())
        try:
            tower.side_view(torch.zeros(1, tower.num_prefix_tokens + 1, tower.width, dtype=p0.dtype, device=p0.device))
        except UnsupportedBackbone as e:
            raise refusal(ctx.model, f"side4video: {e}") from None
    norm = o["norm"] or ("post" if tower.post_norm else "pre")
    if tower.patch_size[0] != tower.patch_size[1]:
        raise ValueError(f"side4video needs square patches, got {tower.patch_size}")
    side_layers = o["side_layers"] or tower.depth
    ckpt = checkpointed_blocks(o["checkpointing"], o["checkpoint_every"], side_layers)
    side = SideNetwork(tower.width, tower.depth, o["side_width"], side_layers, ctx.num_frames,
                       tower.patch_size[0], tower.num_patches, post_norm=(norm == "post"), fusion=o["fusion"],
                       pos_std=o["pos_std"], checkpointing=ckpt, backend=o["backend"]).to(**ctx.factory)
    head = SideHead(side.pos.shape[1], ctx.num_classes, o["dropout"], ctx.num_frames,
                    norm=not side.post_norm).to(**ctx.factory)
    recompute = o["stream"] if o["recompute_levels"] is None else o["recompute_levels"]
    return Injected(side=side, head=head, side_stream=o["stream"], side_recompute_levels=recompute,
                    tower_chunk=o["tower_chunk"])


register_method(MethodSpec(
    "side4video",
    {"side_width": positive_int("side network width d (a multiple of 64)", 320),
     "side_layers": positive_int("side blocks l (must divide the backbone depth; None: the depth)", None),
     "fusion": Option("mean", str, "ladder fusion: mean (released code) or sum (paper Eq. 2)",
                      choices=("mean", "sum")),
     "norm": Option(None, str, "pre (CLIP) or post (EVA) ladder/side norms; None: from the backbone",
                    choices=("pre", "post")),
     **CHECKPOINT_OPTIONS,
     "stream": Option(False, bool, "advance the frozen tower only as far as the side network has consumed"),
     "recompute_levels": Option(None, bool, "keep no backbone level for the ladder's weight gradients: a second "
                                            "frozen forward in backward provides them (None: the value of stream)"),
     "tower_chunk": positive_int("run each frozen block on this many frames at a time (None: all)", None),
     "pos_std": Option(None, float, "init std of the position embedding (None: 0.01 CLIP, 0.02 EVA)",
                       valid=lambda v: v >= 0, expected="a non-negative number or None")},
    inject=_inject, checkpointing="option", backbone_grad=False, joint_space=False,
    common_defaults={"dropout": 0.0}))   # no head dropout, as in every released Side4Video config
