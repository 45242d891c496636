"""The backbone registry and builders: every named backbone vpeft can build, in one table.

:func:`create_backbone` is the one builder (used by the engine, the tasks, profiling,
the planner and the tests). A name is looked up in this order:

1. :data:`BACKBONES`: vpeft's own entries (the tiny test configs, the ViCLIP sizes),
   added with :func:`register_backbone` (which refuses duplicate names);
2. any ``open_clip.list_models()`` name (``ViT-B-16``, ``EVA02-E-14``, ``ViT-SO400M-14-SigLIP``...);
3. any timm model name, written ``timm:NAME`` (or bare when open_clip does not know
   it): a bare timm ViT/Eva (image-only).

Random weights by default; ``pretrained`` asks the library to download them (fails
with :class:`PretrainedUnavailable` offline) and ``checkpoint`` loads a local file.

``open_clip.create_model(name, device="cuda", precision="bf16")`` first builds the
model on the CPU in fp32 and then moves and casts it: for EVA02-E-14 (4.35 B vision
parameters) that is 17 GB of host memory and a full fp32 copy before the cast. Here
the modules are constructed under ``torch.device(device)`` with the default dtype set
to ``dtype``, so every parameter is allocated once, where it will live, in the dtype it
will train in (8.7 GB in bf16 for ViT-E's vision tower).

Weights are random (this project never downloads checkpoints); load a local
checkpoint afterwards with ``load_state_dict`` if you have one.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
import torch.nn as nn


@contextlib.contextmanager
def construct_on(device: Union[str, torch.device], dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside allocate their parameters on ``device`` in ``dtype``.

    Restores the previous default dtype on exit, also after an exception.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


log = logging.getLogger("vpeft")


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights could not be fetched (usually: no network)."""


class UnknownBackbone(ValueError):
    """A backbone name no table, open_clip nor timm knows."""


