"""One view of every vision tower vpeft adapts: the tower abstraction and its family table.

A :class:`VisionTower` is what every method sees of a backbone's vision side:

* its **token layout**: ``num_prefix_tokens`` leading tokens ([CLS] and/or register
  tokens, or none) followed by the patch tokens; ``layout`` ``"bt"`` (per-frame towers,
  ``(B*T, P+N, D)``) or ``"nt"`` (ViCLIP: one clip, ``(B, 1+N*T, D)``, patches in
  ``(n t)`` order);
* **per-block access**: ``blocks`` (replaced in place by adapters) and, per block, the
  :class:`BlockOps` that split it into its residual branches;
* the **model's own pooling** as callables: :meth:`VisionTower.pool_tokens` (the
  reduction of the last block's tokens: [CLS], the patch mean, an attention pool ...)
  and :meth:`VisionTower.final_norm` (what the model applies after that reduction),
  ``pool = final_norm . pool_tokens``, then :meth:`VisionTower.project` into the joint
  image-text space;
* **multi-level features** (:meth:`VisionTower.forward_intermediates`, after timm's
  method of the same name, and its lazy twin :meth:`VisionTower.iter_intermediates`).

Each supported family is one small adapter class registered in :data:`FAMILIES`
(name -> how to recognise a module -> how to read it); :func:`vision_tower` walks the
table, and a module no family recognises is refused with one
:class:`UnsupportedBackbone` error that names its class, why, and the supported families.
Adding a family is one subclass with ``@register_family``.

Families today:

* ``openclip_vit``: open_clip's native ``VisionTransformer`` (CLIP ViT-*, CLIPA with
  ``pool_type='avg'`` / ``final_ln_after_pool``, CoCa's attentional pooler);
* ``timm_vit``: timm ``VisionTransformer`` with ``Block`` blocks, bare or inside
  open_clip's ``TimmModel`` (SigLIP / SigLIP2 "map" heads, MobileCLIP-B/L ViTs, ViTamin,
  DeiT, DINOv2 with registers, plain ``vit_*``);
* ``timm_eva``: timm ``Eva`` (EVA01/EVA02 incl. post-norm ViT-E, PE-Core with its
  attention pooling and rotary embeddings), bare or inside ``TimmModel``;
* ``viclip``: vpeft's :class:`vpeft.backbones.viclip.ViCLIPVision`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class UnsupportedBackbone(ValueError):
    """vpeft cannot adapt this model (or this model with this method); the message says why."""


class BlockOps:
    """The residual branches of one transformer block, called on the block's modules.

    ``attn(block, x, kw)`` and ``mlp(block, x, kw)`` return what the block adds to its
    residual stream. Each branch is its normalisation and the rest:
    ``attn(b, x, kw) == attn_from(b, first_norm(b, x), kw)`` and
    ``mlp(b, x, kw) == mlp_from(b, mlp_norm(b, x), kw)``, so a caller can put a norm
    in one recomputation region with what comes before it. For post-norm blocks, which
    have no norm before a branch, ``first_norm`` / ``mlp_norm`` return the input itself.
    ``kw`` holds the extra arguments the block was called with (attention mask, rope).
    """

    post_norm = False

    def attn(self, b, x, kw):
        return self.attn_from(b, self.first_norm(b, x), kw)

    def mlp(self, b, x, kw):
        return self.mlp_from(b, self.mlp_norm(b, x), kw)

    def attn_from(self, b, n, kw):  # pragma: no cover - interface
        raise NotImplementedError

    def mlp_from(self, b, n, kw):  # pragma: no cover - interface
        raise NotImplementedError

    def first_norm(self, b, x):  # pragma: no cover - interface
        raise NotImplementedError

    def mlp_norm(self, b, x):  # pragma: no cover - interface
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

    def attn_from(self, b, n, kw):
        mask = kw.get("attn_mask")
        if hasattr(b, "attention"):
            return b.ls_1(b.attention(q_x=n, attn_mask=mask))
        return b.ls_1(b.ln_attn(b.attn(n, attn_mask=mask)))

    def mlp_from(self, b, n, kw):
        return b.ls_2(b.mlp(n))

    def first_norm(self, b, x):
        return b.ln_1(x)

    def mlp_norm(self, b, x):
        return b.ln_2(x)


class EvaBlockOps(BlockOps):
    """timm ``EvaBlock`` (pre-norm, with optional layer-scale ``gamma``)."""

    def _attn_kw(self, kw):
        return dict(rope=kw.get("rope"), attn_mask=kw.get("attn_mask"), is_causal=kw.get("is_causal", False))

    def attn_from(self, b, n, kw):
        a = b.attn(n, **self._attn_kw(kw))
        if getattr(b, "gamma_1", None) is not None:
            a = b.gamma_1 * a
        return b.drop_path1(a)

    def mlp_from(self, b, n, kw):
        m = b.mlp(n)
        if getattr(b, "gamma_2", None) is not None:
            m = b.gamma_2 * m
        return b.drop_path2(m)

    def first_norm(self, b, x):
        return b.norm1(x)

    def mlp_norm(self, b, x):
        return b.norm2(x)


class EvaPostNormBlockOps(EvaBlockOps):
    """timm ``EvaBlockPostNorm``: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``."""

    post_norm = True

    def attn_from(self, b, n, kw):
        return b.drop_path1(b.norm1(b.attn(n, **self._attn_kw(kw))))

    def mlp_from(self, b, n, kw):
        return b.drop_path2(b.norm2(b.mlp(n)))

    def first_norm(self, b, x):
        return x

    def mlp_norm(self, b, x):
        return x


class TimmBlockOps(BlockOps):
    """timm ``Block`` (``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``)."""

    def attn_from(self, b, n, kw):
        mask = kw.get("attn_mask")
        a = b.attn(n) if mask is None else b.attn(n, attn_mask=mask)
        return b.drop_path1(b.ls1(a))

    def mlp_from(self, b, n, kw):
        return b.drop_path2(b.ls2(b.mlp(n)))

    def first_norm(self, b, x):
        return b.norm1(x)

    def mlp_norm(self, b, x):
        return b.norm2(x)


def block_ops(block: nn.Module) -> BlockOps:
    """The :class:`BlockOps` that understands ``block``, or an :class:`UnsupportedBackbone` naming its type."""
    name = type(block).__name__
    if hasattr(block, "ln_1") and hasattr(block, "ln_2") and hasattr(block, "mlp"):
        return OpenCLIPBlockOps()
    if name == "EvaBlockPostNorm":
        return EvaPostNormBlockOps()
    if name == "EvaBlock":
        return EvaBlockOps()
    if name == "Block" and all(hasattr(block, a) for a in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")):
        return TimmBlockOps()
    raise UnsupportedBackbone(
        f"unsupported transformer block type {type(block).__module__}.{name}: vpeft places adapters between a "
        "block's attention and MLP branches and knows open_clip ResidualAttentionBlock, timm Block, "
        "EvaBlock and EvaBlockPostNorm")


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


# ---------------------------------------------------------------------------------- the abstraction
class VisionTower:
    """A uniform view of one vision tower (see the module docstring).

    Subclasses (one per family, registered with :func:`register_family`) implement
    :meth:`matches` (is this module ours?), ``__init__`` (read it; raise
    :class:`UnsupportedBackbone` for a variant the family cannot honour), :meth:`embed`,
    :meth:`pool_tokens`, :meth:`final_norm` and :meth:`project`.

    Attributes:
        visual: the tower module (``model.visual``, or the bare timm model).
        kind: the family name. blocks: the transformer blocks (a ModuleList, edited in
        place by adapters). ops: :class:`BlockOps` of the blocks. width: ``D``.
        image_size, patch_size: ``(h, w)`` pairs. mean, std: the input normalisation.
        num_prefix_tokens: ``P``, tokens before the patches ([CLS], registers).
        has_cls: whether token 0 is a [CLS] token.
    """

    kind: str = ""
    description: str = ""
    layout: str = "bt"

    def __init__(self, visual: nn.Module, blocks: nn.ModuleList, width: int, image_size, patch_size,
                 num_prefix_tokens: int, has_cls: bool):
        self.visual = visual
        self.blocks = blocks
        if len(blocks) == 0:
            raise UnsupportedBackbone(f"{type(visual).__name__} has no transformer blocks")
        ops = [block_ops(b) for b in blocks]
        if len({type(o) for o in ops}) != 1:
            raise UnsupportedBackbone(f"{type(visual).__name__} mixes block types "
                                      f"{sorted({type(b).__name__ for b in blocks})}; vpeft needs one block type")
        self.ops = ops[0]
        self.width = int(width)
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.has_cls = bool(has_cls)
        self.mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)

    # --------------------------------------------------------------- family interface
    @classmethod
    def matches(cls, visual: nn.Module) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def embed(self, frames: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:  # pragma: no cover
        """Images ``(M, 3, H, W)`` -> tokens ``(M, P+N, D)`` and the keywords the blocks need."""
        raise NotImplementedError

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """The model's reduction of (last-block) tokens ``(M, L, D)`` -> ``(M, F)``."""
        raise NotImplementedError

    def final_norm(self, feat: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """What the model applies after :meth:`pool_tokens` and before :meth:`project`."""
        raise NotImplementedError

    def project(self, feat: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """The tower's output projection (into the joint image-text space; identity when none)."""
        raise NotImplementedError

    def projection_modules(self) -> List[nn.Module]:
        """Modules (or parameters) only :meth:`project` uses (not trained by a classifier run)."""
        return []

    def unused_modules(self) -> List[nn.Module]:
        """Modules of ``visual`` that no vpeft path ever calls (never trainable)."""
        return []

    # --------------------------------------------------------------- derived
    def block_kwargs(self, kw: Dict[str, Any], i: int) -> Dict[str, Any]:
        """The keywords block ``i`` is called with (per-block rotary tables are sliced here)."""
        return kw

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own pooling of one image's final tokens: ``final_norm(pool_tokens(x))``."""
        return self.final_norm(self.pool_tokens(x))

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``(M, 3, H, W)`` -> ``(M, E)``: the tower's own image embedding, block by block."""
        return self.project(self.pool(self.forward_intermediates(frames)[0]))

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

    def _probe(self, fn: Callable[[torch.Tensor], torch.Tensor], tokens: int, width: int) -> int:
        with torch.no_grad():
            p = next(self.visual.parameters())
            return int(fn(torch.zeros(1, tokens, width, dtype=p.dtype, device=p.device)).shape[-1])

    @property
    def feature_dim(self) -> int:
        """Width ``F`` of :meth:`pool`'s output (what a classifier head reads)."""
        return self._probe(self.pool, self.num_prefix_tokens + 1, self.width)

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`project`'s output (the joint image-text space)."""
        f = self.feature_dim
        with torch.no_grad():
            p = next(self.visual.parameters())
            return int(self.project(torch.zeros(1, f, dtype=p.dtype, device=p.device)).shape[-1])

    def trainable_parameters(self, projection: bool) -> List[nn.Parameter]:
        """The tower's parameters a full fine-tune trains: all it uses, with the projection or without."""
        skip = {id(p) for m in self.unused_modules() for p in _params(m)}
        if not projection:
            skip |= {id(p) for m in self.projection_modules() for p in _params(m)}
        return [p for p in self.visual.parameters() if id(p) not in skip]

    # --------------------------------------------------------------- token streams
    def embed_video(self, video: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Video ``(B, T, 3, H, W)`` -> the token stream in this tower's :attr:`layout`."""
        return self.embed(video.flatten(0, 1))

    def _start(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        return self.embed_video(x) if x.dim() == 5 else self.embed(x)

    def _indices(self, indices: Union[None, int, Sequence[int]]) -> List[int]:
        n = self.depth
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 <= indices <= n:
                raise ValueError(f"indices={indices} asks for the last {indices} blocks of a {n}-block tower")
            return list(range(n - indices, n))
        out = []
        for i in indices:
            j = int(i) + n if int(i) < 0 else int(i)
            if not 0 <= j < n:
                raise ValueError(f"block index {i} is outside this {n}-block tower")
            out.append(j)
        return sorted(set(out))

    def forward_intermediates(self, x: torch.Tensor, indices: Union[None, int, Sequence[int]] = (),
                              stop_early: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run the blocks; return the last tokens computed and the outputs of blocks ``indices``.

        ``x`` is images ``(M, 3, H, W)`` or a video ``(B, T, 3, H, W)`` (a ViCLIP tower
        needs the whole clip). ``indices``: 0-based block ids (negative from the end), an
        int ``n`` (the last ``n`` blocks) or None (every block); default none. With
        ``stop_early`` the blocks after the last requested one do not run and the first
        result is that block's output. Intermediates are raw block outputs ``(M, P+N, D)``
        (prefix tokens included, no norm).
        """
        ids = self._indices(indices)
        last = (ids[-1] if ids else -1) if stop_early else self.depth - 1
        wanted = set(ids)
        x, kw = self._start(x)
        kept = []
        for i in range(last + 1):
            x = self.blocks[i](x, **self.block_kwargs(kw, i))
            if i in wanted:
                kept.append(x)
        return x, kept

    def iter_intermediates(self, x: torch.Tensor, indices: Sequence[int], no_grad: bool = True,
                           chunk: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Yield the outputs of blocks ``indices`` one by one, running the tower only as far as needed.

        With ``no_grad`` each step runs without autograd while the yield itself is outside
        it, so the consumer's modules build their graph normally; between two yields only
        the tower's current token stream is alive here. ``chunk``: run each block on that
        many rows (frames) at a time, so its transients (MLP hidden layer, attention) are
        those of a chunk; rows are independent in a per-frame tower, so the output is the same.
        """
        ids = self._indices(indices)
        guard = torch.no_grad if no_grad else contextlib.nullcontext
        with guard():
            x, kw = self._start(x)
        done = 0
        for target in ids:
            with guard():
                while done <= target:
                    x = self._run_block(done, x, self.block_kwargs(kw, done), chunk)
                    done += 1
            yield x

    def _run_block(self, i: int, x: torch.Tensor, kw, chunk: Optional[int]) -> torch.Tensor:
        if not chunk or x.shape[0] <= chunk:
            return self.blocks[i](x, **kw)
        if self.layout != "bt":
            raise ValueError("tower_chunk needs a per-frame tower (a ViCLIP block attends across all frames)")
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], chunk):
            out[start:start + chunk] = self.blocks[i](x[start:start + chunk], **kw)
        return out

    # --------------------------------------------------------------- per-frame features
    def video_feature(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Final tokens of a clip batch -> the video feature ``(B, F)`` before projection.

        Per-frame towers: the model's own token reduction per frame, averaged over the
        ``T`` frames, then the model's post-pool norm (for a [CLS] model this is the
        frame-averaged [CLS] through the final norm; a token-wise final norm commutes
        with the [CLS] pick, so on identical frames it equals the image embedding).
        """
        f = self.pool_tokens(x)
        if self.layout == "bt":
            f = f.reshape(-1, num_frames, f.shape[-1]).mean(1)
        return self.final_norm(f)

    def side_view(self, x: torch.Tensor) -> torch.Tensor:
        """Block output ``(M, P+N, D)`` -> ``(M, 1+N, D)``: one summary token, then the patches.

        The summary is the [CLS] token when there is one (registers dropped); for a tower
        without [CLS] it is the model's own token reduction (:meth:`pool_tokens`) of that
        level. This is what Side4Video's ladder reads (vpeft's extension of the paper to
        towers without [CLS]). Without registers and with a [CLS] this is ``x`` itself.
        """
        p = self.num_prefix_tokens
        if self.has_cls and p == 1:
            return x
        if self.has_cls:
            return torch.cat([x[:, :1], x[:, p:]], dim=1)
        s = self.pool_tokens(x)
        if s.shape[-1] != x.shape[-1]:
            raise UnsupportedBackbone(
                f"{type(self.visual).__name__} has no [CLS] token and its pooling gives width {s.shape[-1]}, not the "
                f"token width {x.shape[-1]}; Side4Video's shifted token needs the pooled feature at token width")
        return torch.cat([s.unsqueeze(1).to(x.dtype), x[:, p:]], dim=1)


def _params(m) -> List[nn.Parameter]:
    if m is None:
        return []
    if isinstance(m, nn.Parameter):
        return [m]
    return list(m.parameters())


def around_prefix(x: torch.Tensor, prefix: int, fn: Callable[[torch.Tensor], torch.Tensor],
                  prefix_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Apply a one-[CLS] token op to tokens ``(M, P+N, D)`` with ``prefix`` = ``P`` prefix tokens.

    ``fn`` is an op (the fused adapter kernels) that treats token 0 as the [CLS] (no
    temporal path) and tokens ``1..`` as patches. ``P == 1``: ``fn(x)``. ``P == 0``: a zero
    token is put in front for ``fn`` and dropped from its result. ``P > 1`` (registers):
    ``fn`` sees the last prefix token and the patches, the other prefix tokens go through
    ``prefix_fn`` (unchanged when None). Prefix tokens never take the temporal path.
    """
    if prefix == 1:
        return fn(x)
    if prefix == 0:
        return fn(torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x], dim=1))[:, 1:]
    head = x[:, :prefix - 1]
    return torch.cat([head if prefix_fn is None else prefix_fn(head), fn(x[:, prefix - 1:])], dim=1)


