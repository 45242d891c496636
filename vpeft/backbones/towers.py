"""Uniform per-frame views of the vision and text towers of open_clip models.

vpeft adapts a model the user already has. Two families of vision towers are
understood:

* open_clip's native ``VisionTransformer`` (ViT-B-16, ViT-L-14, custom configs):
  blocks are ``ResidualAttentionBlock`` (``ln_1, attn, ls_1, ln_2, mlp, ls_2``) or
  ``CustomResidualAttentionBlock``;
* open_clip's ``TimmModel`` wrapping a timm ``Eva`` trunk (EVA02-B-16 ... EVA02-E-14):
  blocks are ``EvaBlock`` (pre-norm) or ``EvaBlockPostNorm`` (post-norm, ViT-E).

and one video tower:

* vpeft's :class:`vpeft.backbones.viclip.ViCLIPVision` (kind ``"viclip"``): joint
  space-time attention over one clip, open_clip ``ResidualAttentionBlock`` s.

A tower exposes its token stream block by block (``embed`` / ``embed_video``,
``blocks``), the pieces of one block (:class:`BlockOps`) so adapters can be placed
inside it, and the final norm and projection of the [CLS] feature. The stream's
``layout`` is ``"bt"`` for per-frame towers, ``(B*T, 1+N, D)`` with a [CLS] per frame,
and ``"nt"`` for ViCLIP, ``(B, 1+N*T, D)`` with one [CLS] and patches in ``(n t)`` order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class BlockOps:
    """The residual branches of one transformer block, called on the block's modules.

    ``attn(block, x, kw)`` and ``mlp(block, x, kw)`` return what the block adds to its
    residual stream; ``first_norm(block, x)`` is the normalisation the attention branch
    sees (for post-norm blocks, which have none before attention, the input itself).
    ``kw`` holds the extra arguments the block was called with (attention mask, rope).
    """

    post_norm = False

    def attn(self, b, x, kw):  # pragma: no cover - interface
        raise NotImplementedError

    def mlp(self, b, x, kw):  # pragma: no cover - interface
        raise NotImplementedError

    def first_norm(self, b, x):  # pragma: no cover - interface
        raise NotImplementedError

    def call_kwargs(self, args, kwargs) -> Dict[str, Any]:
        """Normalise how the enclosing transformer called the block into keywords."""
        return dict(kwargs)


class OpenCLIPBlockOps(BlockOps):
    """open_clip ``ResidualAttentionBlock`` / ``CustomResidualAttentionBlock``."""

    def call_kwargs(self, args, kwargs):
        kw = dict(kwargs)
        # open_clip calls ``r(x, attn_mask=m)`` or, under checkpointing, ``r(x, None, None, m)``
        if len(args) >= 3:
            kw["attn_mask"] = args[2]
        kw.pop("k_x", None)
        kw.pop("v_x", None)
        return kw

    def attn(self, b, x, kw):
        mask = kw.get("attn_mask")
        if hasattr(b, "attention"):
            return b.ls_1(b.attention(q_x=b.ln_1(x), attn_mask=mask))
        return b.ls_1(b.ln_attn(b.attn(b.ln_1(x), attn_mask=mask)))

    def mlp(self, b, x, kw):
        return b.ls_2(b.mlp(b.ln_2(x)))

    def first_norm(self, b, x):
        return b.ln_1(x)


class EvaBlockOps(BlockOps):
    """timm ``EvaBlock`` (pre-norm, with optional layer-scale ``gamma``)."""

    def _attn_kw(self, kw):
        return dict(rope=kw.get("rope"), attn_mask=kw.get("attn_mask"), is_causal=kw.get("is_causal", False))

    def attn(self, b, x, kw):
        a = b.attn(b.norm1(x), **self._attn_kw(kw))
        if getattr(b, "gamma_1", None) is not None:
            a = b.gamma_1 * a
        return b.drop_path1(a)

    def mlp(self, b, x, kw):
        m = b.mlp(b.norm2(x))
        if getattr(b, "gamma_2", None) is not None:
            m = b.gamma_2 * m
        return b.drop_path2(m)

    def first_norm(self, b, x):
        return b.norm1(x)


class EvaPostNormBlockOps(EvaBlockOps):
    """timm ``EvaBlockPostNorm``: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``."""

    post_norm = True

    def attn(self, b, x, kw):
        return b.drop_path1(b.norm1(b.attn(x, **self._attn_kw(kw))))

    def mlp(self, b, x, kw):
        return b.drop_path2(b.norm2(b.mlp(x)))

    def first_norm(self, b, x):
        return x


def block_ops(block: nn.Module) -> BlockOps:
    """The :class:`BlockOps` that understands ``block``, or a ValueError naming its type."""
    name = type(block).__name__
    if hasattr(block, "ln_1") and hasattr(block, "ln_2") and hasattr(block, "mlp"):
        return OpenCLIPBlockOps()
    if name == "EvaBlockPostNorm":
        return EvaPostNormBlockOps()
    if hasattr(block, "norm1") and hasattr(block, "norm2") and hasattr(block, "attn"):
        return EvaBlockOps()
    raise ValueError(f"unsupported transformer block type {name}; expected an open_clip "
                     "ResidualAttentionBlock or a timm EvaBlock/EvaBlockPostNorm")


@dataclass
class VisionTower:
    """A per-frame view of an open_clip vision tower (``model.visual``)."""

    visual: nn.Module
    kind: str                    # "openclip_vit", "timm_eva" or "viclip"
    blocks: nn.ModuleList
    ops: BlockOps
    width: int
    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def post_norm(self) -> bool:
        return self.ops.post_norm

    @property
    def layout(self) -> str:
        """``"bt"``: per-frame tokens ``(B*T, 1+N, D)``; ``"nt"``: one clip ``(B, 1+N*T, D)``."""
        return "nt" if self.kind == "viclip" else "bt"

    def embed_video(self, video: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Video ``(B, T, 3, H, W)`` -> the token stream in this tower's :attr:`layout`."""
        if self.kind == "viclip":
            return self.visual.embed(video), {}
        return self.embed(video.flatten(0, 1))

    def embed(self, frames: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Images ``(M, 3, H, W)`` -> tokens ``(M, 1+N, D)`` and the keywords every block needs."""
        v = self.visual
        if self.kind == "viclip":
            raise ValueError("a ViCLIP tower embeds whole clips; use embed_video((B, T, 3, H, W))")
        if self.kind == "openclip_vit":
            return v._embeds(frames), {}
        trunk = v.trunk
        x = trunk.patch_embed(frames)
        x, rope = trunk._pos_embed(x)
        x = trunk.norm_pre(x)
        return x, {"rope": rope}

    def final_norm(self, cls: torch.Tensor) -> torch.Tensor:
        """The tower's final normalisation applied to a [CLS] feature ``(..., D)``."""
        if self.kind in ("openclip_vit", "viclip"):
            return self.visual.ln_post(cls)
        trunk = self.visual.trunk
        return trunk.fc_norm(trunk.norm(cls))

    def project(self, feat: torch.Tensor) -> torch.Tensor:
        """The tower's output projection (into the joint image-text space)."""
        if self.kind in ("openclip_vit", "viclip"):
            proj = self.visual.proj
            return feat if proj is None else feat @ proj
        trunk = self.visual.trunk  # open_clip uses the trunk's classifier as projection when timm_proj is null
        return self.visual.head(trunk.head(trunk.head_drop(feat)))

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`project`'s output (the joint image-text space)."""
        with torch.no_grad():
            p = next(self.visual.parameters())
            return self.project(torch.zeros(1, self.width, dtype=p.dtype, device=p.device)).shape[-1]


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def vision_tower(model: nn.Module) -> VisionTower:
    """Build the :class:`VisionTower` of an open_clip model (or of its ``.visual``)."""
    v = getattr(model, "visual", model)
    mean = tuple(getattr(v, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(v, "image_std", None) or OPENAI_STD)
    from .viclip import ViCLIPVision  # local import: viclip imports nothing from here, but keep towers light
    if isinstance(v, ViCLIPVision):
        blocks = v.transformer.resblocks
        return VisionTower(v, "viclip", blocks, block_ops(blocks[0]), int(v.transformer.width),
                           _pair(v.image_size), _pair(v.patch_size), mean, std)
    if hasattr(v, "transformer") and hasattr(v, "conv1") and hasattr(v, "class_embedding"):
        if getattr(v, "attn_pool", None) is not None:
            raise ValueError("open_clip vision towers with attentional pooling (CoCa) are not supported")
        if not getattr(v.transformer, "batch_first", True):
            raise ValueError("open_clip transformer with batch_first=False is not supported")
        blocks = v.transformer.resblocks
        return VisionTower(v, "openclip_vit", blocks, block_ops(blocks[0]), int(v.transformer.width),
                           _pair(v.image_size), _pair(v.patch_size), mean, std)
    trunk = getattr(v, "trunk", None)
    if trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "_pos_embed"):
        if getattr(trunk, "num_prefix_tokens", 1) != 1 or getattr(trunk, "cls_token", None) is None:
            raise ValueError("timm towers must have exactly one [CLS] token and no register tokens, "
                             f"got num_prefix_tokens={getattr(trunk, 'num_prefix_tokens', None)}")
        pe = trunk.patch_embed
        return VisionTower(v, "timm_eva", trunk.blocks, block_ops(trunk.blocks[0]), int(trunk.embed_dim),
                           _pair(pe.img_size), _pair(pe.patch_size), mean, std)
    raise ValueError(f"unsupported vision tower {type(v).__name__}: expected an open_clip model with a "
                     "native VisionTransformer or a timm Eva trunk (EVA02-*)")


@dataclass
class TextTower:
    """The text transformer of an open_clip model (CLIP or CustomTextCLIP)."""

    blocks: nn.ModuleList
    ops: BlockOps
    width: int


def text_tower(model: nn.Module) -> Optional[TextTower]:
    """The model's :class:`TextTower`, or None when it has no text transformer."""
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        t = model.transformer
    elif hasattr(getattr(model, "text", None), "transformer"):
        t = model.text.transformer
    else:
        return None
    if not hasattr(t, "resblocks"):
        return None
    return TextTower(t.resblocks, block_ops(t.resblocks[0]), int(t.width))
