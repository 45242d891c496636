"""Drop-in adaptation of an open_clip model to video: :func:`adapt` and :class:`VideoModel`."""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn

from .backbones.towers import (TextTower, UnsupportedBackbone, VisionTower, refusal, text_parameters, text_tower,
                               vision_tower)
from .methods.msta import FusedMSTA, MSTABlock, msta_layers
from .methods.side4video import SideHead, SideNetwork
from .methods.st_adapter import PRESETS, STAdapter, STAdapterBlock

METHODS = ("linear_probe", "full_finetune", "st_adapter", "msta", "side4video")

_OPTIONS: Dict[str, Set[str]] = {
    "linear_probe": {"dropout"},
    "full_finetune": {"dropout", "text"},
    "st_adapter": {"preset", "bottleneck", "dropout"},
    "msta": {"bottleneck", "layers", "scale", "adapter_dropout", "text", "dropout"},
    "side4video": {"side_width", "side_layers", "fusion", "norm", "checkpointing", "stream", "pos_std", "dropout"},
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_fraction(v) -> bool:
    return _is_number(v) and 0 <= v < 1


# what each option of :func:`adapt` must be: (test, what is expected); checked before anything is built
_OPTION_TYPES = {
    "dropout": (_is_fraction, "a number in [0, 1)"),
    "adapter_dropout": (_is_fraction, "a number in [0, 1)"),
    "preset": (lambda v: isinstance(v, str), "a preset name (str)"),
    "bottleneck": (lambda v: _is_int(v) and v >= 1, "a positive int"),
    "side_width": (lambda v: _is_int(v) and v >= 1, "a positive int"),
    "side_layers": (lambda v: _is_int(v) and v >= 1, "a positive int"),
    "layers": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(i) for i in v),
               "a (first, last) pair of 1-based ints"),
    "scale": (_is_number, "a number"),
    "pos_std": (lambda v: v is None or (_is_number(v) and v >= 0), "a non-negative number or None"),
    "fusion": (lambda v: v in ("mean", "sum"), "'mean' or 'sum'"),
    "norm": (lambda v: v in ("pre", "post"), "'pre' or 'post'"),
    "text": (lambda v: isinstance(v, bool), "True or False"),
    "checkpointing": (lambda v: isinstance(v, bool), "True or False"),
    "stream": (lambda v: isinstance(v, bool), "True or False"),
}


def _check_options(method: str, options: Mapping) -> None:
    """Refuse an option of the wrong type or range (``bottleneck=16.7``), naming it and the value."""
    for name, value in options.items():
        test, expected = _OPTION_TYPES[name]
        if not test(value):
            raise ValueError(f"{method} option {name}={value!r} ({type(value).__name__}); expected {expected}")


