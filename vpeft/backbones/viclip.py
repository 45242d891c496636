"""ViCLIP, the video-language backbone of MSTA (InternVid's ViCLIP, with its joint space-time attention).

ViCLIP differs from a per-frame CLIP in four ways, all implemented here:

* one [CLS] token for the whole clip (``class_embedding + positional_embedding[0]``);
* patch tokens in ``(n t)`` order: token ``1 + n*T + t`` is patch ``n`` of frame ``t``,
  so all frames of one patch position are adjacent;
* a learnable temporal position embedding ``(1, T, D)``, zero at initialisation, added
  to the patch tokens only;
* joint space-time attention: every block attends over all ``1 + N*T`` tokens.

The text tower is a causal CLIP text transformer with context length 32, pooled at the
end-of-text token (the highest token id). Blocks are open_clip
``ResidualAttentionBlock`` s (QuickGELU), so vpeft's adapters see them exactly like the
blocks of an open_clip model.

Not carried over from the official code: the pre-training-only pieces (random token
masking, drop path, dropout before the projection) and resizing the temporal embedding
to another number of frames (build the model with the checkpoint's ``num_frames``).

Checkpoints
-----------
:func:`load_viclip_checkpoint` reads the official ViCLIP checkpoint layout (OpenGVLab
InternVideo, ``Data/InternVid/viclip``: a dict with the state dict under ``"model"``).
Key mapping, official -> vpeft (:func:`from_official_state_dict`, inverse
:func:`to_official_state_dict`):

=====================================================  ==================================
official key (shape)                                   vpeft key (shape)
=====================================================  ==================================
``vision_encoder.conv1.weight`` (D, 3, 1, p, p)        ``visual.conv1.weight`` (D, 3, p, p)
``vision_encoder.class_embedding`` (D)                 ``visual.class_embedding``
``vision_encoder.positional_embedding`` (1+N, D)       ``visual.positional_embedding``
``vision_encoder.temporal_positional_embedding``       ``visual.temporal_positional_embedding``
(1, T, D)                                              (1, T, D)
``vision_encoder.ln_pre.*`` / ``ln_post.*``            ``visual.ln_pre.*`` / ``visual.ln_post.*``
``vision_encoder.proj`` (D, E)                         ``visual.proj``
``vision_encoder.transformer.resblocks.{i}.*``         ``visual.transformer.resblocks.{i}.*``
``text_encoder.token_embedding.weight`` (V, Dt)        ``token_embedding.weight``
``text_encoder.positional_embedding`` (32, Dt)         ``positional_embedding``
``text_encoder.transformer.resblocks.{i}.*``           ``transformer.resblocks.{i}.*``
``text_encoder.ln_final.*``                            ``ln_final.*``
``text_encoder.text_projection`` (Dt, E)               ``text_projection``
``temp`` ()                                            ``temp`` (logit scale = 1 / temp)
=====================================================  ==================================

Inside a block the names are the same on both sides (``ln_1``, ``attn.in_proj_weight``,
``attn.in_proj_bias``, ``attn.out_proj.{weight,bias}``, ``ln_2``, ``mlp.c_fc.*``,
``mlp.c_proj.*``). The only reshape is the patch embedding: the official Conv3d has a
temporal kernel of 1, stored here as the equivalent Conv2d. A ``module.`` prefix (saved
from DistributedDataParallel) is stripped.
"""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU, Transformer

__all__ = ["ViCLIPConfig", "ViCLIP", "ViCLIPVision", "VICLIP_CONFIGS", "create_viclip", "from_official_state_dict",
           "to_official_state_dict", "load_viclip_checkpoint", "count_truncated"]


@dataclass(frozen=True)
class ViCLIPConfig:
    """Shapes of a ViCLIP model. ``embed_dim`` is the joint video-text space."""

    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    num_frames: int = 8
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 32
    vocab_size: int = 49408


VICLIP_CONFIGS: Dict[str, ViCLIPConfig] = {
    "ViCLIP-B-16": ViCLIPConfig(),
    "ViCLIP-L-14": ViCLIPConfig(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                                text_width=768, text_heads=12),
}
"""The two released sizes: vision 768 x 12 / text 512 x 12 (B/16) and 1024 x 24 / 768 x 12 (L/14)."""