def _config(name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model config {name!r}; see open_clip.list_models()")
    return cfg


def create_vision_tower(name: str, *, device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The vision tower (``model.visual``) of open_clip config ``name``, built on ``device`` in ``dtype``.

    Works for native ViTs (``ViT-B-16``, ``ViT-L-14``) and timm towers (``EVA02-E-14``:
    a ``TimmModel`` around timm's post-norm ``eva02_enormous_patch14_clip_224``). Pass
    ``device="meta"`` to get shapes only (no memory), e.g. to count parameters.
    """
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = _config(name)
    with construct_on(device, dtype):
        tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                                    quick_gelu=cfg.get("quick_gelu", False))
    return tower.eval()


def create_model(name: str, *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The whole open_clip model (vision and text towers) of config ``name``, built on ``device`` in ``dtype``."""
    import open_clip

    cfg = dict(_config(name))
    custom = cfg.pop("custom_text", False)
    if "multimodal_cfg" in cfg:
        cls = open_clip.CoCa
    elif custom or "hf_model_name" in cfg.get("text_cfg", {}):
        cls = open_clip.CustomTextCLIP
    else:
        cls = open_clip.CLIP
    if "hf_model_name" in cfg.get("text_cfg", {}):
        import importlib.util
        if importlib.util.find_spec("transformers") is None:
            raise ValueError(f"open_clip model {name!r} has a Hugging Face text tower "
                             f"({cfg['text_cfg']['hf_model_name']}); install `transformers` to build it, or build "
                             f"its vision tower alone with create_vision_tower({name!r})")
    with construct_on(device, dtype):
        model = cls(**cfg)
    return _init_text_decoder(model).eval()


def _init_text_decoder(model: nn.Module) -> nn.Module:
    """open_clip's ``MultimodalTransformer`` (CoCa's text decoder) never initialises its
    ``text_projection`` (its ``init_parameters`` is not called and, in open_clip 3.3, would
    fail: it reads ``self.transformer``), so the parameter keeps whatever ``torch.empty``
    held (up to 1e36, or NaN) until a checkpoint overwrites it. Give it open_clip's intended
    init, normal with std ``width ** -0.5``, so a model built without weights is a
    well-defined random model."""
    decoder = getattr(model, "text_decoder", None)
    proj = getattr(decoder, "text_projection", None)
    if isinstance(proj, nn.Parameter):
        with torch.no_grad():
            nn.init.normal_(proj, std=decoder.width ** -0.5)
    return model


def create_tiny_eva(*, depth: int = 4, image_size: int = 56, post_norm: bool = True,
                    device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A small open_clip ``TimmModel`` around timm's EVA02-tiny trunk (post-norm blocks like ViT-E).

    For CPU tests and the CPU benchmark: the same module types as EVA02-E-14's tower,
    192 wide, ``depth`` blocks, patch 14.
    """
    import timm
    from open_clip.timm_model import TimmModel

    with construct_on(device, dtype or torch.get_default_dtype()):
        vis = TimmModel("eva02_tiny_patch14_224", embed_dim=32, image_size=image_size, pool="token", proj=None)
        vis.trunk = timm.create_model("eva02_tiny_patch14_224", num_classes=32, global_pool="token",
                                      use_post_norm=post_norm, depth=depth, img_size=image_size)
    return vis.eval()


def create_tiny_timm(model_name: str, *, wrap: bool = True, output_dim: int = 32, proj: Optional[str] = None,
                     device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                     **timm_kwargs) -> nn.Module:
    """A small random timm model of architecture ``model_name`` (sizes overridden by ``timm_kwargs``).

    ``wrap``: inside an open_clip ``TimmModel`` (as open_clip builds SigLIP, PE-Core,
    MobileCLIP towers), with ``proj`` ``None`` (the trunk's head projects to
    ``output_dim``, like EVA/PE-Core), ``"none"`` (no projection, SigLIP) or
    ``"linear"``. Otherwise the bare timm model. For tests and CPU runs.
    """
    import timm

    with construct_on(device, dtype or torch.get_default_dtype()):
        if not wrap:
            return timm.create_model(model_name, **timm_kwargs).eval()
        from open_clip.timm_model import TimmModel

        # TimmModel's own __init__ would first build the full-size trunk; set its two parts directly
        vis = TimmModel.__new__(TimmModel)
        nn.Module.__init__(vis)
        head = 0 if proj in ("none", "linear") else output_dim
        vis.trunk = timm.create_model(model_name, num_classes=head, **timm_kwargs)
        if proj == "linear":
            vis.head = nn.Sequential(nn.Linear(vis.trunk.num_features, output_dim, bias=False))
        else:
            vis.head = nn.Sequential()
        vis.image_size = tuple(vis.trunk.patch_embed.img_size)
    return vis.eval()


# ---------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class BackboneEntry:
    """One named backbone: ``build(num_frames, device, dtype)`` returns it randomly initialised.

    ``source``: ``"vpeft"`` (a test config), ``"viclip"``, ``"open_clip"`` or ``"timm"``.
    ``load``: ``load(model, path)`` reads a local weights file into it (None: ``load_state_dict``).
    """

    name: str
    source: str
    description: str
    build: Callable[..., nn.Module]
    load: Optional[Callable[[nn.Module, str], Any]] = None


BACKBONES: Dict[str, BackboneEntry] = {}
"""vpeft's own named backbones (open_clip and timm names are resolved on demand)."""


def register_backbone(name: str, source: str, description: str,
                      load: Optional[Callable[[nn.Module, str], Any]] = None):
    """Decorator: register ``build(num_frames, device, dtype)`` under ``name`` (names are unique)."""
    def deco(fn):
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered ({BACKBONES[name].description})")
        BACKBONES[name] = BackboneEntry(name, source, description, fn, load)
        return fn
    return deco


def _tiny_clip(vision: Dict[str, Any], text: Dict[str, Any], embed_dim: int = 64):
    def build(num_frames, device, dtype):
        import open_clip

        with construct_on(device, dtype):
            return open_clip.CLIP(embed_dim=embed_dim, vision_cfg=dict(vision), text_cfg=dict(text))
    return build


TINY_BACKBONES: Dict[str, Dict[str, Any]] = {
    "vpeft-tiny": dict(embed_dim=64, vision_cfg=dict(layers=4, width=96, patch_size=8, image_size=32, head_width=32),
                       text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2)),
    "clip-tiny-text": dict(embed_dim=64, vision_cfg=dict(layers=4, width=96, patch_size=8, image_size=32,
                                                         head_width=32),
                           text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=2)),
    # the profiling suite's CPU case
    "tiny-vit": dict(embed_dim=32, vision_cfg=dict(layers=6, width=128, patch_size=8, image_size=32, head_width=64),
                     text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=2, layers=6)),
}
"""Small open_clip CLIP configs for CPU runs; ``clip-tiny-text`` takes real BPE token ids.
:func:`create_backbone` takes ``config=`` overrides for these (nested dicts merge)."""


def _merged(base: Dict[str, Any], over: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _open_clip_loader(model, path):
    import open_clip
    return open_clip.load_checkpoint(model, path)


for _name, _cfg in TINY_BACKBONES.items():
    register_backbone(_name, "vpeft", f"tiny open_clip CLIP for CPU runs ({_cfg['vision_cfg']})",
                      _open_clip_loader)(_tiny_clip(_cfg["vision_cfg"], _cfg["text_cfg"], _cfg["embed_dim"]))

_TINY_VISION = dict(layers=2, width=64, patch_size=8, image_size=32, head_width=32)
_TINY_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)
register_backbone("tiny-clipa", "vpeft", "tiny open_clip CLIP with CLIPA's avg pooling and final_ln_after_pool",
                  _open_clip_loader)(
    _tiny_clip(dict(_TINY_VISION, pool_type="avg", final_ln_after_pool=True, no_ln_pre=True), _TINY_TEXT, 32))


@register_backbone("tiny-coca", "vpeft", "tiny open_clip CoCa (attentional pooler over the vision tokens)",
                   _open_clip_loader)
def _tiny_coca(num_frames, device, dtype):
    import open_clip

    with construct_on(device, dtype):
        model = open_clip.CoCa(embed_dim=32, vision_cfg=dict(_TINY_VISION, attentional_pool=True, attn_pooler_heads=2,
                                                              attn_pooler_queries=8, output_tokens=True),
                               text_cfg=dict(_TINY_TEXT, embed_cls=True, output_tokens=True),
                               multimodal_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1))
    return _init_text_decoder(model)


