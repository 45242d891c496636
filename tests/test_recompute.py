"""Recompute-instead-of-keep options (issue 12), fp32 on the CPU with tiny backbones.

For every option: the forward output and every gradient are bit-identical with the
option on and off, and the bytes autograd keeps for backward shrink by what the
option promises. Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``
over distinct storages, parameters excluded (they are alive anyway).
"""
import collections
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


def saved_shapes(fn, storages=False):
    """Shapes of the distinct non-parameter storages saved for backward by ``fn()`` (first
    view seen); with ``storages``, a dict from storage address to that shape."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen.setdefault(t.untyped_storage().data_ptr(), tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen if storages else list(seen.values())


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


@pytest.mark.parametrize("preset", ["12x384", "24x384"])
def test_recompute_adapters_is_exact_and_drops_the_norm_inputs(preset):
    """recompute_adapters: same output and gradients; each adapter keeps its input only, so
    the norm after it keeps neither its input (the adapter's output) nor its statistics."""
    base = tiny_clip(layers=4).visual
    video, labels = torch.randn(2, T, 3, 32, 32), torch.tensor([1, 3])
    opts = dict(preset=preset, bottleneck=16)
    plain = _step(_adapted(base, "st_adapter", **opts), video, labels)
    vm = _adapted(base, "st_adapter", recompute_adapters=True, **opts)
    assert all(b.recompute_adapters for b in vm.tower.blocks)
    rec = _step(vm, video, labels)
    assert_same(plain, rec)
    adapters = 4 * (2 if preset == "24x384" else 1)
    rows, width = 2 * T * (1 + 16), 64
    norm_keeps = rows * width * 4 + 2 * rows * 4  # fp32 input, mean and rstd
    assert plain[2] - rec[2] >= adapters * norm_keeps, (plain[2], rec[2], adapters * norm_keeps)
    # whole-block checkpointing wins where both are asked for, and the result is the same
    both = _adapted(base, "st_adapter", recompute_adapters=True, checkpoint_every=2, **opts)
    assert [(b.checkpoint, b.recompute_adapters) for b in both.tower.blocks] == [(True, False), (False, True)] * 2
    assert_same(plain, _step(both, video, labels))


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


# ---------------------------------------------------------------- Side4Video

def _side(base, **options):
    return _adapted(base, "side4video", side_width=64, **options)


def _bn_state(vm):
    return {k: v.clone() for k, v in vm.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


SIDE_CASES = [
    (lambda: tiny_clip(layers=4, width=128).visual, 32, dict(side_layers=4)),
    (lambda: create_tiny_eva(depth=4, image_size=56), 56, dict(side_layers=2)),
]
SIDE_IDS = ["clip-prenorm", "eva-postnorm"]


@pytest.mark.parametrize("factory,size,options", SIDE_CASES, ids=SIDE_IDS)
def test_side_block_checkpointing_exact_once_per_step_statistics_one_input_per_block(factory, size, options):
    base = factory()
    video, labels = torch.randn(2, T, 3, size, size), torch.tensor([1, 3])
    plain_vm, ckpt_vm = _side(base, **options), _side(base, checkpointing=True, **options)
    for _ in range(2):  # two steps: running statistics after each must agree
        plain, ckpt = _step(plain_vm, video, labels), _step(ckpt_vm, video, labels)
        assert_same(plain, ckpt)
        bn_a, bn_b = _bn_state(plain_vm), _bn_state(ckpt_vm)
        assert bn_a.keys() == bn_b.keys() and any("blocks" in k for k in bn_a)
        for k in bn_a:
            assert torch.equal(bn_a[k], bn_b[k]), k
    assert int(bn_b["side.blocks.0.conv_norm.num_batches_tracked"]) == 2
    # one region per side block keeps its input s (B*T, N, d) and the [CLS] copy (B*T, d),
    # not three inputs, and not the ladder output (B*T, 1+N, d) the [CLS] was sliced from
    bt, n, d = 2 * T, ckpt_vm.tower.num_patches, 64
    blocks = len(ckpt_vm.side.blocks)
    ladder_out = []
    ckpt_vm.side.ladder.register_forward_hook(lambda m, a, o: ladder_out.append(o.untyped_storage().data_ptr()))
    saved = saved_shapes(lambda: ckpt_vm(video), storages=True)
    assert ladder_out and ladder_out[0] not in saved
    # (B*T, 1+N, d) tensors an eager post-norm ladder's LayerNorm keeps (its input) are the ladder's own
    side = collections.Counter(sh for sh in saved.values() if sh[-1] == d and sh[0] == bt and sh[1] != 1 + n)
    assert side == {(bt, n, d): blocks, (bt, d): blocks}, side
    _, kept = saved_bytes(lambda: ckpt_vm(video))
    _, plain_kept = saved_bytes(lambda: plain_vm(video))
    assert plain_kept - kept >= blocks * 4 * bt * n * d * 4, (plain_kept, kept)


@pytest.mark.parametrize("factory,size,options", SIDE_CASES, ids=SIDE_IDS)
def test_recompute_levels_is_exact_and_keeps_no_backbone_level(factory, size, options):
    base = factory()
    video, labels = torch.randn(2, T, 3, size, size), torch.tensor([1, 3])
    kept_vm = _side(base, stream=True, recompute_levels=False, checkpointing=True, **options)
    again_vm = _side(base, recompute_levels=True, checkpointing=True, **options)
    assert again_vm.side_stream and again_vm.side_recompute_levels and not kept_vm.side_recompute_levels
    calls = []
    for blk in again_vm.tower.blocks:
        blk.register_forward_hook(lambda m, a, o: calls.append(1))
    kept, again = _step(kept_vm, video, labels), _step(again_vm, video, labels)
    assert_same(kept, again)
    assert any(k.startswith("side.ladder") for k in again[1])
    assert len(calls) == 2 * (again_vm.side.layer_ids[-1] + 1)  # the price: a second frozen forward
    # the bytes removed: every level input (B*T, 1+N, D) the ladder kept for its weight gradient
    width, rows = kept_vm.tower.width, 2 * T * (1 + kept_vm.tower.num_patches)
    levels = len(kept_vm.side.blocks)
    assert kept[2] - again[2] >= levels * rows * width * 4, (kept[2], again[2])
    assert not [sh for sh in saved_shapes(lambda: again_vm(video)) if sh[-1] == width]


def test_recompute_levels_twice_over_a_retained_graph():
    base = tiny_clip(layers=4).visual
    vm = _side(base, recompute_levels=True, side_layers=2)
    out = vm(torch.randn(2, T, 3, 32, 32)).sum()
    out.backward(retain_graph=True)
    first = vm.side.ladder.weight.grad.clone()
    out.backward()
    assert torch.equal(vm.side.ladder.weight.grad, 2 * first)


def test_stream_keeps_only_the_current_token_stream_while_training():
    """With stream (and its default recompute_levels), a training forward holds at most the
    tower's current output when a side block ends; without recompute_levels every level stays."""
    import weakref

    def alive_counts(**options):
        vm = _side(tiny_clip(layers=4).visual, side_layers=4, **options)
        outs, seen = [], []
        for blk in vm.tower.blocks:
            blk.register_forward_hook(lambda m, a, o: outs.append(weakref.ref(o)))
        for blk in vm.side.blocks:
            blk.register_forward_hook(lambda m, a, o: seen.append(sum(r() is not None for r in outs)))
        vm(torch.randn(2, T, 3, 32, 32)).sum().backward()
        return seen

    assert max(alive_counts(stream=True)) <= 1
    assert alive_counts(stream=True, recompute_levels=False)[-1] == 4


@pytest.mark.parametrize("stream", [False, True])
def test_tower_chunk_is_exact_and_bounds_the_frozen_transients(stream):
    base = create_tiny_eva(depth=4, image_size=56)
    video, labels = torch.randn(2, T, 3, 56, 56), torch.tensor([1, 3])
    whole_vm = _side(base, side_layers=2, stream=stream)
    chunk_vm = _side(base, side_layers=2, stream=stream, tower_chunk=3)
    rows = []
    for blk in chunk_vm.tower.blocks:
        blk.mlp.fc1.register_forward_hook(lambda m, a, o: rows.append(o.shape[0]))
    whole, chunked = _step(whole_vm, video, labels), _step(chunk_vm, video, labels)
    assert_same(whole, chunked)
    assert whole[2] == chunked[2]  # saves the same; what it bounds is transient
    assert rows and max(rows) == 3  # the MLP hidden layer of 3 frames at a time, not 2 * T = 8


def test_side_memory_option_errors():
    base = tiny_clip(layers=4).visual
    with pytest.raises(ValueError, match=r"side4video option tower_chunk=0 \(int\); expected a positive int"):
        _side(base, tower_chunk=0)
    with pytest.raises(ValueError, match=r"side4video option recompute_levels='yes' \(str\); expected bool"):
        _side(base, recompute_levels="yes")


# ---------------------------------------------------------------- what each option saves and costs

def test_plan_tries_the_untaken_recompute_options():
    from vpeft.memory_options import untaken
    from vpeft.plan import memory_saving_alternatives

    assert [lbl for lbl, _ in untaken("side4video", {"stream": True, "checkpointing": True})] == ["tower_chunk=16"]
    # sized for the step: 4 chunks of whole clips at batch 129 x 8 frames (33 clips = 264 frames)
    assert untaken("side4video", {"stream": True, "checkpointing": True}, batch=129, frames=8) == [
        ("tower_chunk=264", {"tower_chunk": 264})]
    assert untaken("side4video", {"stream": True, "checkpointing": True}, batch=2, frames=8) == [
        ("tower_chunk=16", {"tower_chunk": 16})]
    assert [lbl for lbl, _ in untaken("st_adapter", {"checkpointing": True})] == []
    alts = memory_saving_alternatives("st_adapter_12x384", "ViT-B-16", {"preset": "12x384"}, "eager", 8)
    assert [lbl for lbl, _ in alts] == ["recompute_adapters", "checkpoint_every=2", "checkpointing",
                                        "backend fused", "frames 4"]
    assert alts[2][1] == {"options": {"checkpointing": True}}
    side = memory_saving_alternatives("side4video_light", "EVA02-E-14", {"stream": True, "checkpointing": True},
                                      "fused", 8)
    assert [lbl for lbl, _ in side] == ["tower_chunk=16", "frames 4"]


def test_plan_shows_what_an_option_costs_in_flops():
    """The FLOP cost of recomputation, counted on fake tensors, as ``vpeft plan`` prints it."""
    from vpeft.memory import estimate_step
    from vpeft.plan import format_alternatives

    plain = estimate_step("st_adapter_12x384", "tiny-vit", frames=4, batch=2)
    ckpt = estimate_step("st_adapter_12x384", "tiny-vit", frames=4, batch=3, options={"checkpointing": True})
    result = dict(method="st_adapter_12x384", batch=2, first_failure=3, flops=plain.flops,
                  alternatives=[dict(change="checkpointing", batch=3, peak_allocated_bytes=ckpt.peak_allocated_bytes,
                                     fits=True, flops=ckpt.flops)])
    ratio = (ckpt.flops / 3) / (plain.flops / 2)
    assert 1.05 < ratio < 1.6, ratio  # one more forward of the frozen blocks, not of the whole step
    text = "\n".join(format_alternatives(result))
    assert f"{ratio:.2f}x FLOPs" in text and "fits" in text


def test_tracker_sees_recomputed_blocks_released():
    """vpeft.memory on a checkpointed model: each recomputed block is released after its
    backward (a module tracker holding the recomputed graph made the peak grow instead)."""
    from vpeft.memory import estimate_step

    plain = estimate_step("st_adapter_12x384", "tiny-vit", frames=4, batch=2, count_flops=False)
    ckpt = [estimate_step("st_adapter_12x384", "tiny-vit", frames=4, batch=2, count_flops=False, fake=fake,
                          options={"checkpointing": True}) for fake in (True, False)]
    assert ckpt[0].peak_allocated_bytes == ckpt[1].peak_allocated_bytes  # fake == real CPU tensors
    assert ckpt[0].saved_bytes < plain.saved_bytes / 10
    assert ckpt[0].peak_allocated_bytes < plain.peak_allocated_bytes, (ckpt[0].peak_gb, plain.peak_gb)
