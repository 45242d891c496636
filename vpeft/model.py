"""Drop-in adaptation of an open_clip model to video: :func:`adapt` and :class:`VideoModel`."""
from __future__ import annotations

from typing import Dict, Iterator, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from .backbones.towers import TextTower, VisionTower, text_tower, vision_tower
from .methods import BUILTIN_METHODS
from .methods.registry import InjectContext, MethodSpec, get_method

METHODS = BUILTIN_METHODS
"""The methods shipped with vpeft (see :mod:`vpeft.methods.registry` for adding one;
:func:`vpeft.methods.method_names` lists every registered method)."""


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
                 side: Optional[nn.Module] = None, head: Optional[nn.Module] = None,
                 extra: Optional[nn.Module] = None, options: Optional[Dict] = None,
                 frozen: Optional[Set[int]] = None):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.num_frames = num_frames
        self.num_classes = num_classes
        self.options = dict(options or {})
        object.__setattr__(self, "tower", tower)
        object.__setattr__(self, "text_tower", text)
        self.msta = msta
        self.side = side
        self.head = head
        self.extra = extra
        self.side_stream = False
        self.backbone_name: Optional[str] = None   # set by the builder that made the backbone by name
        self.classes: Optional[list] = None        # class names, when known (saved with the weights)
        # ids of the backbone's own modules (before injection): they stay in eval mode
        self._frozen_ids = frozen if frozen is not None else {id(m) for m in backbone.modules()}
        self.side_recompute_levels = False   # side4video memory options (set by adapt)
        self.tower_chunk: Optional[int] = None
        self.train(False)

    @property
    def spec(self) -> MethodSpec:
        """The registered method this model was built with."""
        return get_method(self.method)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True):
        """Set train mode on the trained parts; the backbone's own modules stay in eval
        (except when the method trains the backbone)."""
        super().train(mode)
        if not self.spec.trains_backbone:
            # the backbone's own modules, and the wrappers injected around them, stay in eval;
            # injected modules that hold none of the backbone's (the adapters) follow ``mode``
            for m in self.backbone.modules():
                if id(m) in self._frozen_ids or any(id(c) in self._frozen_ids for c in m.modules()):
                    m.training = False
        return self

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
        if not self.spec.backbone_grad:
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
        is released as soon as the consumer has projected it (unless the ladder keeps
        it for its weight gradient, i.e. without ``recompute_levels``). With
        ``tower_chunk`` each frozen block runs on that many frames at a time, bounding its
        transients. Levels are in the tower's
        :meth:`~vpeft.backbones.towers.VisionTower.side_view` (summary token, then patches).
        """
        for x in self.tower.iter_intermediates(frames, self.side.layer_ids, chunk=self.tower_chunk):
            yield self.tower.side_view(x)

    def _side_tokens(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.flatten(0, 1)
        levels = self._ladder_levels(frames)
        if not self.side_stream:
            levels = list(levels)
        again = (lambda: self._ladder_levels(frames)) if self.side_recompute_levels else None
        return self.side(video.transpose(1, 2), levels, recompute_levels=again)

    # ------------------------------------------------------------------ API
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``, or :meth:`encode_video` when there is no classifier."""
        if self.num_classes is None:
            return self.encode_video(video)
        video = self._check_video(video)
        if self.side is not None:
            return self.head(self._side_tokens(video))
        return self.head(self._pooled(video))

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Video embedding ``(B, E)``.

        For the backbone-based methods: the pooled [CLS] feature through the tower's
        projection (the joint image-text space). For a method with a side network
        (``side4video``): the side network's pooled feature ``(B, d)`` (its own space;
        no projection).
        """
        video = self._check_video(video)
        if self.side is not None:
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

    def save_pretrained(self, directory: str, *, classes: Optional[Sequence[str]] = None,
                        backbone_name: Optional[str] = None) -> str:
        """Write ``adapter_config.json`` (method, options, num_frames, classes, backbone name and
        weight fingerprint, vpeft version) and ``adapter_model.safetensors`` (only the trained
        weights) into ``directory``; rebuild with :func:`vpeft.from_pretrained`."""
        from .pretrained import save_pretrained

        return save_pretrained(directory, self.pretrained_config(classes, backbone_name), self.adapter_state_dict())

    def pretrained_config(self, classes: Optional[Sequence[str]] = None, backbone_name: Optional[str] = None) -> Dict:
        """The ``adapter_config.json`` record of this model (see :mod:`vpeft.pretrained`)."""
        from .pretrained import adapter_config

        return adapter_config(self, classes=classes if classes is not None else self.classes,
                              backbone_name=backbone_name)

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


def adapt(model: nn.Module, method: str, *, num_frames: int, num_classes: Optional[int] = None,
          **options) -> VideoModel:
    """Adapt an open_clip model, a bare timm ViT/Eva or a ViCLIP to video, in place.

    Args:
        model: an open_clip model (native ViT incl. CLIPA and CoCa, or a timm ViT/Eva
            tower: SigLIP/SigLIP2, EVA, PE-Core, MobileCLIP-B/L, ViTamin), a bare timm
            ``VisionTransformer``/``Eva`` (image-only: no text tower), or a
            :class:`vpeft.backbones.viclip.ViCLIP` (``num_frames`` must be its own; not
            with ``side4video``, which needs a [CLS] per frame). Anything else raises
            :class:`~vpeft.backbones.towers.UnsupportedBackbone` naming the class and the
            supported families (:data:`vpeft.backbones.towers.FAMILIES`).
        method: a registered method (:func:`vpeft.methods.method_names`): ``linear_probe``,
            ``full_finetune``, ``st_adapter``, ``msta``, ``side4video``, or one you registered.
        num_frames: ``T``, the number of frames every clip has.
        num_classes: add a classifier with this many classes (None: embeddings only).
        **options: the method's options; each method declares them with their defaults
            in its registration (``vpeft.methods.get_method(method).options``), and an
            unknown option or a value of the wrong type is refused naming it. All methods
            take ``dropout`` (classifier dropout; 0.5, and 0 for ``side4video`` as in every
            released Side4Video config) and ``backend``.
            Memory options (``checkpointing``, ``checkpoint_every``, and for
            ``side4video`` ``recompute_levels``, ``stream``, ``tower_chunk``): what each
            saves and costs is in :mod:`vpeft.methods.recompute`.

    Returns:
        a :class:`VideoModel` that owns ``model``.
    """
    spec = get_method(method)
    opts = spec.resolve(options)
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r} ({type(num_frames).__name__})")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r} "
                         f"({type(num_classes).__name__})")
    if getattr(model, "_vpeft_adapted", False):
        raise ValueError("this model has already been adapted by vpeft; build a fresh model")
    tower = vision_tower(model)
    text = text_tower(model)
    if tower.kind == "viclip" and num_frames != tower.visual.num_frames:
        raise ValueError(f"num_frames={num_frames} but this ViCLIP was built for {tower.visual.num_frames} frames "
                         "(its temporal position embedding has that length)")
    p = next(model.parameters())
    frozen = {id(m) for m in model.modules()}
    model.requires_grad_(False)   # a method that trains backbone weights marks them in its inject
    ctx = InjectContext(model=model, tower=tower, text=text, num_frames=num_frames, num_classes=num_classes,
                        options=opts, factory=dict(dtype=p.dtype))
    with torch.device(p.device):   # new modules are built on the backbone's device
        parts = spec.inject(ctx)
        head = parts.head
        if head is None and num_classes is not None:
            head = ClassifierHead(tower.feature_dim, num_classes, opts["dropout"]).to(dtype=p.dtype)
    vm = VideoModel(model, spec.name, num_frames, num_classes, tower, text, msta=parts.msta, side=parts.side,
                    head=head, extra=parts.extra, options=opts, frozen=frozen)
    if parts.side is not None:
        vm.side_recompute_levels = bool(parts.side_recompute_levels)
        # recomputed levels are consumed as the tower produces them
        vm.side_stream = bool(parts.side_stream) or vm.side_recompute_levels
        vm.tower_chunk = parts.tower_chunk
    object.__setattr__(model, "_vpeft_adapted", True)
    return vm


def _side_memory_options(vm: VideoModel, options) -> None:
    """Side4Video's ``stream``, ``recompute_levels`` and ``tower_chunk`` (see :func:`adapt`)."""
    stream = options.get("stream", False)
    recompute = options.get("recompute_levels", stream)
    chunk = options.get("tower_chunk")
    for name, value in (("stream", stream), ("recompute_levels", recompute)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"tower_chunk must be a positive number of frames (or None), got {chunk!r}")
    vm.side_recompute_levels = recompute
    vm.side_stream = stream or recompute  # recomputed levels are consumed as the tower produces them
    vm.tower_chunk = chunk