class ViCLIPVision(nn.Module):
    """ViCLIP's video encoder: joint space-time ViT with one [CLS] per clip.

    ``embed(video)`` gives the token stream ``(B, 1 + N*T, D)`` that the blocks in
    ``transformer.resblocks`` consume (batch first); ``forward(video)`` returns the
    projected clip embedding ``(B, E)``.
    """

    def __init__(self, cfg: ViCLIPConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size={cfg.image_size} must be a multiple of patch_size={cfg.patch_size}")
        self.image_size = (cfg.image_size, cfg.image_size)
        self.patch_size = (cfg.patch_size, cfg.patch_size)
        self.num_frames = cfg.num_frames
        self.output_dim = cfg.embed_dim
        width = cfg.vision_width
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, cfg.patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, cfg.num_frames, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.vision_heads, act_layer=QuickGELU)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """``video`` ``(B, T, 3, H, W)`` -> tokens ``(B, 1 + N*T, D)``: [CLS], then patches in ``(n t)`` order.

        ``T`` must be the configured ``num_frames``, or 1 (an image: the temporal
        embedding's mean is added, as the official code does).
        """
        if video.dim() != 5:
            raise ValueError(f"video must be (B, T, 3, H, W), got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        if t != self.num_frames and t != 1:
            raise ValueError(f"video has T={t} frames; this ViCLIP was built for num_frames={self.num_frames} "
                             "(its temporal position embedding has that length)")
        x = self.conv1(video.flatten(0, 1))                           # (B*T, D, h, w)
        x = x.flatten(2).transpose(1, 2)                              # (B*T, N, D)
        x = x + self.positional_embedding[1:].to(x.dtype)
        n, d = x.shape[1], x.shape[2]
        temporal = self.temporal_positional_embedding
        temporal = temporal.mean(1, keepdim=True) if t == 1 else temporal
        x = x.reshape(b, t, n, d) + temporal.to(x.dtype).unsqueeze(2)  # (B, T, N, D)
        x = x.transpose(1, 2).reshape(b, n * t, d)                    # (n t) order
        cls = (self.class_embedding + self.positional_embedding[0]).to(x.dtype).expand(b, 1, d)
        return self.ln_pre(torch.cat([cls, x], dim=1))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.embed(video)
        for blk in self.transformer.resblocks:
            x = blk(x)
        return self.ln_post(x[:, 0]) @ self.proj


class ViCLIP(nn.Module):
    """ViCLIP: :class:`ViCLIPVision` plus a causal CLIP text tower (context length 32).

    Attribute names of the text tower follow open_clip's ``CLIP`` (``token_embedding``,
    ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``), so
    code written for open_clip models finds them. ``temp`` is the official learnable
    temperature; :attr:`logit_scale` is ``log(1 / temp)`` like open_clip's.
    """

    def __init__(self, cfg: ViCLIPConfig = ViCLIPConfig()):
        super().__init__()
        self.config = cfg
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.visual = ViCLIPVision(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, act_layer=QuickGELU)
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.temp = nn.Parameter(torch.tensor(1.0 / 100.0))
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self._init_text()

    def _init_text(self):
        if self.token_embedding.weight.is_meta:
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    # ------------------------------------------------------------------ properties
    @property
    def logit_scale(self) -> torch.Tensor:
        """``log(1 / temp)``: ``logit_scale.exp()`` multiplies cosine similarities."""
        return -torch.log(self.temp)

    @property
    def num_frames(self) -> int:
        return self.visual.num_frames

    # ------------------------------------------------------------------ encoders
    def encode_video(self, video: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, E)``."""
        f = self.visual(video)
        return F.normalize(f, dim=-1) if normalize else f

    def text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """Every token's feature after ``ln_final`` and the projection: ``(B, L, E)``."""
        if text.shape[-1] != self.context_length:
            raise ValueError(f"text has {text.shape[-1]} tokens, expected context_length={self.context_length}")
        x = self.token_embedding(text) + self.positional_embedding.to(self.token_embedding.weight.dtype)
        mask = self.attn_mask.to(x.dtype)
        for blk in self.transformer.resblocks:
            x = blk(x, attn_mask=mask)
        return self.ln_final(x) @ self.text_projection

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids ``(B, 32)`` -> ``(B, E)``, pooled at the end-of-text token (the highest id)."""
        x = self.text_tokens(text)
        f = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return F.normalize(f, dim=-1) if normalize else f

    def tokenize(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """CLIP BPE token ids ``(len(texts), 32)``; longer texts are truncated (end token kept)."""
        return tokenize(texts, self.context_length)

    def forward(self, video: torch.Tensor, text: torch.Tensor):
        """``(video features, text features, logit_scale.exp())``, features L2-normalised."""
        return self.encode_video(video, True), self.encode_text(text, True), self.logit_scale.exp()


def _tokenizer():
    from open_clip.tokenizer import _tokenizer as tok  # the bundled BPE vocabulary, no download
    return tok


def tokenize(texts: Union[str, Sequence[str]], context_length: int) -> torch.Tensor:
    """CLIP BPE ids, ``(len(texts), context_length)``; texts too long are cut, keeping the end token."""
    import open_clip
    return open_clip.tokenize([texts] if isinstance(texts, str) else list(texts), context_length=context_length)


def count_truncated(texts: Sequence[str], context_length: int) -> int:
    """How many of ``texts`` have more BPE tokens (with start and end tokens) than ``context_length``."""
    tok = _tokenizer()
    return sum(1 for t in texts if len(tok.encode(t)) + 2 > context_length)


def create_viclip(name: Optional[str] = None, **overrides) -> ViCLIP:
    """Build a randomly initialised ViCLIP: a named size (:data:`VICLIP_CONFIGS`), any
    field of :class:`ViCLIPConfig` overridden, or a fully custom small config (no name).

    Build on the meta device for shapes only: ``with torch.device("meta"): create_viclip(...)``.
    """
    if name is None:
        cfg = ViCLIPConfig()
    elif name in VICLIP_CONFIGS:
        cfg = VICLIP_CONFIGS[name]
    else:
        raise ValueError(f"unknown ViCLIP config {name!r}; expected one of {sorted(VICLIP_CONFIGS)} "
                         "or None with the sizes given as keywords")
    unknown = sorted(set(overrides) - set(asdict(cfg)))
    if unknown:
        raise ValueError(f"unknown ViCLIP config field(s) {unknown}; expected some of {sorted(asdict(cfg))}")
    return ViCLIP(replace(cfg, **overrides))


# ---------------------------------------------------------------------- checkpoints
_VISION = "vision_encoder."
_TEXT = "text_encoder."


def from_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official ViCLIP keys -> vpeft :class:`ViCLIP` keys (see the module docstring)."""
    out: Dict[str, torch.Tensor] = {}
    unknown: List[str] = []
    for key, value in state_dict.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith(_VISION):
            new = "visual." + k[len(_VISION):]
            if new == "visual.conv1.weight":
                if value.dim() != 5 or value.shape[2] != 1:
                    raise ValueError(f"{key} has shape {tuple(value.shape)}; expected a Conv3d weight "
                                     "(D, 3, 1, p, p) with temporal kernel 1 (only that ViCLIP variant is supported)")
                value = value[:, :, 0]
            out[new] = value
        elif k.startswith(_TEXT):
            out[k[len(_TEXT):]] = value
        elif k == "temp":
            out["temp"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys not in the ViCLIP checkpoint layout: {unknown[:8]}{'...' if len(unknown) > 8 else ''}")
    return out


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """vpeft :class:`ViCLIP` keys -> official ViCLIP keys (inverse of :func:`from_official_state_dict`)."""
    out: Dict[str, torch.Tensor] = {}
    for k, value in state_dict.items():
        if k.startswith("visual."):
            if k == "visual.conv1.weight":
                value = value.unsqueeze(2)
            out[_VISION + k[len("visual."):]] = value
        elif k == "temp":
            out[k] = value
        else:
            out[_TEXT + k] = value
    return out


def load_viclip_checkpoint(model: ViCLIP, path_or_state: Union[str, Mapping[str, torch.Tensor]],
                           strict: bool = True) -> ViCLIP:
    """Load an official ViCLIP checkpoint (a local file path or an already-loaded dict) into ``model``.

    Accepts the file as saved by the authors (``{"model": state_dict, ...}``), a bare
    state dict in the official layout, or a state dict already in vpeft's layout. Shapes
    are checked first, so a size mismatch (e.g. a B/16 file into an L/14 model, or a
    different number of frames) raises a ValueError naming the key.
    """
    sd = path_or_state
    if isinstance(sd, str):
        if not os.path.isfile(sd):
            raise FileNotFoundError(f"ViCLIP checkpoint {sd!r} does not exist")
        try:
            sd = torch.load(sd, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{path_or_state} holds more than tensors (e.g. a pickled training config), which torch.load "
                "refuses with weights_only=True. If you trust the file, load it yourself and pass the dict: "
                "load_viclip_checkpoint(model, torch.load(path, map_location='cpu', weights_only=False))"
                f" ({str(e).splitlines()[0]})") from None
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    elif "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    official = any(k.startswith((_VISION, "module." + _VISION)) for k in sd)
    mapped = from_official_state_dict(sd) if official else dict(sd)
    own = model.state_dict()
    for k, v in mapped.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"checkpoint {k} has shape {tuple(v.shape)}, this model has {tuple(own[k].shape)}")
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match this ViCLIP: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if not strict and (missing or unexpected):
        warnings.warn(f"ViCLIP checkpoint: {len(missing)} missing and {len(unexpected)} unexpected keys")
    model.load_state_dict(mapped, strict=False)
    return model
