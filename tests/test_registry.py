"""The method registry (a method defined in this file alone adapts a model) and the package's
import graph (read with ast: no circle; the config schema imports nothing else of vpeft)."""
import ast
import os

import pytest
import torch
import torch.nn as nn

import vpeft
from vpeft.methods.registry import Injected, MethodSpec, Option, get_method, method_names, register_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Scale(nn.Module):
    """A toy method's module: scales each block's output by a learnt per-channel gain."""

    def __init__(self, block, width, init):
        super().__init__()
        self.block = block
        self.gain = nn.Parameter(torch.full((width,), float(init)))

    def forward(self, x, *args, **kwargs):
        return self.block(x, *args, **kwargs) * self.gain


def _inject(ctx):
    for i, blk in enumerate(ctx.tower.blocks):
        ctx.tower.blocks[i] = _Scale(blk, ctx.tower.width, ctx.options["init"]).to(**ctx.factory)
    return Injected()


def test_a_method_registered_here_adapts_a_model():
    from conftest import tiny_clip

    if "toy_gain" not in method_names():
        register_method(MethodSpec("toy_gain", {"init": Option(1.0, float, "initial gain")}, inject=_inject))
    vm = vpeft.adapt(tiny_clip(), "toy_gain", num_frames=2, num_classes=3, init=2)
    trained = {n for n, p in vm.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".gain") or n.startswith("head.") for n in trained)
    assert vm.options["init"] == 2.0 and isinstance(vm.options["init"], float)
    vm.train()
    assert all(not m.training for m in vm.tower.blocks)      # wrappers of frozen blocks stay in eval
    vm(torch.randn(2, 2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for n, p in vm.named_parameters() if n in trained)
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec("toy_gain", {}, inject=_inject))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['gian'\] for method 'toy_gain'; its options "
                                         r"are: backend \(default None\), dropout \(default 0.5\), init \(default 1.0\)"):
        vpeft.adapt(tiny_clip(), "toy_gain", num_frames=2, gian=1.0)


def test_option_types_and_builtin_flags():
    from conftest import tiny_clip

    with pytest.raises(ValueError, match=r"st_adapter option bottleneck=16.7 \(float\); expected a positive int"):
        vpeft.adapt(tiny_clip(), "st_adapter", num_frames=2, bottleneck=16.7)
    with pytest.raises(ValueError, match=r"side4video option checkpointing='yes' \(str\); expected True, False, None or a list"):
        vpeft.adapt(tiny_clip(), "side4video", num_frames=2, checkpointing="yes")
    assert vpeft.METHODS == ("linear_probe", "full_finetune", "st_adapter", "msta", "side4video")
    assert get_method("msta").uses_text and get_method("msta").find_unused_parameters
    assert not get_method("side4video").joint_space and get_method("side4video").checkpointing == "option"
    assert get_method("full_finetune").trains_backbone and not get_method("linear_probe").backbone_grad


@pytest.mark.parametrize("method,options", [("st_adapter", {"bottleneck": 16}), ("msta", {"bottleneck": 16}),
                                            ("side4video", {"side_width": 64, "side_layers": 2})])
def test_backend_option_reaches_every_op_and_is_recorded(method, options):
    """``backend=`` is passed through to every op the method's modules call; the recorder reads what ran."""
    from conftest import tiny_clip
    from vpeft.methods.ops import record_backends
    from vpeft_kernels import _backend

    vm = vpeft.adapt(tiny_clip(), method, num_frames=2, num_classes=3, backend="eager", **options)
    seen = {}
    with record_backends(seen):
        vm(torch.randn(2, 2, 3, 32, 32))
        if method == "msta":
            vm.encode_text(torch.randint(1, 100, (2, 16)))
    expected = {"st_adapter": {"st_adapter"}, "msta": {"msta_adapter"},
                "side4video": {"ladder_projection", "token_shift_attention"}}[method]
    assert set(seen) == expected and all(b == {"eager"} for b in seen.values()), seen
    if method == "side4video" and _backend.backend_status()["extension"].startswith("available"):
        from vpeft.methods.side4video import LadderProjection   # the compiled extension, chosen by name

        seen = {}
        with record_backends(seen):
            LadderProjection(2, 8, 4, backend="extension")([torch.randn(3, 8), torch.randn(3, 8)])
        assert seen == {"ladder_projection": {"extension"}}
