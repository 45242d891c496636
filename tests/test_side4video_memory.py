"""Side4Video memory techniques on tiny CPU models: streaming the frozen tower into the
side network, side-block checkpointing, and building towers directly on a device/dtype."""
import copy

import pytest
import torch

import vpeft
from vpeft.backbones.build import construct_on, create_tiny_eva, create_vision_tower

from conftest import tiny_clip

T = 4


def _pair(factory, **options):
    """Two identical side4video models, one streaming and one collecting every level first."""
    torch.manual_seed(0)
    base = factory()
    a = vpeft.adapt(copy.deepcopy(base), "side4video", num_frames=T, num_classes=5, side_width=64, **options)
    b = vpeft.adapt(copy.deepcopy(base), "side4video", num_frames=T, num_classes=5, side_width=64,
                    stream=True, **options)
    b.load_state_dict(a.state_dict())
    return a.train(), b.train()


def _step(vm, video, labels):
    vm.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # same dropout mask in the head for both models
    out = vm(video)
    torch.nn.functional.cross_entropy(out, labels).backward()
    return out.detach(), {n: p.grad.clone() for n, p in vm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("factory,size,options", [
    (lambda: tiny_clip(layers=4), 32, dict(side_layers=2)),
    (lambda: tiny_clip(layers=4), 32, dict(side_layers=4, checkpointing=True)),
    (lambda: create_tiny_eva(depth=4, image_size=56), 56, dict(side_layers=2, checkpointing=True)),
    (lambda: tiny_clip(layers=4), 32, dict(side_layers=2, recompute_levels=False)),
], ids=["clip-every-2nd", "clip-all-ckpt", "eva-postnorm-ckpt", "clip-levels-kept"])
def test_streaming_equals_collecting(factory, size, options):
    plain, streaming = _pair(factory, **options)
    assert streaming.side_stream and not plain.side_stream
    video = torch.randn(2, T, 3, size, size)
    labels = torch.tensor([1, 3])
    out_a, grads_a = _step(plain, video, labels)
    out_b, grads_b = _step(streaming, video, labels)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert any(k.startswith("side.ladder") for k in grads_a)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-6, msg=k)
    # only the side network and head are trained; the frozen tower got no gradient
    assert all(k.startswith(("side.", "head.")) for k in grads_b)


def test_streaming_interleaves_tower_and_side_blocks():
    """With streaming, side block i runs before the tower computes layer layer_ids[i] + 1,
    and tower layers after the last ladder level never run."""
    _, vm = _pair(lambda: tiny_clip(layers=4), side_layers=2)
    events = []
    for i, blk in enumerate(vm.tower.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: events.append(("tower", i)))
    for i, blk in enumerate(vm.side.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: events.append(("side", i)))
    vm(torch.randn(1, T, 3, 32, 32))
    assert vm.side.layer_ids == [1, 3]
    assert events == [("tower", 0), ("tower", 1), ("side", 0), ("tower", 2), ("tower", 3), ("side", 1)]


