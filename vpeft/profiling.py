"""Measure one full training step (forward, backward, optimizer) of an adapted model.

Shared by the benchmark suite (``benchmarks/bench_e2e.py``) and the memory planner
(:mod:`vpeft.plan`). A *case* is a method preset on a backbone at a frame count,
batch size, dtype and backend; :func:`measure` builds it, runs it and returns a plain
dict (a *record*) with peak memory, clips per second, trainable parameters, FLOPs
per clip, which attention the frozen tower used and which backend each op took. A
case that runs out of GPU memory returns a record with ``status == "oom"`` (and the
phase it failed in) instead of raising.

The step trains on synthetic data (random frames and labels): the numbers measure
cost, not accuracy. Everything (backbone, adapters, optimizer state) is in one dtype
(``bf16`` by default, "pure bf16"); AdamW is PyTorch's default implementation.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones.build import create_backbone, create_tiny_eva, create_vision_tower
from .methods.registry import get_method
from .model import VideoModel, adapt

GB = 1e9


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone the suite knows: how to build it, its papers' batch size and Side4Video sizes.

    ``side_light`` / ``side_full``: (side layers, side width), or None when the Side4Video
    paper defines no such configuration. ``side_memory``: Side4Video options this backbone
    needs to fit (ViT-E: streaming and checkpointing). ``gpu``: a GPU-sized case.
    """

    name: str
    batch: int
    image_size: int
    side_light: Optional[Tuple[int, int]]
    side_full: Optional[Tuple[int, int]]
    gpu: bool = True
    open_clip_name: Optional[str] = None
    side_memory: Dict[str, bool] = field(default_factory=dict)
    budget_gb: Optional[float] = None   # the budget for this backbone (ViT-E: 40 GB)
    num_classes: int = 174              # SSv2; also the number of MSTA class prompts per step

    def build(self, device, dtype, with_text: bool) -> nn.Module:
        if self.name == "tiny-eva":
            return create_tiny_eva(depth=4, image_size=self.image_size, device=device, dtype=dtype)
        if not with_text and self.name != "tiny-vit":
            return create_vision_tower(self.open_clip_name, device=device, dtype=dtype)
        model = create_backbone(self.open_clip_name or self.name, device=device, dtype=dtype,
                                config={"vision_cfg": {"image_size": self.image_size}}
                                if self.name == "tiny-vit" else None)
        return model.eval() if with_text else model.visual.eval()

    @property
    def has_text(self) -> bool:
        return self.name in ("tiny-vit", "ViT-B-16", "ViT-L-14")


BACKBONES: Dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec("ViT-B-16", 32, 224, (6, 192), (12, 320), open_clip_name="ViT-B-16"),
    BackboneSpec("ViT-L-14", 16, 224, (12, 320), (24, 512), open_clip_name="ViT-L-14"),
    BackboneSpec("EVA02-E-14", 16, 224, (32, 576), None, open_clip_name="EVA02-E-14",
                 side_memory=dict(stream=True, checkpointing=True), budget_gb=40.0),
    BackboneSpec("tiny-vit", 2, 32, (3, 64), (6, 128), gpu=False, num_classes=8),
    BackboneSpec("tiny-eva", 2, 56, (2, 64), None, gpu=False, num_classes=8,
                 side_memory=dict(stream=True, checkpointing=True)),
)}

METHOD_PRESETS = ("full_finetune", "linear_probe", "st_adapter_12x384", "st_adapter_24x384", "msta",
                  "side4video_light", "side4video")

TEXT_CONTEXT = 77      # open_clip's context length for the MSTA text prompts


def method_options(preset: str, spec: BackboneSpec) -> Tuple[str, dict]:
    """``(method, adapt options)`` of a preset on a backbone; ValueError when it is not defined there."""
    if preset in ("full_finetune", "linear_probe", "msta"):
        return preset, {}
    if preset.startswith("st_adapter_"):
        return "st_adapter", {"preset": preset[len("st_adapter_"):]}
    if preset in ("side4video_light", "side4video"):
        size = spec.side_light if preset == "side4video_light" else spec.side_full
        if size is None:
            raise ValueError(f"the Side4Video paper defines no {preset} configuration for {spec.name}")
        return "side4video", dict(side_layers=size[0], side_width=size[1], **spec.side_memory)
    raise ValueError(f"unknown method preset {preset!r}; expected one of {METHOD_PRESETS}")


