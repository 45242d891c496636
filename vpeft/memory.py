"""Exact GPU-memory accounting of one training step, without a GPU.

The bytes a training step allocates are a property of the program, not of the card:
every tensor an aten op returns is an allocation, and it lives until its storage dies.
This module counts them.

* :class:`AllocationTracker` is a ``TorchDispatchMode``: every storage an aten op
  returns (outputs of view and in-place ops excluded: they allocate nothing) is an
  allocation of ``round_block(nbytes)`` bytes (the CUDA caching allocator's 512-byte
  blocks), released when a weakref finaliser on the storage fires. It keeps the peak,
  the op, module and phase (forward, backward, optimizer) at the peak, and a
  breakdown of the bytes live at the peak by category (:data:`CATEGORIES`).
* :class:`SavedTensorCounter` is a ``torch.autograd.graph.saved_tensors_hooks`` pair
  that counts what autograd keeps for backward (distinct storages, weights excluded),
  grouped by the module that saved it and the op that produced it.
* :func:`estimate_step` runs one full training step of a benchmark case twice, exactly
  as :class:`vpeft.profiling.TrainingStep` runs it (same loss, dtype, AdamW,
  ``zero_grad(set_to_none=True)``), and reports the second (optimizer state live).
  With ``fake=True`` (default) the model is built on the meta device and every
  parameter becomes a ``FakeTensorMode`` tensor: shapes only, nothing is computed or
  allocated for real, so EVA02-E-14 at batch 16 runs on a laptop in well under a
  minute. With ``fake=False`` the same tracker runs real CPU tensors (the tests check
  that both give the same bytes).

Fake CUDA tensors do not survive backward without a driver, so the step runs fake CPU
tensors, and the choices a CUDA run makes differently where they change memory are
emulated (``emulate_cuda=True``; :data:`EMULATED` says what, and every report lists
them). What the accounting cannot see is in :data:`NOT_SEEN` and in every report.

    >>> from vpeft import memory
    >>> r = memory.estimate_step("side4video_light", "ViT-B-16", frames=8, batch=32)  # doctest: +SKIP
    >>> print(r.format())                                                             # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import gc
import re
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BLOCK = 512
"""The CUDA caching allocator rounds every request up to a multiple of 512 bytes."""
GB = 1e9

CATEGORIES = ("weights", "gradients", "optimizer_state", "saved", "inputs", "transients")
"""Live bytes at the peak are split into: the model's parameters and buffers
(``weights``), parameter ``.grad`` tensors (``gradients``), AdamW's ``exp_avg`` /
``exp_avg_sq`` (``optimizer_state``), tensors autograd keeps for backward
(``saved``), the synthetic batch (``inputs``), and everything else (``transients``:
activations in flight, incoming gradients in backward, optimizer temporaries)."""

FUSED_BACKENDS = {"st_adapter": "triton", "msta_adapter": "triton", "token_shift_attention": "triton",
                  "ladder_projection": "extension"}
"""What ``VPEFT_BACKEND=auto`` takes on a CUDA device for each vpeft op; ``backend="fused"``
forces these (through their registered fake implementations on fake tensors)."""

EMULATED = (
    "F.scaled_dot_product_attention: the CPU flash kernel saves what CUDA's flash kernel saves "
    "(q, k, v, output, fp32 logsumexp); with an attention mask CUDA takes the memory-efficient kernel, "
    "whose logsumexp is padded to a multiple of 32 rows (counted so)",
    "dropout in training: the fused CUDA kernel (torch.native_dropout), which keeps a bool mask",
    "nn.MultiheadAttention fast path off (fake tensors cannot take it; under no_grad a CUDA run may, "
    "which changes transients only)",
    "AdamW: the multi-tensor (foreach) implementation, PyTorch's default for CUDA parameters; its step "
    "counters live on the host (not counted)",
    "fused backend: st_adapter, msta_adapter, token_shift_attention -> Triton kernels, ladder_projection -> "
    "compiled extension, through their registered fake implementations (only their outputs are counted)",
)

NOT_SEEN = (
    "allocator caching and fragmentation: the reserved memory of a real run exceeds the allocated bytes "
    "counted here",
    "cuBLAS / cuDNN / flash-attention workspaces and temporaries inside fused kernels (only the outputs of an "
    "op are counted)",
    "the CUDA context (about 0.5 GB per process) and NCCL buffers",
    "tensors allocated outside aten ops (e.g. by a C++ extension's own allocator)",
)


def round_block(nbytes: int) -> int:
    """``nbytes`` rounded up to the caching allocator's 512-byte blocks (0 stays 0)."""
    return 0 if nbytes <= 0 else -(-int(nbytes) // BLOCK) * BLOCK


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _returns_alias(func) -> bool:
    schema = getattr(func, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _pattern(fqn: str) -> str:
    """``backbone.transformer.resblocks.3.mlp`` -> ``backbone.transformer.resblocks.*.mlp``."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", fqn)


class ModuleStack:
    """Which module of ``root`` runs now, in forward and in backward, without keeping any tensor.

    Forward: global module pre/post hooks keep a stack of qualified names. Backward: every
    module's output node is tagged with the module's name (``node.metadata``), and the
    module of the node running now is the last tagged node met. (PyTorch's
    ``ModuleTracker`` registers gradient hooks that keep tensors recomputed under
    activation checkpointing alive, which changes the memory being measured.)
    """

    def __init__(self, root: nn.Module):
        self.names = {id(m): (n or "(model)") for n, m in root.named_modules()}
        self.stack: List[str] = []
        self.backward_label = "(top level)"
        self._handles = []

    def __enter__(self):
        from torch.nn.modules import module as _module

        self._handles = [_module.register_module_forward_pre_hook(self._pre),
                         _module.register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, mod, args):
        self.stack.append(self.names.get(id(mod), type(mod).__name__))

    def _post(self, mod, args, out):
        name = self.stack.pop() if self.stack else self.names.get(id(mod), type(mod).__name__)
        for t in tree_leaves(out):
            fn = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
            if fn is not None and "vpeft_module" not in fn.metadata:
                fn.metadata["vpeft_module"] = name

    def current(self) -> str:
        if self.stack:
            return self.stack[-1]
        node = torch._C._current_autograd_node()
        if node is not None:
            self.backward_label = node.metadata.get("vpeft_module", self.backward_label)
            return self.backward_label
        return "(top level)"


@dataclass
class _Alloc:
    nbytes: int
    op: str
    module: str


class AllocationTracker(TorchDispatchMode):
    """Counts the storages aten ops return as allocations; see the module docstring.

    ``classify()`` (set by the caller) returns ``{storage key: category}`` for the
    storages that are not transients; it is called only at local maxima of the live
    bytes, to break down the peak.
    """

    def __init__(self, module_tracker=None, sdpa_lse_padding: bool = False):
        super().__init__()
        self.live: Dict[int, _Alloc] = {}
        self.current = 0
        self.peak = 0
        self.peak_where: Tuple[str, str, str] = ("", "", "")
        self.peak_breakdown: Dict[str, int] = {}
        self.phase = "setup"  # forward, backward, optimizer, zero_grad
        self.modules = module_tracker
        self.sdpa_lse_padding = sdpa_lse_padding
        self.classify: Callable[[], Dict[int, str]] = dict
        self.ops = 0
        self._pending = False

    # ------------------------------------------------------------ ledger
    def adopt(self, tensor: torch.Tensor, op: str = "(before the step)") -> None:
        """Count an already existing tensor's storage (e.g. weights built before tracking)."""
        self._add(tensor.untyped_storage(), op, "(top level)")

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting a tensor's storage (it would live on the host in a CUDA run)."""
        a = self.live.pop(_key(tensor), None)
        if a is not None:
            self.current -= a.nbytes

    def _add(self, storage, op: str, module: str, nbytes: Optional[int] = None) -> None:
        k = storage._cdata
        if k in self.live:
            return
        size = round_block(storage.nbytes() if nbytes is None else nbytes)
        self.live[k] = _Alloc(size, op, module)
        weakref.finalize(storage, self._free, k)
        self.current += size
        if self.current > self.peak:
            self.peak = self.current
            self.peak_where = (op, module, self.phase)
            self._pending = True

    def _free(self, k: int) -> None:
        a = self.live.get(k)
        if a is None:
            return
        if self._pending:
            self.snapshot()
        del self.live[k]
        self.current -= a.nbytes

    def snapshot(self) -> None:
        """Record the live bytes by category (called at every local maximum)."""
        self._pending = False
        cats = self.classify()
        out = dict.fromkeys(CATEGORIES, 0)
        for k, a in self.live.items():
            out[cats.get(k, "transients")] += a.nbytes
        self.peak_breakdown = out

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self.current
        self.peak_where = ("(start of the step)", "", self.phase)
        self.snapshot()

    def finish(self) -> None:
        if self._pending:
            self.snapshot()

    # ------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if _returns_alias(func):
            return out
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not tensors:
            return out
        if self.phase != "optimizer":
            self.phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        op = str(func)
        node = torch._C._current_autograd_node()
        if node is not None:
            op = f"{op} ({node.name()})"
        module = self.modules.current() if self.modules is not None else ""
        for i, t in enumerate(tensors):
            nbytes = None
            if (self.sdpa_lse_padding and i == 1 and func is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
                    and (kwargs or {}).get("attn_mask") is not None):
                b, h, length = t.shape  # logsumexp of the memory-efficient kernel: rows padded to 32
                nbytes = b * h * (-(-length // 32) * 32) * t.element_size()
            self._add(t.untyped_storage(), op, module, nbytes)
        return out


class _Packed:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorCounter:
    """What autograd keeps for backward, counted with ``saved_tensors_hooks``.

    Every saved tensor is wrapped; while any wrapper of a storage is alive the storage
    counts once (``round_block`` bytes) in :attr:`current`. Storages in ``exclude``
    (weights, the batch) are not counted. :attr:`peak` is the largest :attr:`current`, and
    :attr:`by_kind` the bytes per ``"module pattern [producing op]"`` at that moment.
    """

    def __init__(self, tracker: AllocationTracker, exclude: Optional[set] = None):
        self.tracker = tracker
        self.exclude = set() if exclude is None else exclude
        self.refs: Dict[int, int] = {}
        self.kinds: Dict[int, Tuple[str, int]] = {}
        self.current = 0
        self.peak = 0
        self.by_kind: Dict[str, int] = {}
        self._pending = False

    def keys(self) -> set:
        return set(self.refs)

    def reset(self) -> None:
        self.peak = self.current
        self.by_kind = self._group()

    def _group(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for kind, nbytes in self.kinds.values():
            out[kind] = out.get(kind, 0) + nbytes
        return out

    def pack(self, t: torch.Tensor):
        k = _key(t)
        if k not in self.refs:
            alloc = self.tracker.live.get(k)
            if alloc is None or k in self.exclude:  # a weight or input, or nothing a tracked op allocated
                return t
            module = self.tracker.modules.current() if self.tracker.modules is not None else ""
            parts = alloc.op.split(" ")[0].split(".")  # "aten.addmm.default" -> "addmm"
            op = parts[1] if len(parts) > 1 else parts[0]
            self.kinds[k] = (f"{_pattern(module)} [{op}]", alloc.nbytes)
            self.refs[k] = 0
            self.current += alloc.nbytes
            if self.current > self.peak:
                self.peak = self.current
                self._pending = True
        self.refs[k] += 1
        p = _Packed(t)
        weakref.finalize(p, self._release, k)
        return p

    @staticmethod
    def unpack(p):
        return p.tensor if isinstance(p, _Packed) else p

    def _release(self, k: int) -> None:
        if self._pending:
            self.by_kind = self._group()
            self._pending = False
        self.refs[k] -= 1
        if self.refs[k] == 0:
            del self.refs[k]
            self.current -= self.kinds.pop(k)[1]

    def finish(self) -> None:
        if self._pending:
            self.by_kind = self._group()
            self._pending = False

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _CudaFunctions(TorchFunctionMode):
    """Dropout as CUDA runs it: the fused kernel that keeps a bool mask."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
            if training and 0.0 < p < 1.0 and x.numel() > 0 and not inplace:
                return torch.native_dropout(x, p, True)[0]
        return func(*args, **kwargs)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection during a tracked step: when it would run depends on
    Python object counts (different for fake and real tensors), so tensors held only by
    reference cycles are freed between the steps (``gc.collect()``), never at a random
    moment; the reported step counts them until it ends (the worst case)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def fakeify(module: nn.Module, fake_mode, device: str = "cpu") -> nn.Module:
    """Replace every parameter and buffer of ``module`` (e.g. built on ``meta``) by a fake tensor
    of the same shape, stride and dtype on ``device``, in place; shared tensors stay shared."""
    memo: Dict[int, torch.Tensor] = {}
    keep = []  # the originals stay referenced, so their ids are not reused while we convert

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            keep.append(t)
            with fake_mode:
                new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        return memo[id(t)]

    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = fake(p)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = fake(b)
        for name, v in list(vars(mod).items()):  # plain tensor attributes (e.g. cached masks)
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.device.type == "meta":
                setattr(mod, name, fake(v))
    return module


class _NoModuleTracking:
    """Stands in for the ``ModuleTracker`` of ``FlopCounterMode``: all FLOPs count at top level,
    and no gradient hooks are registered (they would keep recomputed tensors alive)."""

    parents = {"Global"}
    is_bw = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` that does not track modules: its module
    tracker's gradient hooks would keep the blocks that activation checkpointing recomputes
    in backward alive until the step ends (and so change the memory of the step counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    return counter


@dataclass
class MemoryReport:
    """One estimated (or CPU-tracked) training step. Bytes are exact counts, rounded per
    allocation to 512-byte blocks; ``*_gb`` helpers divide by 10^9."""

    method: str
    backbone: str
    frames: int
    batch: int
    backend: str
    dtype: str
    options: dict
    peak_allocated_bytes: int
    peak_op: str
    peak_module: str
    peak_phase: str
    categories: Dict[str, int]
    saved_bytes: int
    saved_at_peak_bytes: int
    saved_by_kind: Dict[str, int]
    flops: Optional[int]
    trainable_params: int
    total_params: int
    fake: bool
    emulated: List[str] = field(default_factory=list)
    not_seen: List[str] = field(default_factory=lambda: list(NOT_SEEN))
    op_backends: Dict[str, str] = field(default_factory=dict)
    cyclic_garbage_bytes: int = 0
    """Bytes still live after the step that only reference cycles held (freed by ``gc.collect()``)."""
    seconds: float = 0.0
    kind: str = "estimated by exact tensor accounting on the CPU; allocator overhead not included"

    @property
    def peak_gb(self) -> float:
        return self.peak_allocated_bytes / GB

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self, kinds: int = 12) -> dict:
        """A compact record (for benchmark results): the numbers, the ``kinds`` largest saved kinds."""
        d = self.to_dict()
        d["saved_by_kind"] = dict(sorted(self.saved_by_kind.items(), key=lambda kv: -kv[1])[:kinds])
        d.pop("not_seen")
        d.pop("emulated")
        d["peak_allocated_gb"] = self.peak_gb
        return d

    def format(self, top: int = 8) -> str:
        """A readable breakdown (what ``vpeft estimate`` prints)."""
        g = lambda b: f"{b / GB:8.3f} GB"  # noqa: E731
        lines = [f"{self.method} on {self.backbone}, {self.frames} frames, batch {self.batch}, {self.dtype}, "
                 f"backend {self.backend}" + (f", options {self.options}" if self.options else ""),
                 f"  peak allocated {g(self.peak_allocated_bytes)}  ({self.kind})",
                 f"  at the peak: {self.peak_op} in {self.peak_module} ({self.peak_phase})"]
        for c in CATEGORIES:
            lines.append(f"    {c:<16}{g(self.categories.get(c, 0))}")
        lines.append(f"  saved for backward {g(self.saved_bytes)} (most at once), by module [producing op]:")
        for kind, b in sorted(self.saved_by_kind.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {g(b)}  {kind}")
        rest = sorted(self.saved_by_kind.items(), key=lambda kv: -kv[1])[top:]
        if rest:
            lines.append(f"    {g(sum(b for _, b in rest))}  ({len(rest)} more kinds)")
        if self.cyclic_garbage_bytes:
            lines.append(f"  {g(self.cyclic_garbage_bytes)} held after the step only by reference cycles "
                         "(freed when Python's cyclic garbage collector runs)")
        if self.flops is not None:
            lines.append(f"  FLOPs of one step {self.flops / 1e9:,.1f} GFLOP (torch.utils.flop_counter; "
                         "fused custom ops have no formula and count 0)")
        lines.append(f"  {self.trainable_params:,} trainable of {self.total_params:,} parameters; "
                     f"{'fake tensors' if self.fake else 'real CPU tensors'}, {self.seconds:.1f} s")
        if self.emulated:
            lines.append("  emulated CUDA choices:")
            lines += [f"    - {e}" for e in self.emulated]
        lines.append("  not seen by this accounting:")
        lines += [f"    - {n}" for n in self.not_seen]
        return "\n".join(lines)


def _backend_choices(backend: str, kernels: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    from vpeft_kernels import _backend

    choices = {op: "eager" for op in _backend.OPS}
    if backend == "fused":
        choices.update(FUSED_BACKENDS if kernels is None else kernels)
    return choices


def _warm_optimizer(optimizer: torch.optim.Optimizer, params: List[torch.Tensor]) -> None:
    """Leave ``optimizer`` holding the state one step over ``params`` would create.

    For plain Adam/AdamW (not fused, capturable or amsgrad) the state is created directly,
    as ``torch.optim.Adam._init_group`` does (``step`` a host scalar, ``exp_avg`` and
    ``exp_avg_sq`` zeros like the parameter): a foreach step over hundreds of fake
    tensors costs seconds per probe. Any other optimizer takes one real step from zero
    gradients. ``tests/test_memory.py`` checks that both warm-ups leave the same bytes.
    """
    direct = type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and not any(
        g.get("amsgrad") or g.get("fused") or g.get("capturable") or g.get("differentiable")
        for g in optimizer.param_groups)
    if not direct:
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    for p in params:
        optimizer.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32, device="cpu"),
                              "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                              "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


class StepEstimator:
    """One benchmark case, built once, whose training step can be estimated at any batch.

    ``method``: a preset of :data:`vpeft.profiling.METHOD_PRESETS`; ``backbone``: a key of
    :data:`vpeft.profiling.BACKBONES`; ``options``: adapt options over the preset's (e.g.
    ``checkpointing=True``); ``backend``: ``eager`` or ``fused`` (:data:`FUSED_BACKENDS`).
    ``fake=False`` builds and runs real CPU tensors (tiny backbones only).
    ``emulate_cuda``: make the CUDA run's choices (:data:`EMULATED`). ``kernels``: with
    ``backend="fused"``, ``{op: backend}`` instead of :data:`FUSED_BACKENDS` (ops not named
    run eager), e.g. ``{"ladder_projection": "extension"}``, whose CPU kernels can also
    run real tensors.
    """

    def __init__(self, method: str, backbone: str, frames: int = 8, *, backend: str = "eager",
                 dtype: torch.dtype = torch.bfloat16, options: Optional[dict] = None, fake: bool = True,
                 emulate_cuda: bool = True, kernels: Optional[Dict[str, str]] = None):
        from torch._subclasses.fake_tensor import FakeTensorMode

        from . import profiling

        if backbone not in profiling.BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(profiling.BACKBONES)}")
        if method not in profiling.METHOD_PRESETS:
            raise ValueError(f"unknown method {method!r}; expected one of {profiling.METHOD_PRESETS}")
        if backend not in ("eager", "fused"):
            raise ValueError(f"backend must be 'eager' or 'fused', got {backend!r}")
        if not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        self.spec = profiling.BACKBONES[backbone]
        _, preset_options = profiling.method_options(method, self.spec)
        self.options = {**preset_options, **(options or {})}
        self.method, self.backbone, self.frames, self.backend = method, backbone, frames, backend
        self.dtype, self.fake, self.emulate_cuda = dtype, fake, emulate_cuda
        self.kernels = _backend_choices(backend, kernels)
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        start = time.perf_counter()
        self.vm = profiling.build_case(method, backbone, frames, "meta" if fake else "cpu", dtype, options=options)
        if fake:
            fakeify(self.vm, self.fake_mode)
        self.build_seconds = time.perf_counter() - start
        self.trainable_bytes = sum(round_block(p.numel() * p.element_size())
                                   for p in self.vm.parameters() if p.requires_grad)
        """Bytes of the gradients of every trainable parameter (what one full set of ``.grad`` holds)."""
        self.stepped: Optional[List[int]] = None
        """Positions (in the trainable parameters) of those that get a gradient; known after a
        run, or copied from an estimator of the same method and backbone."""

    def run(self, batch: Optional[int] = None, *, warmup: str = "step", count_flops: bool = True) -> MemoryReport:
        """Track two training steps at ``batch`` (default: the papers' batch) and report the second.

        ``warmup="step"``: the first step is a full training step, as the benchmark runs it.
        ``warmup="optimizer"``: the first step only creates what a full first step leaves
        behind, AdamW's state for the parameters that get a gradient (from zero gradients;
        which parameters is learnt from the reported step, which is run again in the rare
        case that some got none): cheaper, same bytes (``tests/test_memory.py`` checks it
        for every preset); the planner's probes use it.
        FLOPs are counted on the reported step.
        """
        from vpeft_kernels import _backend as _kernel_backend

        from . import profiling

        batch = self.spec.batch if batch is None else batch
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if warmup not in ("step", "optimizer"):
            raise ValueError(f"warmup must be 'step' or 'optimizer', got {warmup!r}")
        start = time.perf_counter()
        vm = self.vm
        modules = ModuleStack(vm)
        tracker = AllocationTracker(modules, sdpa_lse_padding=self.emulate_cuda)
        weights = list(vm.parameters()) + list(vm.buffers())
        weight_keys = {_key(t) for t in weights}
        for t in weights:
            tracker.adopt(t)
        input_keys: set = set()
        counter = SavedTensorCounter(tracker, weight_keys)
        state = {}

        def classify() -> Dict[int, str]:
            cats = dict.fromkeys(counter.keys(), "saved")
            cats.update(dict.fromkeys(input_keys, "inputs"))
            step_ = state.get("step")
            if step_ is not None:
                for p in step_.params:
                    if p.grad is not None:
                        cats[_key(p.grad)] = "gradients"
                for st in step_.optimizer.state.values():
                    for t in st.values():
                        if isinstance(t, torch.Tensor):
                            cats[_key(t)] = "optimizer_state"
            cats.update(dict.fromkeys(weight_keys, "weights"))
            state["saved_counter_at_peak"] = counter.current
            return cats

        tracker.classify = classify
        flops = None
        gc.collect()
        with contextlib.ExitStack() as stack:
            stack.enter_context(_gc_paused())
            if self.fake:
                stack.enter_context(self.fake_mode)
            stack.enter_context(_mha_fastpath(False))
            stack.enter_context(_kernel_backend.override(self.kernels))
            stack.enter_context(modules)
            stack.enter_context(tracker)
            if self.emulate_cuda:
                stack.enter_context(_CudaFunctions())
            stack.enter_context(counter.hooks())
            step = profiling.TrainingStep(vm, batch, self.frames, self.spec.image_size, "cpu", self.dtype,
                                          self.spec.num_classes)
            state["step"] = step
            input_keys.update(_key(t) for t in (step.video, step.labels, step.text) if t is not None)
            counter.exclude = weight_keys | input_keys
            if self.emulate_cuda:
                for group in step.optimizer.param_groups:
                    group["foreach"] = True
            hooks = [step.optimizer.register_step_pre_hook(lambda *a: setattr(tracker, "phase", "optimizer")),
                     step.optimizer.register_step_post_hook(lambda *a: setattr(tracker, "phase", "zero_grad"))]
            try:
                assumed = self.stepped is None
                if warmup == "step":
                    step()
                else:  # every parameter gets a gradient unless a step has shown otherwise
                    _warm_optimizer(step.optimizer,
                                    [step.params[i] for i in (range(len(step.params)) if assumed else self.stepped)])
                if self.emulate_cuda:  # AdamW's step counters: host tensors in a CUDA run
                    for st in step.optimizer.state.values():
                        if isinstance(st.get("step"), torch.Tensor):
                            tracker.forget(st["step"])
                tracker.phase = "between steps"
                gc.collect()  # the warm-up's cyclic garbage goes before the reported step
                tracker.reset_peak()
                counter.reset()
                got_grad = set()
                hooks += [p.register_post_accumulate_grad_hook(lambda p, i=i: got_grad.add(i))
                          for i, p in enumerate(step.params)]
                if count_flops:
                    fc = flop_counter()
                    with fc:
                        step()
                    flops = int(fc.get_total_flops())
                else:
                    step()
                tracker.finish()
                counter.finish()
                live = tracker.current
                gc.collect()
                state["cyclic"] = live - tracker.current
            finally:
                for h in hooks:
                    h.remove()
                vm.zero_grad(set_to_none=True)
        stepped = sorted(got_grad)
        if warmup == "optimizer" and assumed and len(stepped) != len(step.params):
            self.stepped = stepped  # some parameters get no gradient: warm up again without them
            return self.run(batch, warmup=warmup, count_flops=count_flops)
        self.stepped = stepped
        op, module, phase = tracker.peak_where
        return MemoryReport(
            method=self.method, backbone=self.backbone, frames=self.frames, batch=batch, backend=self.backend,
            dtype=str(self.dtype).replace("torch.", ""), options=dict(self.options),
            peak_allocated_bytes=tracker.peak, peak_op=op, peak_module=_pattern(module) if module else "",
            peak_phase=phase, categories=dict(tracker.peak_breakdown), saved_bytes=counter.peak,
            saved_at_peak_bytes=state.get("saved_counter_at_peak", 0), saved_by_kind=dict(counter.by_kind),
            flops=flops, trainable_params=vm.num_trainable_parameters(),
            total_params=sum(p.numel() for p in vm.parameters()), fake=self.fake,
            emulated=_emulated(self.emulate_cuda, self.backend), op_backends=dict(self.kernels),
            cyclic_garbage_bytes=state.get("cyclic", 0), seconds=time.perf_counter() - start + self.build_seconds)


def estimate_step(method: str, backbone: str, frames: int = 8, batch: Optional[int] = None, *,
                  backend: str = "eager", dtype: torch.dtype = torch.bfloat16, options: Optional[dict] = None,
                  fake: bool = True, emulate_cuda: bool = True, count_flops: bool = True,
                  warmup: str = "step") -> MemoryReport:
    """Estimate one training step of a benchmark case: :class:`StepEstimator` ``(...).run(batch)``.

    Returns a :class:`MemoryReport` (peak, op/module/phase at the peak, live bytes by
    category at the peak, saved-for-backward bytes and kinds, FLOPs, what was emulated
    and what the accounting cannot see).
    """
    est = StepEstimator(method, backbone, frames, backend=backend, dtype=dtype, options=options, fake=fake,
                        emulate_cuda=emulate_cuda)
    return est.run(batch, warmup=warmup, count_flops=count_flops)


def _emulated(emulate_cuda: bool, backend: str) -> List[str]:
    out = list(EMULATED[:-1]) if emulate_cuda else []
    return out + [EMULATED[-1]] if backend == "fused" else out

