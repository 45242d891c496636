"""Fidelity to the released recipes (issue 13): BatchNorm under checkpointing, heads,
initialisation, retrieval scope, MSTA defaults, presets."""
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import vpeft
from vpeft.methods.side4video import SideNetwork, TokenBatchNorm, VideoBatchNorm

from conftest import tiny_clip, tiny_eva


# ---------------------------------------------------------------- 1. BatchNorm once per step
def _bn_state(net):
    return {n: b.clone() for n, b in net.named_buffers()}


def _one_step(post_norm: bool, mode: str):
    """One training step of a small side network; ``mode`` is 'off', 'sub' (the side blocks'
    own per-sub-block checkpointing) or 'block' (one checkpoint region around each side block)."""
    torch.manual_seed(0)
    t, n, d = 2, 4, 64
    net = SideNetwork(32, 2, side_width=d, side_layers=2, num_frames=t, patch_size=8, num_patches=n,
                      post_norm=post_norm, checkpointing=(mode == "sub"))
    if mode == "block":
        for blk in net.blocks:
            fwd = blk.forward
            blk.forward = lambda s, c, pos, fwd=fwd: checkpoint(fwd, s, c, pos, use_reentrant=False)
    net.train()
    torch.manual_seed(1)
    video = torch.randn(2, 3, t, 16, 16)
    feats = [torch.randn(2 * t, 1 + n, 32) for _ in range(2)]
    net(video, feats).pow(2).mean().backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    return net, grads


@pytest.mark.parametrize("post_norm", [False, True])
@pytest.mark.parametrize("mode", ["sub", "block"])
def test_batchnorm_statistics_updated_once_per_step_under_checkpointing(post_norm, mode):
    ref, ref_grads = _one_step(post_norm, "off")
    net, grads = _one_step(post_norm, mode)
    bns = [m for m in net.modules() if isinstance(m, (TokenBatchNorm, VideoBatchNorm))]
    assert len(bns) == 1 + 2 * 2  # stem + two per side block
    for m in bns:
        assert int(m.num_batches_tracked) == 1
    for k, v in _bn_state(ref).items():
        torch.testing.assert_close(_bn_state(net)[k], v, rtol=0, atol=1e-6, msg=k)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6, msg=k)


def test_batchnorm_recompute_under_reentrant_checkpoint_keeps_statistics():
    bn = TokenBatchNorm(8).train()
    x = torch.randn(5, 3, 8, requires_grad=True)
    y = checkpoint(bn, x, use_reentrant=True)
    y.sum().backward()
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, 0.1 * x.detach().reshape(-1, 8).mean(0))