def attention_impl(vm: VideoModel) -> str:
    """Which attention the frozen tower's blocks call (read from the modules, not guessed)."""
    blk = vm.tower.blocks[0]
    blk = getattr(blk, "block", blk)  # adapted blocks wrap the original
    attn = getattr(blk, "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        what = "F.scaled_dot_product_attention (nn.MultiheadAttention, need_weights=False)"
    elif attn is not None and hasattr(attn, "fused_attn"):
        what = ("F.scaled_dot_product_attention (timm fused_attn)" if attn.fused_attn
                else "eager softmax(QK^T)V (timm fused_attn off)")
    else:
        what = type(attn).__name__ if attn is not None else type(blk).__name__
    if torch.cuda.is_available() and what.startswith("F.scaled"):
        on = [n for n, f in (("flash", torch.backends.cuda.flash_sdp_enabled),
                             ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled),
                             ("cudnn", getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)),
                             ("math", torch.backends.cuda.math_sdp_enabled)) if f()]
        what += "; SDPA backends enabled: " + ",".join(on)
    return what


def flash_attn_status() -> str:
    installed = importlib.util.find_spec("flash_attn") is not None
    return ("flash-attn installed but not used: the frozen towers call F.scaled_dot_product_attention"
            if installed else "flash-attn not installed")


@contextlib.contextmanager
def record_op_backends(seen: Dict[str, set]) -> Iterator[None]:
    """Record which backend every vpeft op call dispatched to (``{op: {backend, ...}}``), as
    :func:`vpeft_kernels._backend.chosen_backend` reports it for each call's inputs."""
    from .methods.ops import record_backends

    with record_backends(seen):
        yield


