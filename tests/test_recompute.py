"""Recompute-instead-of-keep options (issue 12), fp32 on the CPU with tiny backbones.

For every option: the forward output and every gradient are bit-identical with the
option on and off, and the bytes autograd keeps for backward shrink by what the
option promises. Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``
over distinct storages, parameters excluded (they are alive anyway).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.backbones.build import create_tiny_eva
from vpeft.methods.recompute import checkpointed_blocks, recomputing, run_region

from conftest import tiny_clip

T = 4


def saved_bytes(fn):
    """Run ``fn()`` and return (its result, bytes of distinct non-parameter storages saved for backward)."""
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _adapted(base, method, seed=0, **options):
    vm = vpeft.adapt(copy.deepcopy(base), method, num_frames=T, num_classes=5, **options)
    torch.manual_seed(seed)
    for p in vm.parameters():  # non-trivial adapters (ST-Adapter starts as the identity)
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return vm.train()


def _step(vm, video, labels):
    """One forward and backward with a fixed RNG state; (logits, {name: grad}, saved bytes)."""
    vm.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # same dropout masks in both runs
    out, nbytes = saved_bytes(lambda: vm(video))
    F.cross_entropy(out, labels).backward()
    return out.detach(), {n: p.grad.clone() for n, p in vm.named_parameters() if p.grad is not None}, nbytes


def assert_same(a, b):
    out_a, grads_a = a[:2]
    out_b, grads_b = b[:2]
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


@pytest.mark.parametrize("method,options", [
    ("st_adapter", dict(preset="12x384", bottleneck=16)),
    ("st_adapter", dict(preset="24x384", bottleneck=16)),
    ("msta", dict(bottleneck=16, layers=(2, 4), adapter_dropout=0.5)),
], ids=["st_adapter_12", "st_adapter_24", "msta_dropout"])
def test_block_checkpointing_is_exact_and_keeps_only_block_inputs(method, options):
    base = tiny_clip(layers=4).visual
    video, labels = torch.randn(2, T, 3, 32, 32), torch.tensor([1, 3])
    plain = _step(_adapted(base, method, **options), video, labels)
    ckpt_vm = _adapted(base, method, checkpointing=True, **options)
    assert all(b.checkpoint for b in ckpt_vm.tower.blocks if hasattr(b, "checkpoint"))
    ckpt = _step(ckpt_vm, video, labels)
    assert_same(plain, ckpt)
    # what is kept: one (B*T, 1+N, D) fp32 input per checkpointed block (plus the
    # head's and pooling's few small tensors); the plain run keeps many times that
    tokens = 2 * T * (1 + 16) * 64 * 4
    blocks = sum(bool(getattr(b, "checkpoint", False)) for b in ckpt_vm.tower.blocks)
    assert blocks == (4 if method == "st_adapter" else 3)
    assert ckpt[2] <= blocks * tokens + 8 * 1024, (ckpt[2], blocks * tokens)
    assert plain[2] > 4 * ckpt[2], (plain[2], ckpt[2])


def test_msta_checkpointing_covers_the_text_tower():
    base = tiny_clip(layers=4, text_width=32)
    vm = vpeft.adapt(copy.deepcopy(base), "msta", num_frames=T, bottleneck=16, layers=(3, 4), checkpointing=True)
    assert [b.checkpoint for b in vm.text_tower.blocks[2:]] == [True, True]
    ref = vpeft.adapt(copy.deepcopy(base), "msta", num_frames=T, bottleneck=16, layers=(3, 4))
    ref.load_state_dict(vm.state_dict())
    text = torch.randint(1, 100, (3, 16))
    for m in (vm, ref):
        m.train()
        torch.manual_seed(2)
        m.encode_text(text).sum().backward()
    for (n, p), q in zip(vm.named_parameters(), ref.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n


def test_checkpoint_every_and_lists_are_the_middle_ground():
    base = tiny_clip(layers=4).visual
    video, labels = torch.randn(2, T, 3, 32, 32), torch.tensor([1, 3])
    opts = dict(preset="12x384", bottleneck=16)
    full = _step(_adapted(base, "st_adapter", checkpointing=True, **opts), video, labels)
    every2 = _adapted(base, "st_adapter", checkpoint_every=2, **opts)
    assert [b.checkpoint for b in every2.tower.blocks] == [True, False, True, False]
    half = _step(every2, video, labels)
    listed = _step(_adapted(base, "st_adapter", checkpointing=[0, 2], **opts), video, labels)
    none = _step(_adapted(base, "st_adapter", **opts), video, labels)
    assert_same(none, half)
    assert_same(half, listed)
    assert half[2] == listed[2]
    assert full[2] < half[2] < none[2], (full[2], half[2], none[2])


def test_checkpoint_options_errors():
    assert checkpointed_blocks(None, None, 4) == set()
    assert checkpointed_blocks(True, None, 4) == {0, 1, 2, 3}
    assert checkpointed_blocks(None, 3, 7, adapted=range(2, 7)) == {2, 5}
    with pytest.raises(ValueError, match="not adapted blocks"):
        checkpointed_blocks([0, 9], None, 4)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        checkpointed_blocks(None, 0, 4)
    with pytest.raises(ValueError, match="not both"):
        checkpointed_blocks([1], 2, 4)
    with pytest.raises(ValueError, match="True, False or a list"):
        checkpointed_blocks("yes", None, 4)
    with pytest.raises(ValueError, match="not adapted blocks"):
        vpeft.adapt(tiny_clip(layers=4).visual, "msta", num_frames=T, layers=(3, 4), checkpointing=[0])


def test_run_region_marks_only_the_recomputation():
    seen = []

    def fn(x):
        seen.append(recomputing())
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    run_region(fn, x).sum().backward()
    assert seen == [False, True]
    assert not recomputing()
    with torch.no_grad():
        run_region(fn, x)
    assert seen[-1] is False and len(seen) == 3