def _saved_backbone_width_tensors(vm, video, width):
    """(rows, width) of the non-parameter tensors autograd saves for backward whose last
    dim is the backbone width. Rows, not shapes: eager's F.linear saves its input
    flattened to 2-D, the compiled ladder (backend "extension") the tensor itself; and
    parameters (e.g. a ladder projection weight (L, d, D)) are not tower activations."""
    saved = []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == width and not t.requires_grad:
            saved.append((t.numel() // width, width))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vm(video)
    return saved


def test_streaming_saves_only_ladder_inputs_post_norm():
    """What bounds memory: the ladder's weight gradient needs each level's input. With the
    post-norm (EVA) ladder ``LN(Linear(z))`` that is exactly one (B*T, 1+N, D) tensor per
    level and nothing else of the frozen tower; with ``recompute_levels`` (``stream=True``'s
    default) not even that: nothing D-wide is kept."""
    video = torch.randn(2, T, 3, 56, 56)
    _, kept = _pair(lambda: create_tiny_eva(depth=4, image_size=56), side_layers=2, checkpointing=True,
                    recompute_levels=False)
    width = kept.tower.width
    n = kept.tower.num_patches
    # one (B*T*(1+N), D) input per level (whichever ladder backend runs), no other tower tensor
    assert _saved_backbone_width_tensors(kept, video, width) == [(2 * T * (1 + n), width)] * 2
    _, streamed = _pair(lambda: create_tiny_eva(depth=4, image_size=56), side_layers=2, checkpointing=True)
    assert streamed.side_recompute_levels
    assert _saved_backbone_width_tensors(streamed, video, width) == []


def test_streaming_releases_each_level_when_not_trained():
    """Without a graph (eval under no_grad), streaming keeps no level alive after its use:
    every tower output is freed before the next side block has finished."""
    _, vm = _pair(lambda: tiny_clip(layers=4), side_layers=4)
    vm.eval()
    alive = []
    import weakref

    for blk in vm.tower.blocks:
        blk.register_forward_hook(lambda m, a, o: alive.append(weakref.ref(o)))
    seen = []
    for blk in vm.side.blocks:
        blk.register_forward_hook(lambda m, a, o: seen.append(sum(r() is not None for r in alive)))
    with torch.no_grad():
        vm(torch.randn(1, T, 3, 32, 32))
    # when side block i finishes, only the tower's current output may still be referenced
    assert max(seen) <= 1, seen


def test_checkpointing_keeps_results():
    torch.manual_seed(0)
    base = create_tiny_eva(depth=2, image_size=56)
    a = vpeft.adapt(copy.deepcopy(base), "side4video", num_frames=T, num_classes=3, side_width=64).train()
    b = vpeft.adapt(copy.deepcopy(base), "side4video", num_frames=T, num_classes=3, side_width=64,
                    checkpointing=True, stream=True).train()
    b.load_state_dict(a.state_dict())
    video, labels = torch.randn(2, T, 3, 56, 56), torch.tensor([0, 2])
    out_a, ga = _step(a, video, labels)
    out_b, gb = _step(b, video, labels)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-6, msg=k)


def test_construct_on_sets_dtype_and_restores_default():
    before = torch.get_default_dtype()
    vis = create_tiny_eva(depth=2, dtype=torch.bfloat16)
    assert torch.get_default_dtype() == before
    assert {p.dtype for p in vis.parameters()} == {torch.bfloat16}
    with pytest.raises(RuntimeError):
        with construct_on("cpu", torch.bfloat16):
            raise RuntimeError("boom")
    assert torch.get_default_dtype() == before


def test_vit_e14_tower_builds_in_bf16_without_memory_and_fits_side4video_e14_light():
    """EVA02-E-14's vision tower on the meta device: the same code path as on the GPU,
    shapes only. 4.35 B parameters, post-norm blocks, SDPA attention; Side4Video 32x576
    with the post-norm ladder has ~183 M trainable parameters (METHODS.md section 3)."""
    vis = create_vision_tower("EVA02-E-14", device="meta", dtype=torch.bfloat16)
    params = list(vis.parameters())
    assert {p.device.type for p in params} == {"meta"} and {p.dtype for p in params} == {torch.bfloat16}
    assert abs(sum(p.numel() for p in params) - 4.35e9) / 4.35e9 < 0.01
    blocks = vis.trunk.blocks
    assert len(blocks) == 64 and type(blocks[0]).__name__ == "EvaBlockPostNorm"
    assert all(b.attn.fused_attn for b in blocks)  # F.scaled_dot_product_attention in the frozen tower
    vm = vpeft.adapt(vis, "side4video", num_frames=8, num_classes=174, side_width=576, side_layers=32,
                     checkpointing=True, stream=True)
    assert vm.side_stream and vm.side.blocks[0].post_norm and vm.side.ladder.norm == "post"
    assert vm.side.layer_ids == list(range(1, 64, 2))
    n = vm.num_trainable_parameters(include_head=False)
    assert abs(n - 183e6) / 183e6 < 0.01, n


def _saved_bytes(vm, video):
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vm(video)
    return sum(storages.values())


def test_checkpointing_and_streaming_shrink_what_backward_keeps():
    """Post-norm side network on a tiny EVA: checkpointing the side sub-blocks saves far
    fewer activation bytes for backward; streaming saves no more than collecting."""
    torch.manual_seed(0)
    base = create_tiny_eva(depth=4, image_size=56)
    video = torch.randn(2, T, 3, 56, 56)
    sizes = {}
    for name, opts in {"plain": {}, "stream": dict(stream=True), "ckpt": dict(checkpointing=True),
                       "both": dict(stream=True, checkpointing=True)}.items():
        vm = vpeft.adapt(copy.deepcopy(base), "side4video", num_frames=T, num_classes=3, side_width=64,
                         side_layers=2, **opts).train()
        sizes[name] = _saved_bytes(vm, video)
    assert sizes["ckpt"] < 0.6 * sizes["plain"], sizes
    assert sizes["both"] < 0.6 * sizes["stream"], sizes
    assert sizes["stream"] <= sizes["plain"] and sizes["both"] <= sizes["ckpt"], sizes
