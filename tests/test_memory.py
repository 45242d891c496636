"""vpeft.memory: the fake-tensor estimate equals the same accounting on real CPU tensors, byte for byte.

Tiny backbones, 2 frames, batch 2, fp32 (real CPU tensors are computed for real).
"""
import pytest
import torch

from vpeft import memory, profiling
from vpeft.model import VideoModel

FRAMES, BATCH = 2, 2


def _bytes(r: memory.MemoryReport):
    return r.peak_allocated_bytes, r.saved_bytes, r.categories


def _compare(method, backbone, backend="eager", kernels=None):
    kw = dict(frames=FRAMES, dtype=torch.float32, backend=backend, kernels=kernels)
    fake = memory.StepEstimator(method, backbone, fake=True, **kw)
    real = memory.StepEstimator(method, backbone, fake=False, **kw)
    r_fake, r_real = fake.run(BATCH), real.run(BATCH, count_flops=False)
    assert _bytes(r_fake) == _bytes(r_real), (r_fake.format(), r_real.format())
    assert r_fake.peak_allocated_bytes == sum(r_fake.categories.values())
    assert r_fake.peak_allocated_bytes % memory.BLOCK == 0
    # the saved_tensors_hooks counter and the tracker's "saved" category agree at the peak
    assert r_fake.saved_at_peak_bytes == r_fake.categories["saved"]
    assert r_real.saved_at_peak_bytes == r_real.categories["saved"]
    # the planner's cheap warm-up leaves the same state as a full first step
    again = fake.run(BATCH, warmup="optimizer", count_flops=False)
    assert _bytes(again) == _bytes(r_fake)
    fresh = memory.StepEstimator(method, backbone, fake=True, **kw)  # learns which parameters get gradients
    assert _bytes(fresh.run(BATCH, warmup="optimizer", count_flops=False)) == _bytes(r_fake)
    return r_fake


SLOW = ("full_finetune", "msta", "side4video", "st_adapter_24x384")  # the larger tiny steps


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m
                                    for m in profiling.METHOD_PRESETS])
def test_fake_equals_real_eager(method):
    r = _compare(method, "tiny-vit")
    assert r.categories["weights"] > 0 and r.flops > 0
    if method not in ("full_finetune", "linear_probe"):
        assert r.saved_bytes > 0


@pytest.mark.slow
def test_fake_equals_real_post_norm_streaming_checkpointed():
    """tiny-eva: ViT-E's side4video settings (post-norm, stream, checkpointing)."""
    _compare("side4video_light", "tiny-eva")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["tiny-vit", "tiny-eva"])
def test_fake_equals_real_fused_ladder(backbone):
    """The compiled ladder extension has CPU kernels: its fake implementation is checked against them.
    (The Triton kernels run on the CPU only through the interpreter, far too slow for this test.)"""
    r = _compare("side4video_light", backbone, backend="fused", kernels={"ladder_projection": "extension"})
    assert r.op_backends["ladder_projection"] == "extension"


@pytest.mark.slow
def test_fused_estimate_runs_every_kernel_through_its_fake():
    for method in ("st_adapter_12x384", "msta", "side4video_light"):
        eager = memory.estimate_step(method, "tiny-vit", FRAMES, BATCH, count_flops=False)
        fused = memory.estimate_step(method, "tiny-vit", FRAMES, BATCH, backend="fused", count_flops=False)
        assert fused.saved_bytes < eager.saved_bytes  # the fused kernels keep less for backward
        assert any("fused backend" in e for e in fused.emulated)


def test_frozen_side4video_tower_keeping_activations_is_caught(monkeypatch):
    est = memory.StepEstimator("side4video_light", "tiny-vit", FRAMES)
    before = est.run(BATCH, count_flops=False)
    assert not any(k.startswith("backbone") for k in before.saved_by_kind)

    def leaky(self, video):  # a regression: autograd let into the frozen tower
        frames = video.flatten(0, 1).detach().requires_grad_()
        ids = tuple(self.side.layer_ids)
        _, feats = self._tokens(frames, keep=ids, stop_early=True)
        return self.side(video.transpose(1, 2), [self.tower.side_view(f) for f in feats])

    monkeypatch.setattr(VideoModel, "_side_tokens", leaky)
    after = est.run(BATCH, count_flops=False)
    assert after.saved_bytes > 2 * before.saved_bytes
    assert any(k.startswith("backbone") for k in after.saved_by_kind)


def test_round_block_and_report():
    assert [memory.round_block(n) for n in (0, 1, 512, 513, 4096)] == [0, 512, 512, 1024, 4096]
    r = memory.estimate_step("linear_probe", "tiny-vit", FRAMES, 1, count_flops=False)
    text = r.format()
    assert "allocator overhead not included" in text and "CUDA context" in text and "emulated" in text
    d = r.to_dict()
    assert d["peak_allocated_bytes"] == r.peak_allocated_bytes and set(d["categories"]) == set(memory.CATEGORIES)
    with pytest.raises(ValueError, match="unknown backbone"):
        memory.estimate_step("msta", "ViT-Z-99")
    with pytest.raises(ValueError, match="batch"):
        memory.estimate_step("msta", "tiny-vit", FRAMES, 0)