@contextlib.contextmanager
def vpeft_backend(name: str) -> Iterator[None]:
    """Set ``VPEFT_BACKEND`` for the duration (``eager``, ``auto``...)."""
    old = os.environ.get("VPEFT_BACKEND")
    os.environ["VPEFT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VPEFT_BACKEND", None)
        else:
            os.environ["VPEFT_BACKEND"] = old


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingStep:
    """One optimisation step on a fixed synthetic batch; call it to run a step.

    The loss is cross-entropy on the classifier's logits, except for a method that uses
    the text tower (``msta``) on a model with one, where it is CLIP-style: cosine logits between the video
    embeddings and the embeddings of ``num_classes`` class prompts (random tokens)
    encoded by the adapted text tower in every step, as MSTA trains.
    Each call appends its wall time (synchronised) to :attr:`times`.
    """

    def __init__(self, vm: VideoModel, batch: int, frames: int, image_size: int, device, dtype,
                 num_classes: int = 174, lr: float = 1e-4):
        self.vm = vm.train()
        self.device = torch.device(device)
        self.params = [p for p in vm.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.video = torch.randn(batch, frames, 3, image_size, image_size, generator=gen).to(self.device, dtype)
        self.labels = torch.randint(0, num_classes, (batch,), generator=gen).to(self.device)
        self.text = None
        if vm.spec.uses_text and vm.text_tower is not None:
            ctx = getattr(vm.backbone, "context_length", TEXT_CONTEXT)
            vocab = getattr(vm.backbone, "vocab_size", 100)
            self.text = torch.randint(1, vocab, (num_classes, ctx), generator=gen).to(self.device)
        self.times: List[float] = []

    def loss(self) -> torch.Tensor:
        if self.text is not None:
            v = F.normalize(self.vm.encode_video(self.video).float(), dim=-1)
            t = F.normalize(self.vm.encode_text(self.text).float(), dim=-1)
            return F.cross_entropy(100.0 * v @ t.T, self.labels)
        return F.cross_entropy(self.vm(self.video).float(), self.labels)

    def __call__(self) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        self.times.append(time.perf_counter() - start)


def build_case(preset: str, backbone: str, frames: int, device, dtype, options: Optional[dict] = None) -> VideoModel:
    """Build the backbone on ``device`` in ``dtype`` and adapt it with ``preset``
    (``options``: adapt options over the preset's own)."""
    spec = BACKBONES[backbone]
    method, preset_options = method_options(preset, spec)
    options = {**preset_options, **(options or {})}
    text = get_method(method).uses_text and spec.has_text
    model = spec.build(device, dtype, with_text=text)
    num_classes = None if text else spec.num_classes
    return adapt(model, method, num_frames=frames, num_classes=num_classes, **options)


def count_step_flops(step: TrainingStep) -> int:
    """FLOPs of one training step (forward and backward; the optimizer adds no matmuls),
    counted by ``torch.utils.flop_counter.FlopCounterMode`` on the aten ops.

    Runs as a real step, so call it in place of a warm-up step. Count it with the eager
    backend so that the number is the method's, not a kernel's (fused custom ops have
    no FLOP formula).
    """
    from .memory import flop_counter

    counter = flop_counter()  # no module tracking: it would keep recomputed blocks alive
    with counter:
        step()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def memory_budget(device: torch.device, budget_bytes: Optional[float]) -> Iterator[Optional[float]]:
    """Cap this process's CUDA caching allocator at ``budget_bytes`` (a fraction of the card).

    Yields the fraction imposed (None: no cap). The cap is removed on exit.
    """
    if budget_bytes is None or device.type != "cuda":
        yield None
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, float(budget_bytes) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


Runner = Callable[[Callable[[], None], int, int], None]


def _default_runner(step: Callable[[], None], rounds: int, warmup: int) -> None:
    for _ in range(warmup + rounds):
        step()


def measure(preset: str, backbone: str, frames: int, batch: Optional[int] = None, *,
            device="cuda", dtype: torch.dtype = torch.bfloat16, backend: str = "eager",
            rounds: int = 5, warmup: int = 2, count_flops: bool = True,
            budget_gb: Optional[float] = None, runner: Optional[Runner] = None) -> dict:
    """Build and measure one case; return its record (see the module docstring).

    ``backend``: ``eager`` or ``fused`` (``VPEFT_BACKEND=auto``: fused where available).
    ``runner(step, rounds, warmup)`` runs the timed steps (the benchmark passes
    pytest-benchmark's ``pedantic``); the first warm-up step is the FLOP count.
    Peak memory is the CUDA allocator's peak over the timed steps (after warm-up, so
    optimizer state is included); on the CPU memory is not measured (None).
    """
    device = torch.device(device)
    spec = BACKBONES[backbone]
    batch = spec.batch if batch is None else batch
    method, options = method_options(preset, spec)
    rec = dict(backbone=backbone, method=preset, frames=frames, batch=batch, backend=backend,
               dtype=str(dtype).replace("torch.", ""), device_type=device.type,
               options={k: v for k, v in options.items()}, budget_gb=budget_gb, status="ok")
    env_backend = "auto" if backend == "fused" else backend
    phase = "build"
    vm = step = None
    try:
        with memory_budget(device, None if budget_gb is None else budget_gb * GB) as fraction:
            rec["memory_fraction"] = fraction
            with vpeft_backend(env_backend):
                vm = build_case(preset, backbone, frames, device, dtype)
                rec["trainable_params"] = vm.num_trainable_parameters()
                rec["trainable_params_no_head"] = vm.num_trainable_parameters(include_head=False)
                rec["total_params"] = sum(p.numel() for p in vm.parameters())
                rec["attention"] = attention_impl(vm)
                phase = "first step"
                step = TrainingStep(vm, batch, frames, spec.image_size, device, dtype, spec.num_classes)
                if count_flops:
                    with vpeft_backend("eager"):
                        rec["flops_per_clip"] = count_step_flops(step) / batch
                    warmup = max(warmup - 1, 0)
                seen: Dict[str, set] = {}
                phase = "steps"
                with record_op_backends(seen):
                    for _ in range(warmup):
                        step()
                    del step.times[:]
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    (runner or _default_runner)(step, rounds, 0)
                rec["op_backends"] = {op: sorted(b) for op, b in sorted(seen.items())}
                summarise_times(rec, list(step.times))
                if device.type == "cuda":
                    rec["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GB
                    rec["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
                else:
                    rec["peak_allocated_gb"] = rec["peak_reserved_gb"] = None
    except Exception as exc:  # noqa: BLE001 - an OOM becomes a record, anything else propagates
        if not is_oom(exc):
            raise
        rec.update(status="oom", oom_phase=phase, error=str(exc).splitlines()[0][:300])
    finally:
        vm = step = None
        release(device)
    return rec


def summarise_times(rec: dict, times: List[float]) -> dict:
    """Add step time statistics and clips per second to ``rec``."""
    if times:
        med = statistics.median(times)
        rec.update(step_time_s=med, step_times_s=[round(t, 6) for t in times],
                   clips_per_s=rec["batch"] / med if med > 0 else math.inf)
    return rec