class ClassifierHead(nn.Module):
    """Dropout then ``Linear(D -> classes)`` on the pooled, normalised [CLS] feature.

    The classifier starts at ``N(0, 0.02)`` weights and zero bias (ST-Adapter's released
    ``models_adapter.py``).
    """

    def __init__(self, width: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        nn.init.normal_(self.fc.weight, std=0.02)  # ST-Adapter's released classifier init
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class VideoModel(nn.Module):
    """An open_clip model adapted to video by one parameter-efficient method.

    Built by :func:`adapt`. Video is ``(B, T, 3, H, W)`` with ``T == num_frames`` and
    ``H, W`` the backbone's image size, either

    * floating point, already normalised with the backbone's mean and std
      (``model.tower.mean`` / ``model.tower.std``; what the vpeft data pipeline yields), or
    * ``uint8`` pixels 0-255 in RGB order (what a decoder returns, permuted to channels
      first), which are scaled to [0, 1] and normalised here with the backbone's own mean
      and std.

    Any other dtype (bool, integer, complex) and an empty batch are refused. Values are
    not checked for NaN/inf here (that would cost a device sync per call); the training
    engine checks every batch before the optimizer step.
    The backbone's own parameters are frozen (except for ``full_finetune``) and its
    modules stay in eval mode; for ``side4video`` and ``linear_probe`` the backbone
    runs with no autograd graph at all.

    Attributes:
        backbone: the user's model, modified in place (adapted blocks are wrapped).
        method: one of :data:`METHODS`. num_frames: ``T``. num_classes: or None.
        msta: the :class:`FusedMSTA` layers (``msta``). side: the :class:`SideNetwork`
        (``side4video``). head: the classifier, when ``num_classes`` is set (for
        ``side4video`` always a :class:`SideHead`, whose pooling defines the video
        feature).
    """

    def __init__(self, backbone: nn.Module, method: str, num_frames: int, num_classes: Optional[int],
                 tower: VisionTower, text: Optional[TextTower], *, msta: Optional[nn.ModuleList] = None,
                 side: Optional[SideNetwork] = None, head: Optional[nn.Module] = None):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.num_frames = num_frames
        self.num_classes = num_classes
        object.__setattr__(self, "tower", tower)
        object.__setattr__(self, "text_tower", text)
        self.msta = msta
        self.side = side
        self.head = head
        self.side_stream = False
        self.train(False)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        """Set train mode on the trained parts; frozen backbone modules stay in eval."""
        super().train(mode)
        if self.method != "full_finetune":
            ours = {id(m) for part in self._trained_modules() for m in part.modules()}
            for m in self.backbone.modules():
                if id(m) not in ours:
                    m.training = False
        return self

    def _trained_modules(self) -> Iterable[nn.Module]:
        for m in self.backbone.modules():
            if isinstance(m, STAdapter):
                yield m
        for part in (self.msta, self.side, self.head):
            if part is not None:
                yield part

    # ------------------------------------------------------------------ input
    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        """Shape and dtype checks; uint8 video is scaled and normalised (see the class docstring)."""
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a 5-D tensor (B, T, 3, H, W), got {shape}")
        b, t, c, h, w = video.shape
        if video.dtype != torch.uint8 and not video.is_floating_point():
            raise ValueError(f"video dtype {video.dtype} is not supported: pass floating-point video normalised with "
                             f"the backbone's mean/std, or uint8 pixels 0-255 (normalised here)")
        if b == 0:
            raise ValueError(f"video is an empty batch (B=0, shape {tuple(video.shape)}); expected at least one clip")
        if t != self.num_frames:
            raise ValueError(f"video has T={t} frames, expected num_frames={self.num_frames} (shape (B, T, 3, H, W))")
        if c != 3:
            raise ValueError(f"video has {c} channels, expected 3 (shape (B, T, 3, H, W))")
        if (h, w) != tuple(self.tower.image_size):
            raise ValueError(f"video frames are {h}x{w}, expected {self.tower.image_size[0]}x"
                             f"{self.tower.image_size[1]} for this backbone")
        p = next(self.backbone.parameters())
        if video.dtype == torch.uint8:
            mean = torch.tensor(self.tower.mean, device=p.device, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.tower.std, device=p.device, dtype=torch.float32).view(3, 1, 1)
            video = (video.to(device=p.device, dtype=torch.float32) / 255.0 - mean) / std
        return video.to(device=p.device, dtype=p.dtype)

    # ------------------------------------------------------------------ towers
    def _tokens(self, frames: torch.Tensor, keep: Tuple[int, ...] = (), stop_early: bool = False):
        """Run the vision tower; return the last tokens computed and the kept blocks' outputs.

        ``frames`` is ``(B*T, 3, H, W)`` for a per-frame tower, or the video
        ``(B, T, 3, H, W)`` (any tower; a ViCLIP tower needs the whole clip). See
        :meth:`~vpeft.backbones.towers.VisionTower.forward_intermediates`.
        """
        return self.tower.forward_intermediates(frames, keep, stop_early=stop_early)

    def _pooled(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, F)``: the model's own pooling per frame averaged over T (the clip's one
        [CLS] for ViCLIP), then its post-pool norm; see
        :meth:`~vpeft.backbones.towers.VisionTower.video_feature`."""
        frames = video if self.tower.layout == "nt" else video.flatten(0, 1)
        if self.method == "linear_probe":
            with torch.no_grad():
                x, _ = self.tower.forward_intermediates(frames)
        else:
            x, _ = self.tower.forward_intermediates(frames)
        return self.tower.video_feature(x, video.shape[1])

    def _ladder_levels(self, frames: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the ladder levels one by one, advancing the frozen tower only as far as needed.

        Each tower step runs under ``no_grad``; the yield is outside it, so the
        consumer's side blocks build their autograd graph normally. Between two yields
        only the current token stream of the tower is alive here: the previous level
        is released as soon as the consumer has projected it. Levels are in the
        tower's :meth:`~vpeft.backbones.towers.VisionTower.side_view` (summary token,
        then patches).
        """
        for x in self.tower.iter_intermediates(frames, self.side.layer_ids):
            yield self.tower.side_view(x)

    def _side_tokens(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.flatten(0, 1)
        if self.side_stream:
            return self.side(video.transpose(1, 2), self._ladder_levels(frames))
        with torch.no_grad():
            _, feats = self._tokens(frames, tuple(self.side.layer_ids), stop_early=True)
            feats = [self.tower.side_view(f) for f in feats]
        return self.side(video.transpose(1, 2), feats)

    # ------------------------------------------------------------------ API
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``, or :meth:`encode_video` when there is no classifier."""
        if self.num_classes is None:
            return self.encode_video(video)
        video = self._check_video(video)
        if self.method == "side4video":
            return self.head(self._side_tokens(video))
        return self.head(self._pooled(video))

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video embedding ``(B, E)``.

        For the backbone-based methods: the pooled [CLS] feature through the tower's
        projection (the joint image-text space). For ``side4video``: the side
        network's pooled feature ``(B, d)`` (its own space; no projection).
        """
        video = self._check_video(video)
        if self.method == "side4video":
            return self.head.features(self._side_tokens(video))
        return self.tower.project(self._pooled(video))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text embedding from the backbone's text tower (with MSTA's text adapters if any)."""
        if not hasattr(self.backbone, "encode_text"):
            raise ValueError(f"{type(self.backbone).__name__} has no text tower (encode_text)")
        return self.backbone.encode_text(text)

    # ------------------------------------------------------------------ parameters
    def num_trainable_parameters(self, include_head: bool = True) -> int:
        """Number of trainable parameter elements (each shared tensor counted once)."""
        skip = {id(p) for p in self.head.parameters()} if (self.head is not None and not include_head) else set()
        return sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in skip)

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        trained = self.num_trainable_parameters()
        print(f"{self.method}: {trained:,} trainable parameters of {total:,} "
              f"({100.0 * trained / max(total, 1):.3f}%)")

    def _trained_keys(self) -> Set[str]:
        owners: Dict[str, bool] = {}
        for name, mod in self.named_modules():
            owners[name] = any(p.requires_grad for p in mod.parameters(recurse=False))
        keys = set()
        for key in self.state_dict().keys():
            owner = key.rsplit(".", 1)[0] if "." in key else ""
            if owners.get(owner, False):
                keys.add(key)
        return keys

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the trained weights (adapters, side network, head, and their buffers)."""
        keys = self._trained_keys()
        return {k: v for k, v in self.state_dict().items() if k in keys}

    def load_adapter_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load weights saved by :meth:`adapter_state_dict`.

        With ``strict``, the keys must be exactly this model's trained keys; a mismatch
        raises a ValueError naming the missing and unexpected keys.
        """
        keys = self._trained_keys()
        missing = sorted(keys - set(state_dict))
        unexpected = sorted(set(state_dict) - keys)
        if strict and (missing or unexpected):
            raise ValueError(f"adapter state dict does not match this {self.method} model ({len(keys)} trained "
                             f"tensors): {len(missing)} missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"{len(unexpected)} unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        own = self.state_dict()
        for k, v in state_dict.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"{k} has shape {tuple(v.shape)} in the state dict, expected {tuple(own[k].shape)}")
        self.load_state_dict({k: v for k, v in state_dict.items() if k in keys}, strict=False)
        return self


def _check_viclip(tower: VisionTower, method: str, num_frames: int) -> None:
    """What each method means on ViCLIP (one [CLS] per clip, joint space-time attention).

    ``linear_probe``, ``full_finetune``, ``msta`` (the paper's backbone; temporal
    up-projection over the ``(n t)`` layout) and ``st_adapter`` (the same adapter on the
    patch tokens, its temporal conv over the frames of each patch position, [CLS]
    unchanged) are well defined. ``side4video`` is not: its ladder reads per-frame
    features with a per-frame [CLS] (token shift, retrieval head), which ViCLIP does
    not have.
    """
    if method == "side4video":
        raise ValueError("side4video is not defined on ViCLIP: the side network's ladder, [CLS] token shift and "
                         "retrieval head need per-frame features with a [CLS] token per frame, and ViCLIP has one "
                         "[CLS] for the whole clip (joint space-time attention). Use an open_clip CLIP or EVA "
                         "backbone for side4video, or msta/st_adapter on ViCLIP.")
    if num_frames != tower.visual.num_frames:
        raise ValueError(f"num_frames={num_frames} but this ViCLIP was built for {tower.visual.num_frames} frames "
                         "(its temporal position embedding has that length)")


def _full_finetune_parameters(model: nn.Module, tower: VisionTower, num_classes: Optional[int], options) -> None:
    """``full_finetune`` trains the vision tower (its projection only when there is no
    classifier, since a classifier reads the pre-projection feature) and, with
    ``text=True`` (tasks that encode text), the text side of the model as well."""
    use_text = options.get("text", False)
    if not isinstance(use_text, bool):
        raise ValueError(f"full_finetune option text must be True or False, got {use_text!r}")
    for p in tower.trainable_parameters(projection=num_classes is None):
        p.requires_grad_(True)
    if use_text:
        params = text_parameters(model) if hasattr(model, "visual") else []
        if not params:
            raise ValueError(f"text=True but {type(model).__name__} has no text tower")
        for p in params:
            p.requires_grad_(True)


def adapt(model: nn.Module, method: str, *, num_frames: int, num_classes: Optional[int] = None,
          **options) -> VideoModel:
    """Adapt an open_clip model, a bare timm ViT/Eva or a ViCLIP to video, in place.

    Args:
        model: an open_clip model (native ViT incl. CLIPA and CoCa, or a timm ViT/Eva
            tower: SigLIP/SigLIP2, EVA, PE-Core, MobileCLIP-B/L, ViTamin), a bare timm
            ``VisionTransformer``/``Eva`` (image-only: no text tower), or a
            :class:`vpeft.backbones.viclip.ViCLIP` (not with ``side4video``, see
            :func:`_check_viclip`; ``num_frames`` must be the ViCLIP's own). Anything
            else raises :class:`~vpeft.backbones.towers.UnsupportedBackbone` naming the
            class and the supported families (:data:`vpeft.backbones.towers.FAMILIES`).
        method: ``linear_probe``, ``full_finetune``, ``st_adapter``, ``msta`` or ``side4video``.
        num_frames: ``T``, the number of frames every clip has.
        num_classes: add a classifier with this many classes (None: embeddings only).
        **options: per method
            - all: ``dropout`` (classifier dropout; 0.5, and 0 for ``side4video`` as in
              every released Side4Video config).
            - ``full_finetune``: ``text`` (also train the text side, for tasks that encode
              text; default False: the vision tower, and its projection only when there
              is no classifier).
            - ``st_adapter``: ``preset`` ``"12x384"`` (before each MLP) or ``"24x384"``
              (before attention and MLP), ``bottleneck`` (overrides r = 384).
            - ``msta``: ``bottleneck`` (128), ``layers`` (default the last five blocks of
              each tower; a 1-based inclusive ``(first, last)`` for both towers, or a pair
              of them, one per tower; see :func:`vpeft.methods.msta.msta_layers`),
              ``scale`` (0.005), ``adapter_dropout`` (0.1), ``text`` (adapt the text
              tower; default True when there is one and ``num_classes`` is None).
            - ``side4video``: ``side_width`` (320), ``side_layers`` (default the backbone
              depth; must divide it), ``fusion`` (``"mean"``/``"sum"``), ``norm``
              (``"pre"``/``"post"``, default from the backbone), ``checkpointing``,
              ``pos_std``.

    Returns:
        a :class:`VideoModel` that owns ``model``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    unknown = sorted(set(options) - _OPTIONS[method])
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; "
                         f"expected some of {sorted(_OPTIONS[method])}")
    if not _is_int(num_frames) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r} ({type(num_frames).__name__})")
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r} "
                         f"({type(num_classes).__name__})")
    _check_options(method, options)
    if any(isinstance(m, (STAdapterBlock, MSTABlock)) for m in model.modules()):
        raise ValueError("this model has already been adapted by vpeft; build a fresh model")
    tower = vision_tower(model)
    text = text_tower(model)
    if tower.kind == "viclip":
        _check_viclip(tower, method, num_frames)
    if method == "side4video":
        with torch.no_grad():  # a tower without [CLS] must pool to token width
            p0 = next(model.parameters())
            try:
                tower.side_view(torch.zeros(1, tower.num_prefix_tokens + 1, tower.width, dtype=p0.dtype,
                                            device=p0.device))
            except UnsupportedBackbone as e:
                raise refusal(model, f"side4video: {e}") from None
    p = next(model.parameters())
    factory = dict(dtype=p.dtype)  # new modules are built on the backbone's device (see below)
    dropout = float(options.get("dropout", 0.5))

    model.requires_grad_(False)
    if method == "full_finetune":
        _full_finetune_parameters(model, tower, num_classes, options)
    with torch.device(p.device):
        return _build(model, method, num_frames, num_classes, tower, text, factory, dropout, options)


