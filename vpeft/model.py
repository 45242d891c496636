"""Drop-in adaptation of an open_clip model to video: :func:`adapt` and :class:`VideoModel`."""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn

from .backbones.towers import TextTower, VisionTower, text_tower, vision_tower
from .methods.msta import FusedMSTA, MSTABlock
from .methods.recompute import checkpointed_blocks
from .methods.side4video import SideHead, SideNetwork
from .methods.st_adapter import PRESETS, STAdapter, STAdapterBlock

METHODS = ("linear_probe", "full_finetune", "st_adapter", "msta", "side4video")

_OPTIONS: Dict[str, Set[str]] = {
    "linear_probe": {"dropout"},
    "full_finetune": {"dropout"},
    "st_adapter": {"preset", "bottleneck", "dropout", "checkpointing", "checkpoint_every"},
    "msta": {"bottleneck", "layers", "scale", "adapter_dropout", "text", "dropout", "checkpointing",
             "checkpoint_every"},
    "side4video": {"side_width", "side_layers", "fusion", "norm", "checkpointing", "checkpoint_every", "stream",
                   "recompute_levels", "tower_chunk", "pos_std", "dropout"},
}


class ClassifierHead(nn.Module):
    """Dropout then ``Linear(D -> classes)`` on the pooled, normalised [CLS] feature."""

    def __init__(self, width: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class VideoModel(nn.Module):
    """An open_clip model adapted to video by one parameter-efficient method.

    Built by :func:`adapt`. Video is ``(B, T, 3, H, W)`` with ``T == num_frames``.
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
        self.side_stream = False            # side4video options (set by adapt)
        self.side_recompute_levels = False
        self.tower_chunk: Optional[int] = None
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
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a 5-D tensor (B, T, 3, H, W), got {shape}")
        b, t, c, h, w = video.shape
        if t != self.num_frames:
            raise ValueError(f"video has T={t} frames, expected num_frames={self.num_frames} (shape (B, T, 3, H, W))")
        if c != 3:
            raise ValueError(f"video has {c} channels, expected 3 (shape (B, T, 3, H, W))")
        if (h, w) != tuple(self.tower.image_size):
            raise ValueError(f"video frames are {h}x{w}, expected {self.tower.image_size[0]}x"
                             f"{self.tower.image_size[1]} for this backbone")
        p = next(self.backbone.parameters())
        return video.to(device=p.device, dtype=p.dtype)

    # ------------------------------------------------------------------ towers
    def _tokens(self, frames: torch.Tensor, stop_after: Optional[int] = None, keep: Tuple[int, ...] = ()):
        """Run the vision tower; return final tokens and the kept layers' outputs.

        ``frames`` is ``(B*T, 3, H, W)`` for a per-frame tower, or the video
        ``(B, T, 3, H, W)`` (any tower; a ViCLIP tower needs the whole clip).
        """
        x, kw = self.tower.embed_video(frames) if frames.dim() == 5 else self.tower.embed(frames)
        kept = []
        last = self.tower.depth - 1 if stop_after is None else stop_after
        for i in range(last + 1):
            x = self.tower.blocks[i](x, **kw)
            if i in keep:
                kept.append(x)
        return x, kept

    def _pooled(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, D)``: per-frame [CLS] averaged over T (the clip's one [CLS] for ViCLIP),
        then the tower's final norm."""
        b, t = video.shape[:2]
        frames = video if self.tower.layout == "nt" else video.flatten(0, 1)
        if self.method == "linear_probe":
            with torch.no_grad():
                x, _ = self._tokens(frames)
        else:
            x, _ = self._tokens(frames)
        cls = x[:, 0] if self.tower.layout == "nt" else x[:, 0].reshape(b, t, -1).mean(1)
        return self.tower.final_norm(cls)

    def _ladder_levels(self, frames: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the ladder levels one by one, advancing the frozen tower only as far as needed.

        Each step runs under ``no_grad``; the yield itself is outside it, so the
        consumer's side blocks build their autograd graph normally. Between two yields
        only the current token stream of the tower is alive here: the previous level
        is released as soon as the consumer has projected it (unless the ladder keeps
        it for its weight gradient, i.e. without ``recompute_levels``).
        With ``tower_chunk`` each block runs on that many frames at a time.
        """
        ids = tuple(self.side.layer_ids)
        with torch.no_grad():
            x, kw = self.tower.embed(frames)
        done = 0
        for target in ids:
            with torch.no_grad():
                while done <= target:
                    x = self._frozen_block(done, x, kw)
                    done += 1
            yield x

    def _frozen_block(self, i: int, x: torch.Tensor, kw) -> torch.Tensor:
        """Frozen tower block ``i`` under ``no_grad``, in chunks of ``tower_chunk`` frames when set:
        the block's transients (the MLP's hidden layer, attention) are then those of a chunk."""
        blk = self.tower.blocks[i]
        chunk = self.tower_chunk
        if not chunk or x.shape[0] <= chunk:
            return blk(x, **kw)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], chunk):
            out[start:start + chunk] = blk(x[start:start + chunk], **kw)
        return out

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
            raise ValueError(f"adapter state dict does not match this {self.method} model: "
                             f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        own = self.state_dict()
        for k, v in state_dict.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"{k} has shape {tuple(v.shape)} in the state dict, expected {tuple(own[k].shape)}")
        self.load_state_dict({k: v for k, v in state_dict.items() if k in keys}, strict=False)
        return self


def _check_layers(layers, depth_v: int, depth_t: Optional[int]) -> Tuple[int, int]:
    if (not isinstance(layers, (tuple, list)) or len(layers) != 2
            or not all(isinstance(i, int) for i in layers)):
        raise ValueError(f"layers must be a (first, last) pair of 1-based ints, got {layers!r}")
    first, last = layers
    depth = depth_v if depth_t is None else min(depth_v, depth_t)
    if not 1 <= first <= last <= depth:
        where = f"vision depth {depth_v}" + ("" if depth_t is None else f", text depth {depth_t}")
        raise ValueError(f"layers={tuple(layers)} is outside the model: expected 1 <= first <= last <= {depth} "
                         f"({where})")
    return first, last


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


def adapt(model: nn.Module, method: str, *, num_frames: int, num_classes: Optional[int] = None,
          **options) -> VideoModel:
    """Adapt an open_clip model (``open_clip.create_model(...)``) or a ViCLIP to video, in place.

    Args:
        model: an open_clip model with a native ViT or timm EVA vision tower, or a
            :class:`vpeft.backbones.viclip.ViCLIP` (not with ``side4video``, see
            :func:`_check_viclip`; ``num_frames`` must be the ViCLIP's own).
        method: ``linear_probe``, ``full_finetune``, ``st_adapter``, ``msta`` or ``side4video``.
        num_frames: ``T``, the number of frames every clip has.
        num_classes: add a classifier with this many classes (None: embeddings only).
        **options: per method
            - all: ``dropout`` (classifier dropout, 0.5).
            - ``st_adapter``: ``preset`` ``"12x384"`` (before each MLP) or ``"24x384"``
              (before attention and MLP), ``bottleneck`` (overrides r = 384).
            - ``msta``: ``bottleneck`` (128), ``layers`` (1-based inclusive range applied to
              both towers, default the last five vision layers), ``scale`` (0.005),
              ``adapter_dropout`` (0.1), ``text`` (adapt the text tower, default True when
              there is one).
            - ``st_adapter``, ``msta`` and ``side4video``: ``checkpointing`` (``True``: every
              adapted block, for side4video every side block, is recomputed in backward
              instead of keeping its activations; or a list of 0-based block indices) or
              ``checkpoint_every=k`` (every k-th of them). MSTA checkpoints its text blocks too.
            - ``side4video``: ``side_width`` (320), ``side_layers`` (default the backbone
              depth; must divide it), ``fusion`` (``"mean"``/``"sum"``), ``norm``
              (``"pre"``/``"post"``, default from the backbone), ``pos_std``;
              memory: ``recompute_levels`` (the ladder keeps no backbone level for its
              weight gradients; a second frozen tower forward in backward provides them;
              default: the value of ``stream``), ``stream`` (the tower advances only as far
              as the side network has consumed; with ``recompute_levels`` only the tower's
              current token stream is alive), ``tower_chunk`` (run each frozen block on this
              many frames at a time, bounding its transients).

            What each memory option saves and costs: :mod:`vpeft.methods.recompute`.

    Returns:
        a :class:`VideoModel` that owns ``model``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    unknown = sorted(set(options) - _OPTIONS[method])
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; "
                         f"expected some of {sorted(_OPTIONS[method])}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if any(isinstance(m, (STAdapterBlock, MSTABlock)) for m in model.modules()):
        raise ValueError("this model has already been adapted by vpeft; build a fresh model")
    tower = vision_tower(model)
    text = text_tower(model)
    if tower.kind == "viclip":
        _check_viclip(tower, method, num_frames)
    p = next(model.parameters())
    factory = dict(dtype=p.dtype)  # new modules are built on the backbone's device (see below)
    dropout = float(options.get("dropout", 0.5))

    model.requires_grad_(method == "full_finetune")
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
        ckpt = checkpointed_blocks(options.get("checkpointing"), options.get("checkpoint_every"), tower.depth)
        for i, blk in enumerate(tower.blocks):
            a_attn = STAdapter(tower.width, r, num_frames, layout=tower.layout).to(**factory) \
                if "attn" in where else None
            a_mlp = STAdapter(tower.width, r, num_frames, layout=tower.layout).to(**factory) \
                if "mlp" in where else None
            tower.blocks[i] = STAdapterBlock(blk, tower.ops, a_attn, a_mlp, checkpoint=i in ckpt)
    elif method == "msta":
        use_text = options.get("text", text is not None)
        if use_text and text is None:
            raise ValueError("text=True but this model has no text tower")
        t = text if use_text else None
        default = (max(1, tower.depth - 4), tower.depth)
        first, last = _check_layers(options.get("layers", default), tower.depth, t.blocks.__len__() if t else None)
        r = int(options.get("bottleneck", 128))
        ckpt = checkpointed_blocks(options.get("checkpointing"), options.get("checkpoint_every"), tower.depth,
                                   adapted=range(first - 1, last))
        msta = nn.ModuleList()
        for i in range(first - 1, last):
            m = FusedMSTA(tower.width, t.width if t else None, r, num_frames,
                          scale=float(options.get("scale", 0.005)),
                          dropout=float(options.get("adapter_dropout", 0.1)), layout=tower.layout).to(**factory)
            msta.append(m)
            tower.blocks[i] = MSTABlock(tower.blocks[i], tower.ops, m, "vision", checkpoint=i in ckpt)
            if t is not None:
                t.blocks[i] = MSTABlock(t.blocks[i], t.ops, m, "text", checkpoint=i in ckpt)
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
                           checkpointing=checkpointed_blocks(options.get("checkpointing"),
                                                             options.get("checkpoint_every"),
                                                             int(options.get("side_layers", tower.depth)))
                           ).to(**factory)
        head = SideHead(side.pos.shape[1], num_classes, dropout, num_frames).to(**factory)

    if head is None and num_classes is not None:
        head = ClassifierHead(tower.width, num_classes, dropout).to(**factory)
    vm = VideoModel(model, method, num_frames, num_classes, tower, text, msta=msta, side=side, head=head)
    if side is not None:
        _side_memory_options(vm, options)
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
