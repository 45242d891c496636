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
                                         r"are: dropout \(default 0.5\), init \(default 1.0\)"):
        vpeft.adapt(tiny_clip(), "toy_gain", num_frames=2, gian=1.0)


def test_option_types_and_builtin_flags():
    from conftest import tiny_clip

    with pytest.raises(ValueError, match=r"option bottleneck=16.7 of method 'st_adapter' must be int, got float"):
        vpeft.adapt(tiny_clip(), "st_adapter", num_frames=2, bottleneck=16.7)
    with pytest.raises(ValueError, match=r"option checkpointing='yes' of method 'side4video' must be bool"):
        vpeft.adapt(tiny_clip(), "side4video", num_frames=2, checkpointing="yes")
    assert vpeft.METHODS == ("linear_probe", "full_finetune", "st_adapter", "msta", "side4video")
    assert get_method("msta").uses_text and get_method("msta").find_unused_parameters
    assert not get_method("side4video").joint_space and get_method("side4video").checkpointing == "option"
    assert get_method("full_finetune").trains_backbone and not get_method("linear_probe").backbone_grad


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _imports(path, name):
    """vpeft modules that ``path`` imports anywhere (module level or inside functions)."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "vpeft")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "vpeft":
                continue
            if node.module:
                out.add(mod)
            for a in node.names:          # `from . import config` imports the submodule
                out.add(f"{mod}.{a.name}")
    return out


def _graph():
    files = {}
    for d, _, names in os.walk(os.path.join(ROOT, "vpeft")):
        for n in names:
            if n.endswith(".py"):
                files[_module_name(os.path.join(d, n))] = os.path.join(d, n)
    return {m: {i for i in _imports(p, m) if i in files and i != m} for m, p in files.items()}


def test_import_graph_has_no_circle():
    graph = _graph()
    assert "vpeft.engine.trainer" in graph and "vpeft.tasks.protocols" in graph
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n == "vpeft" or m == "vpeft":
                continue   # the package's __init__ re-exports; nothing inside imports it
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert not any("vpeft" in graph[m] for m in graph if m != "vpeft"), "a module imports the vpeft package"
    assert graph["vpeft.engine.config"] == set(), graph["vpeft.engine.config"]
    assert "vpeft.tasks" not in {i.rsplit(".", 1)[0] for i in graph["vpeft.engine.trainer"]}