TINY_VICLIP: Dict[str, Any] = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=2,
                                   text_width=64, text_layers=3, text_heads=2, embed_dim=64)


def _viclip_loader(model, path):
    from .viclip import load_viclip_checkpoint
    return load_viclip_checkpoint(model, path)


def _viclip(name: Optional[str]):
    def build(num_frames, device, dtype):
        from .viclip import create_viclip

        kw = dict(TINY_VICLIP) if name is None else {}
        with construct_on(device, dtype):
            return create_viclip(name, num_frames=num_frames or 8, **kw)
    return build


register_backbone("viclip-tiny", "viclip", "tiny ViCLIP for CPU runs", _viclip_loader)(_viclip(None))
for _name in ("ViCLIP-B-16", "ViCLIP-L-14"):
    register_backbone(_name, "viclip", f"ViCLIP {_name[7:]} (weights: a local checkpoint file)",
                      _viclip_loader)(_viclip(_name))


def _tiny_timm(model_name: str, wrap: bool, **kw):
    def build(num_frames, device, dtype):
        return create_tiny_timm(model_name, wrap=wrap, device=device, dtype=dtype, **kw)
    return build


TINY_TOWERS: Dict[str, tuple] = {
    # name: (timm architecture, wrapped in open_clip's TimmModel, proj, timm overrides)
    "tiny-eva02": ("eva02_tiny_patch14_224", True, None,
                   dict(depth=2, img_size=28, global_pool="token", use_post_norm=True)),
    "tiny-siglip": ("vit_base_patch16_siglip_224", True, "none",
                    dict(depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8, global_pool="map")),
    "tiny-pe-core": ("vit_pe_core_tiny_patch16_384", True, None,
                     dict(depth=2, embed_dim=64, num_heads=2, img_size=32, patch_size=8, global_pool="map")),
    "tiny-pe-core-nocls": ("vit_pe_core_gigantic_patch14_448", True, None,
                           dict(depth=2, embed_dim=64, num_heads=2, img_size=28, patch_size=14, global_pool="map")),
    "tiny-mobileclip-b": ("vit_base_mci_224", True, None, dict(depth=2, img_size=32, global_pool="token")),
    "tiny-vitamin": ("vitamin_small_224", True, "linear", dict(depth=2, img_size=32, global_pool="avg")),
    "tiny-timm-vit": ("vit_base_patch16_224", False, None, dict(depth=2, embed_dim=64, num_heads=2, img_size=32,
                                                                patch_size=8)),
    "tiny-deit": ("deit_tiny_patch16_224", False, None, dict(depth=2, img_size=32)),
    "tiny-dinov2-reg": ("vit_small_patch14_reg4_dinov2", False, None,
                        dict(depth=2, embed_dim=64, num_heads=2, img_size=28)),
    "tiny-eva-bare": ("eva02_tiny_patch14_224", False, None, dict(depth=2, img_size=28)),
}
"""Small random towers, one per timm-based family (vision only, for CPU tests)."""

for _name, (_arch, _wrap, _proj, _kw) in TINY_TOWERS.items():
    register_backbone(_name, "vpeft", f"tiny {'open_clip TimmModel around ' if _wrap else 'bare '}timm {_arch}")(
        _tiny_timm(_arch, _wrap, **({"proj": _proj} if _wrap else {}), **_kw))


def list_backbones() -> List[str]:
    """vpeft's registered names, then every open_clip name (timm names: ``timm:NAME``)."""
    import open_clip
    return list(BACKBONES) + [n for n in open_clip.list_models() if n not in BACKBONES]


def _source(name: str) -> str:
    if name in BACKBONES:
        return "registry"
    import open_clip
    if name in open_clip.list_models():
        return "open_clip"
    import timm
    bare = name[5:] if name.startswith("timm:") else name
    if timm.is_model(bare):
        return "timm"
    raise UnknownBackbone(f"unknown backbone {name!r}: not one of vpeft's {sorted(BACKBONES)}, not an "
                          "open_clip model name (open_clip.list_models()), nor a timm model name (timm:NAME)")