# ---------------------------------------------------------------------------------- the table
FAMILIES: Dict[str, Type[VisionTower]] = {}
"""Family name -> adapter class, in lookup order (name -> how to recognise -> how to read)."""


def register_family(cls: Type[VisionTower]) -> Type[VisionTower]:
    """Class decorator: add a :class:`VisionTower` family to :data:`FAMILIES` (names are unique)."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a non-empty kind")
    if cls.kind in FAMILIES:
        raise ValueError(f"vision tower family {cls.kind!r} is already registered by {FAMILIES[cls.kind].__name__}")
    FAMILIES[cls.kind] = cls
    return cls


def supported_families() -> str:
    """One line per registered family, for error messages and docs."""
    return "; ".join(f"{k} ({c.description})" for k, c in FAMILIES.items())


def _why_not(v: nn.Module) -> str:
    name = type(v).__name__
    trunk = getattr(v, "trunk", None)
    inner = type(trunk).__name__ if trunk is not None else None
    what = f"open_clip TimmModel around timm {inner}" if inner else name
    if name == "ModifiedResNet" or inner in ("ConvNeXt", "FastVit", "SwinTransformer", "ResNet"):
        return f"{what} is a convolutional or windowed-attention network, not a ViT over patch tokens"
    if inner:
        return (f"{what} is not a timm VisionTransformer or Eva with plain Block/EvaBlock blocks "
                "(vpeft needs a flat sequence of prefix + patch tokens through identical blocks)")
    return f"{what} is not one of the vision tower classes vpeft knows"


def vision_tower(model: nn.Module) -> VisionTower:
    """The :class:`VisionTower` of ``model`` (an open_clip model, its ``.visual``, a bare timm
    ViT/Eva, or a ViCLIP); :class:`UnsupportedBackbone` when no registered family reads it."""
    v = getattr(model, "visual", model)
    for cls in FAMILIES.values():
        if cls.matches(v):
            try:
                return cls(v)
            except UnsupportedBackbone as e:
                raise refusal(model, str(e)) from None
    raise refusal(model, _why_not(v))


def refusal(model: nn.Module, reason: str) -> UnsupportedBackbone:
    """vpeft's one refusal: names the model's class (and its vision tower's), why, and the supported families."""
    v = getattr(model, "visual", model)
    where = "" if v is model else f" (vision tower {type(v).__module__}.{type(v).__name__})"
    return UnsupportedBackbone(f"vpeft cannot adapt {type(model).__module__}.{type(model).__name__}{where}: "
                               f"{reason}. Supported vision tower families: {supported_families()}.")


# ---------------------------------------------------------------------------------- families
def _is_class(v, module: str, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith(module) for c in type(v).__mro__)


@register_family
class OpenCLIPViT(VisionTower):
    """open_clip's native ``VisionTransformer``: one [CLS]; pooling as the model configures it."""

    kind = "openclip_vit"
    description = "open_clip VisionTransformer: CLIP ViT-*, CLIPA avg pooling, CoCa attentional pooler"

    @classmethod
    def matches(cls, v):
        return _is_class(v, "open_clip", "VisionTransformer") or (
            hasattr(v, "transformer") and hasattr(v, "conv1") and hasattr(v, "class_embedding")
            and not _is_class(v, "vpeft", "ViCLIPVision"))

    def __init__(self, v):
        if not getattr(v.transformer, "batch_first", True):
            raise UnsupportedBackbone("open_clip transformer with batch_first=False is not supported")
        self.attn_pool = getattr(v, "attn_pool", None)
        if self.attn_pool is not None and getattr(v, "attn_pool_contrastive", None) is not None:
            raise UnsupportedBackbone(
                f"open_clip VisionTransformer with attentional_pool={getattr(v, 'attn_pool_type', '')!r} "
                "(parallel/cascade pooling, marked work-in-progress in open_clip) is not supported; plain "
                "attentional pooling (CoCa) is")
        self.pool_type = getattr(v, "pool_type", "tok")
        if self.attn_pool is None and self.pool_type not in ("tok", "avg"):
            raise UnsupportedBackbone(f"open_clip VisionTransformer with pool_type={self.pool_type!r} gives no "
                                      "pooled image feature; vpeft needs 'tok' or 'avg' (or an attentional pool)")
        self.ln_after = bool(getattr(v, "final_ln_after_pool", False))
        super().__init__(v, v.transformer.resblocks, v.transformer.width, v.image_size, v.patch_size, 1, True)

    def embed(self, frames):
        return self.visual._embeds(frames), {}

    def pool_tokens(self, x):
        v = self.visual
        if self.attn_pool is not None:          # open_clip's CoCa: attn pool, ln_post, then the first query
            return v._global_pool(v.ln_post(v.attn_pool(x)))[0]
        if self.pool_type == "tok":             # the final norm is token-wise: pick [CLS] first
            return x[:, 0]
        if self.ln_after:                       # CLIPA: mean of the patches, then ln_post
            return v._global_pool(x)[0]
        return v._global_pool(v.ln_post(x))[0]

    def final_norm(self, feat):
        if self.attn_pool is None and (self.pool_type == "tok" or self.ln_after):
            return self.visual.ln_post(feat)
        return feat

    def project(self, feat):
        proj = self.visual.proj
        return feat if proj is None else feat @ proj

    def projection_modules(self):
        return [self.visual.proj]


class _TimmTower(VisionTower):
    """Shared reading of a timm ViT-like trunk, bare or inside open_clip's ``TimmModel``."""

    trunk_class = ""

    @classmethod
    def _trunk(cls, v):
        trunk = getattr(v, "trunk", None) if _is_class(v, "open_clip", "TimmModel") else v
        return trunk if trunk is not None and _is_class(trunk, "timm", cls.trunk_class) else None

    @classmethod
    def matches(cls, v):
        return cls._trunk(v) is not None

    def __init__(self, v):
        t = self._trunk(v)
        self.trunk = t
        self.wrapper = v if t is not v else None
        if getattr(t, "attn_pool", None) is None and getattr(t, "global_pool", "") in ("", None):
            raise UnsupportedBackbone(
                f"timm {type(t).__name__} built with global_pool='' has no pooled image feature; build it with "
                "global_pool='token', 'avg' or 'map' (or keep its default)")
        if getattr(t, "dynamic_img_size", False):
            raise UnsupportedBackbone(f"timm {type(t).__name__} with dynamic_img_size=True is not supported "
                                      "(vpeft fixes the frame size at adaptation)")
        pe = t.patch_embed
        image = _pair(pe.img_size)
        grid = _pair(pe.grid_size)
        patch = (image[0] // grid[0], image[1] // grid[1])
        prefix = int(getattr(t, "num_prefix_tokens", 0))
        has_cls = getattr(t, "cls_token", None) is not None
        super().__init__(v, t.blocks, t.embed_dim, image, patch, prefix, has_cls)
        if self.wrapper is None:
            cfg = getattr(t, "pretrained_cfg", None) or {}
            self.mean = tuple(cfg.get("mean") or self.mean)
            self.std = tuple(cfg.get("std") or self.std)

    def _token_pool(self) -> bool:
        return getattr(self.trunk, "attn_pool", None) is None and self.trunk.global_pool == "token"

    def pool_tokens(self, x):
        t = self.trunk
        if self._token_pool():                  # the norm is token-wise: pick [CLS] first
            return x[:, 0]
        return t.pool(t.norm(x))

    def final_norm(self, feat):
        t = self.trunk
        if self._token_pool():
            feat = t.norm(feat)
        return t.fc_norm(feat)

    def project(self, feat):
        t = self.trunk
        if self.wrapper is None:                # a bare timm model: its pre-logits feature
            return feat
        return self.wrapper.head(t.head(t.head_drop(feat)))

    def projection_modules(self):
        return [self.trunk.head] + ([self.wrapper.head] if self.wrapper is not None else [])

    def unused_modules(self):
        return [] if self.wrapper is not None else [self.trunk.head]


@register_family
class TimmViT(_TimmTower):
    """timm ``VisionTransformer`` (``Block`` blocks): [CLS] and/or registers or no prefix at all."""

    kind = "timm_vit"
    description = ("timm VisionTransformer, bare or in open_clip TimmModel: SigLIP/SigLIP2, MobileCLIP-B/L, "
                   "ViTamin, DeiT, DINOv2 (+registers), vit_*")
    trunk_class = "VisionTransformer"

    def embed(self, frames):
        t = self.trunk
        x = t._pos_embed(t.patch_embed(frames))
        x = t.norm_pre(t.patch_drop(x))
        return x, {}


@register_family
class TimmEva(_TimmTower):
    """timm ``Eva`` (EvaBlock / EvaBlockPostNorm, optional rotary embedding and attention pool)."""

    kind = "timm_eva"
    description = "timm Eva, bare or in open_clip TimmModel: EVA01, EVA02 (incl. post-norm E), PE-Core"
    trunk_class = "Eva"

    def embed(self, frames):
        t = self.trunk
        x, rope = t._pos_embed(t.patch_embed(frames))
        return t.norm_pre(x), {"rope": rope}

    def block_kwargs(self, kw, i):
        if getattr(self.trunk, "rope_mixed", False) and kw.get("rope") is not None:
            return dict(kw, rope=kw["rope"][i])
        return kw


@register_family
class ViCLIPTower(VisionTower):
    """vpeft's ViCLIP: joint space-time attention over one clip, one [CLS] per clip (layout ``"nt"``)."""

    kind = "viclip"
    description = "vpeft ViCLIP (one [CLS] per clip, joint space-time attention)"
    layout = "nt"

    @classmethod
    def matches(cls, v):
        return _is_class(v, "vpeft", "ViCLIPVision")

    def __init__(self, v):
        super().__init__(v, v.transformer.resblocks, v.transformer.width, v.image_size, v.patch_size, 1, True)

    def embed_video(self, video):
        return self.visual.embed(video), {}

    def embed(self, frames):
        raise ValueError("a ViCLIP tower embeds whole clips; use embed_video((B, T, 3, H, W))")

    def pool_tokens(self, x):
        return x[:, 0]

    def final_norm(self, feat):
        return self.visual.ln_post(feat)

    def project(self, feat):
        proj = self.visual.proj
        return feat if proj is None else feat @ proj

    def projection_modules(self):
        return [self.visual.proj]

    def encode_frames(self, frames):
        raise ValueError("a ViCLIP tower encodes whole clips, not frames")


# ---------------------------------------------------------------------------------- text
class TextTower:
    """The text transformer of an open_clip model (CLIP, CustomTextCLIP, CoCa) or a ViCLIP."""

    def __init__(self, blocks: nn.ModuleList, ops: BlockOps, width: int, module: Optional[nn.Module] = None):
        self.blocks = blocks
        self.ops = ops
        self.width = width
        self.module = module


def text_tower(model: nn.Module) -> Optional[TextTower]:
    """The model's :class:`TextTower`, or None when it has no text transformer vpeft can read
    (bare timm models, Hugging Face text encoders)."""
    if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
        t, module = model.transformer, None
    elif hasattr(getattr(model, "text", None), "transformer"):
        t, module = model.text.transformer, model.text
    else:
        return None
    if not hasattr(t, "resblocks"):
        return None
    return TextTower(t.resblocks, block_ops(t.resblocks[0]), int(t.width), module)


def text_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of the text side of an open_clip model: everything outside ``visual``
    (text transformer, embeddings, projection, ``logit_scale``)."""
    vis = {id(p) for p in getattr(model, "visual", nn.Module()).parameters()}
    return [p for p in model.parameters() if id(p) not in vis]