def _build(model, method, num_frames, num_classes, tower, text, factory, dropout, options) -> VideoModel:
    msta = side = head = None

    if method == "st_adapter":
        preset = options.get("preset", "12x384")
        if preset not in PRESETS:
            raise ValueError(f"unknown ST-Adapter preset {preset!r}; expected one of {tuple(PRESETS)}")
        r = int(options.get("bottleneck", 384))
        where = PRESETS[preset]
        prefix = tower.num_prefix_tokens
        for i, blk in enumerate(tower.blocks):
            a_attn = STAdapter(tower.width, r, num_frames, tower.layout, prefix).to(**factory) \
                if "attn" in where else None
            a_mlp = STAdapter(tower.width, r, num_frames, tower.layout, prefix).to(**factory) \
                if "mlp" in where else None
            tower.blocks[i] = STAdapterBlock(blk, tower.ops, a_attn, a_mlp)
    elif method == "msta":
        # a classifier does not use the text tower: no (untrained) text adapters unless asked
        use_text = options.get("text", text is not None and num_classes is None)
        if use_text and text is None:
            raise ValueError("text=True but this model has no text tower")
        t = text if use_text else None
        vis, txt = msta_layers(options.get("layers"), tower.depth, len(t.blocks) if t else None)
        r = int(options.get("bottleneck", 128))
        msta = nn.ModuleList()
        for k, i in enumerate(vis):
            m = FusedMSTA(tower.width, t.width if t else None, r, num_frames,
                          scale=float(options.get("scale", 0.005)),
                          dropout=float(options.get("adapter_dropout", 0.1)), layout=tower.layout,
                          num_prefix_tokens=tower.num_prefix_tokens).to(**factory)
            msta.append(m)
            tower.blocks[i] = MSTABlock(tower.blocks[i], tower.ops, m, "vision")
            if t is not None:
                t.blocks[txt[k]] = MSTABlock(t.blocks[txt[k]], t.ops, m, "text")
    elif method == "side4video":
        norm = options.get("norm", "post" if tower.post_norm else "pre")
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        if tower.patch_size[0] != tower.patch_size[1]:
            raise ValueError(f"side4video needs square patches, got {tower.patch_size}")
        side = SideNetwork(tower.width, tower.depth, int(options.get("side_width", 320)),
                           int(options.get("side_layers", tower.depth)), num_frames, tower.patch_size[0],
                           tower.num_patches, post_norm=(norm == "post"), fusion=options.get("fusion", "mean"),
                           pos_std=options.get("pos_std"),
                           checkpointing=bool(options.get("checkpointing", False))).to(**factory)
        head = SideHead(side.pos.shape[1], num_classes, float(options.get("dropout", 0.0)), num_frames,
                        norm=not side.post_norm).to(**factory)

    if head is None and num_classes is not None:
        head = ClassifierHead(tower.feature_dim, num_classes, dropout).to(**factory)
    vm = VideoModel(model, method, num_frames, num_classes, tower, text, msta=msta, side=side, head=head)
    vm.side_stream = bool(options.get("stream", False)) and side is not None
    return vm