def _download_failed(what: str, e: Exception) -> PretrainedUnavailable:
    first = str(e).splitlines()[0] if str(e) else ""
    return PretrainedUnavailable(
        f"could not download {what} ({type(e).__name__}: {first}). This machine may have no network access: "
        "download the weights elsewhere and pass the local file with --checkpoint PATH (model.checkpoint=PATH) "
        "instead.")


def _open_clip_pretrained(name: str, pretrained: str, device, dtype):
    import open_clip
    from open_clip import pretrained as oc_pretrained

    pcfg = oc_pretrained.get_pretrained_cfg(name, pretrained)
    if not pcfg:
        tags = oc_pretrained.list_pretrained_tags_by_model(name)
        raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {name}; known tags: {tags}. "
                         "For your own weights file use --checkpoint PATH")
    try:  # fetch first (fails fast offline), build second
        oc_pretrained.download_pretrained(pcfg)
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except Exception as e:  # noqa: BLE001 - any download failure
        raise _download_failed(f"open_clip weights {name!r} pretrained={pretrained!r}", e) from e
    return model.to(dtype=dtype).eval()


def create_backbone(name: str, pretrained: Union[None, str, bool] = None, checkpoint: Optional[str] = None,
                    num_frames: Optional[int] = None, device: Union[str, torch.device, None] = None,
                    dtype: Optional[torch.dtype] = None, config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Build the backbone ``name`` (see the module docstring for how names resolve).

    Args:
        name: a :data:`BACKBONES` name, an open_clip model name, or ``timm:NAME``.
        pretrained: an open_clip pretrained tag, or True for timm's default weights
            (both download; offline they raise :class:`PretrainedUnavailable`). Not for
            vpeft's test configs or ViCLIP (whose weights come from a local file).
        checkpoint: a local weights file (open_clip: ``open_clip.load_checkpoint``; ViCLIP:
            the official layout; timm: ``timm.models.load_checkpoint``; others: a state dict).
        num_frames: ViCLIP's temporal length (default 8); ignored by per-frame backbones.
        device, dtype: where and in what the parameters are allocated (built there
            directly; ``"meta"`` gives shapes only; default the CPU). dtype defaults to the
            current default.
        config: for a :data:`TINY_BACKBONES` entry, values overriding its open_clip config
            (nested dicts merge), e.g. ``{"vision_cfg": {"image_size": 64}}``.
    """
    device = device or "cpu"
    dtype = dtype or torch.get_default_dtype()
    if config and name not in TINY_BACKBONES:
        raise ValueError(f"config overrides are only for the tiny backbones {sorted(TINY_BACKBONES)}, not {name!r}")
    if pretrained and checkpoint:
        raise ValueError("give either model.pretrained (a tag) or model.checkpoint (a local file), not both")
    source = _source(name)
    if source == "registry":
        entry = BACKBONES[name]
        if pretrained:
            what = "ViCLIP weights come from a local file" if entry.source == "viclip" else \
                f"{name} is a vpeft test config with no pretrained weights"
            raise ValueError(f"{what}: drop pretrained (--pretrained), use checkpoint (--checkpoint PATH) for a file")
        if config:
            cfg = _merged(TINY_BACKBONES[name], config)
            model = _tiny_clip(cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"])(num_frames, device, dtype)
        else:
            model = entry.build(num_frames, device, dtype)
        loader = entry.load
    elif source == "open_clip":
        if pretrained:
            model = _open_clip_pretrained(name, str(pretrained), device, dtype)
        else:
            model = create_model(name, device=device, dtype=dtype)
        loader = _open_clip_loader
    else:
        import timm
        arch = name[5:] if name.startswith("timm:") else name
        if pretrained:
            try:
                model = timm.create_model(arch, pretrained=True).to(device=device, dtype=dtype)
            except Exception as e:  # noqa: BLE001 - any download failure
                raise _download_failed(f"timm weights for {arch!r}", e) from e
        else:
            with construct_on(device, dtype):
                model = timm.create_model(arch)

        def loader(m, path):
            from timm.models import load_checkpoint
            return load_checkpoint(m, path)
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"backbone weights file {checkpoint!r} (model.checkpoint / --checkpoint) "
                                    "does not exist")
        try:
            if loader is None:
                result = model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
            else:
                result = loader(model, checkpoint)
        except Exception as e:  # noqa: BLE001 - unreadable or mismatched: one line naming the file
            from ..engine.checkpoint import backbone_load_error

            raise backbone_load_error(checkpoint, model, e) from None
        log.info("loaded backbone weights from %s (%s)", checkpoint, result)
    return model.eval()
