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


# ---------------------------------------------------------------- 2. EVA head, 8. head dropout / classifier init
def test_eva_post_norm_head_is_mean_only_and_clip_head_has_batchnorm():
    eva = vpeft.adapt(tiny_eva(depth=2), "side4video", num_frames=2, num_classes=3, side_width=64, side_layers=1)
    assert eva.head.norm is None and not any(k.startswith("head.norm") for k in eva.state_dict())
    s = torch.randn(4, 5, 64)
    torch.testing.assert_close(eva.head.features(s), s.reshape(2, 10, 64).mean(1))
    clip = vpeft.adapt(tiny_clip(), "side4video", num_frames=2, num_classes=3, side_width=64, side_layers=2)
    assert isinstance(clip.head.norm, TokenBatchNorm)


def test_side4video_head_dropout_defaults_to_zero():
    vm = vpeft.adapt(tiny_clip(), "side4video", num_frames=2, num_classes=3, side_width=64, side_layers=2)
    assert vm.head.drop.p == 0.0
    vm = vpeft.adapt(tiny_clip(), "side4video", num_frames=2, num_classes=3, side_width=64, side_layers=2,
                     dropout=0.3)
    assert vm.head.drop.p == 0.3


def test_st_adapter_classifier_init_normal_002_zero_bias():
    vm = vpeft.adapt(tiny_clip(width=768, layers=1), "st_adapter", num_frames=2, num_classes=400, bottleneck=8)
    w = vm.head.fc.weight.detach()
    assert abs(w.std().item() - 0.02) < 0.02 * 0.02 and abs(w.mean().item()) < 1e-3
    assert torch.count_nonzero(vm.head.fc.bias) == 0


# ---------------------------------------------------------------- 3. CLIP recognition side-block init
def _close_std(t, std, rel=0.02):
    t = t.detach().double()
    assert abs(t.mean().item()) < 4 * std / math.sqrt(t.numel())
    assert abs(t.std().item() / std - 1) < rel, (t.std().item(), std)


def test_clip_side_block_init_follows_released_recognition_code():
    from vpeft.methods.side4video import SideBlock

    d = 512
    blk = SideBlock(d, num_frames=8)
    proj = d ** -0.5 * 24 ** -0.5
    _close_std(blk.qkv.weight, d ** -0.5)
    _close_std(blk.out.weight, proj)
    _close_std(blk.fc1.weight, (2 * d) ** -0.5)
    _close_std(blk.fc2.weight, proj)
    assert torch.count_nonzero(blk.qkv.bias) == 0 and torch.count_nonzero(blk.out.bias) == 0
    # kept at nn.Linear's default (uniform within 1/sqrt(fan_in)), as in the released code
    for lin in (blk.fc1, blk.fc2, blk.pw1, blk.pw2):
        bound = lin.in_features ** -0.5
        assert lin.bias.abs().max() <= bound and lin.bias.abs().max() > 0.9 * bound
    # the depth factor is the released constant: a 24-block network's blocks start the same way
    net = SideNetwork(64, 24, side_width=d, side_layers=24, num_frames=2, patch_size=8, num_patches=4)
    _close_std(torch.cat([b.out.weight.flatten() for b in net.blocks]), proj, rel=0.01)


def test_eva_side_block_keeps_pytorch_default_init():
    from vpeft.methods.side4video import SideBlock

    d = 512
    blk = SideBlock(d, num_frames=8, post_norm=True)
    bound = d ** -0.5  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std bound/sqrt(3)
    _close_std(blk.qkv.weight, bound / math.sqrt(3))
    assert blk.qkv.bias.abs().max() > 0


# ---------------------------------------------------------------- 10. MSTA defaults
def _msta_blocks(vm):
    from vpeft.methods.msta import MSTABlock

    vis = [i for i, b in enumerate(vm.tower.blocks) if isinstance(b, MSTABlock)]
    txt = [] if vm.text_tower is None else [i for i, b in enumerate(vm.text_tower.blocks) if isinstance(b, MSTABlock)]
    return vis, txt


def test_msta_default_adapts_last_five_blocks_of_each_tower_vit_l14():
    import open_clip

    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config("ViT-L-14"))
    vm = vpeft.adapt(model, "msta", num_frames=8)
    vis, txt = _msta_blocks(vm)
    assert vis == [19, 20, 21, 22, 23] and txt == [7, 8, 9, 10, 11]
    for k, m in enumerate(vm.msta):  # the k-th vision and text adapted blocks share one module
        assert vm.tower.blocks[vis[k]].msta is m and vm.text_tower.blocks[txt[k]].msta is m


def test_msta_layers_explicit_and_per_tower():
    from vpeft.methods.msta import msta_layers

    assert msta_layers(None, 12, 12) == (range(7, 12), range(7, 12))
    assert msta_layers((8, 12), 24, 12) == (range(7, 12), range(7, 12))
    assert msta_layers(((20, 24), (8, 12)), 24, 12) == (range(19, 24), range(7, 12))
    assert msta_layers(None, 3, None) == (range(0, 3), None)
    with pytest.raises(ValueError, match="same length"):
        msta_layers(((18, 24), (8, 12)), 24, 12)
    with pytest.raises(ValueError, match=r"outside the model's text tower"):
        msta_layers((20, 24), 24, 12)


def test_msta_classifier_adds_no_text_adapters():
    vm = vpeft.adapt(tiny_clip(), "msta", num_frames=2, num_classes=5, bottleneck=16)
    assert _msta_blocks(vm) == ([0, 1, 2, 3], [])
    assert all(m.text_down is None for m in vm.msta)
    vm.train()
    vm(torch.randn(2, 2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in vm.msta.parameters())  # nothing trainable is left unused
    with_text = vpeft.adapt(tiny_clip(), "msta", num_frames=2, num_classes=5, bottleneck=16, text=True)
    assert _msta_blocks(with_text)[1] == [0, 1, 2, 3]


# ---------------------------------------------------------------- 4-7, 9. retrieval model
def _released_retrieval_count(D=768, d=320, E=512, levels=12, patch=16, n=196):
    """Trainable parameters of the released ViT-B/16 retrieval run without the text tower,
    counted from Retrieval/modules/module_clip.py and modeling.py module by module."""
    block = (2 * d                      # norm1 (BN3d)
             + 2 * (d * d + d)          # pw_conv1, pw_conv2 (1x1x1 Conv3d with bias)
             + 3 * d + d                # dw_conv1 (3x1x1, groups=d)
             + 2 * d                    # norm2
             + (d * 4 * d + 4 * d) + (4 * d * d + d)   # mlp fc1, fc2
             + (3 * d * d + 3 * d) + (d * d + d)       # MultiheadAttention in_proj, out_proj
             + 2 * d)                   # ln_1
    ladder = (D * d + d) + 2 * D        # side_linears, side_lns
    side = levels * (block + ladder) + (3 * 3 * patch * patch * d + d) + 2 * d + (n + 1) * d
    head = 2 * d + d * D                # side_post_bn, side_proj (no bias)
    wti = 2 * ((E * E + E) + (E + 1))   # text_weight_fc, video_weight_fc
    top = 2 * D + D * E + 1             # visual.ln_post, visual.proj, logit_scale
    return side + head + wti + top


def _b16_retrieval(**kw):
    import open_clip
    from vpeft.tasks.retrieval import RetrievalModel

    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config("ViT-B-16"))
    vm = vpeft.adapt(model, "side4video", num_frames=12, side_width=320, side_layers=12)
    before = sum(p.numel() for p in vm.side.parameters())
    return before, RetrievalModel(vm, **kw)


def test_retrieval_parameter_count_matches_released():
    side_before, rm = _b16_retrieval()
    assert side_before == 21_056_192                              # recognition side network, (N, d) pos
    assert sum(p.numel() for p in rm.video_model.side.parameters()) == side_before + 320  # + [CLS] pos row
    assert sum(p.numel() for p in rm.head.parameters()) == 640 + 320 * 768                # bias-free side_proj
    n = sum(p.numel() for p in rm.trainable_parameters())
    assert n == _released_retrieval_count() == 22_224_003
    assert all(p.requires_grad for p in rm.trainable_parameters())
    _, with_text = _b16_retrieval(train_text=True)
    assert sum(p.numel() for p in with_text.trainable_parameters()) == 85_652_099


def test_retrieval_init_follows_released_code():
    from vpeft.tasks.retrieval import TokenWiseMatching, released_retrieval_init_

    d, n = 512, 16
    net = SideNetwork(768, 2, side_width=d, side_layers=2, num_frames=2, patch_size=8, num_patches=n)
    released_retrieval_init_(net)
    cat = lambda name: torch.cat([getattr(b, name).weight.flatten() for b in net.blocks])  # noqa: E731
    for name in ("out", "fc1", "fc2", "pw1", "pw2"):
        _close_std(cat(name), 0.02)
    for name in ("out", "fc1", "fc2"):
        assert all(torch.count_nonzero(getattr(b, name).bias) == 0 for b in net.blocks)
    _close_std(cat("qkv"), d ** -0.5)
    _close_std(torch.cat([b.dw.weight.flatten() for b in net.blocks]), d ** -0.5, rel=0.05)
    _close_std(net.ladder.weight, 0.02)
    assert torch.count_nonzero(net.ladder.bias) == 0
    assert net.pos.shape == (n + 1, d)
    _close_std(net.pos, 0.01, rel=0.05)
    m = TokenWiseMatching(512)
    for lin in (m.text_weight[0], m.text_weight[2], m.video_weight[0], m.video_weight[2]):
        assert torch.count_nonzero(lin.bias) == 0
    _close_std(torch.cat([m.text_weight[0].weight.flatten(), m.video_weight[0].weight.flatten()]), 0.02)


def test_retrieval_position_embedding_row_zero_is_added_to_shifted_cls():
    from vpeft_kernels import reference

    t, n, d, heads = 3, 4, 64, 1
    s, c = torch.randn(2 * t, n, d), torch.randn(2 * t, d)
    pos = torch.randn(n + 1, d)
    w = [torch.ones(d), torch.zeros(d), torch.randn(3 * d, d) * 0.1, torch.randn(3 * d), torch.randn(d, d) * 0.1,
         torch.randn(d)]
    out = vpeft_kernels_tsa(s, c, pos, w, t, heads)
    # by hand: [CLS] row = shift(c) + pos[0], patch rows = s + pos[1:]
    x = torch.cat([reference.token_shift(c, t)[:, None] + pos[0], s + pos[1:]], dim=1)
    x = torch.nn.functional.layer_norm(x, (d,), w[0], w[1])
    q = x[:, 1:] @ w[2][:d].t() + w[3][:d]
    k = x @ w[2][d:2 * d].t() + w[3][d:2 * d]
    v = x @ w[2][2 * d:].t() + w[3][2 * d:]
    ref = (torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, -1) @ v) @ w[4].t() + w[5]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # a zero [CLS] row is the patch-only embedding
    zero = torch.cat([torch.zeros(1, d), pos[1:]])
    torch.testing.assert_close(vpeft_kernels_tsa(s, c, zero, w, t, heads), vpeft_kernels_tsa(s, c, pos[1:], w, t, heads))


def vpeft_kernels_tsa(s, c, pos, w, t, heads):
    import vpeft_kernels

    return vpeft_kernels.token_shift_attention(s, c, pos, *w, num_frames=t, num_heads=heads)


def test_retrieval_side_network_uses_cls_position_and_logit_scale_trains():
    import open_clip
    from vpeft.tasks.retrieval import RetrievalModel

    clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32, head_width=32),
                          text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=1))
    rm = RetrievalModel(vpeft.adapt(clip, "side4video", num_frames=2, side_width=64, side_layers=2))
    assert rm.video_model.side.pos.shape == (17, 64)
    assert rm.head.proj.bias is None and torch.count_nonzero(rm.head.proj.weight) == 0
    with torch.no_grad():
        rm.head.proj.weight.normal_()                            # (zero at start: no gradient reaches the side)
    rm.train()
    rm(rm.tokenize(["a b", "c"]), torch.randn(2, 2, 3, 32, 32)).backward()
    assert rm.video_model.side.pos.grad[0].abs().sum() > 0      # the [CLS] row is used
    assert clip.logit_scale.grad is not None and clip.visual.ln_post.weight.grad is not None


def test_token_wise_matching_masks_padded_words_with_minus_inf():
    from vpeft.tasks.retrieval import TokenWiseMatching

    m = TokenWiseMatching(4)
    frames = torch.tensor([[[1.0, 0, 0, 0]]])                   # one video, one frame
    words = torch.tensor([[[-1.0, 0, 0, 0], [0, 1.0, 0, 0]]])   # a real word (cos -1) and a pad (cos 0)
    mask = torch.tensor([[True, False]])
    # t2v: the real word's max over frames is -1; v2t: max over real words only is -1 (the pad's 0 is masked)
    assert m(words, mask, frames).item() == pytest.approx(-1.0)


# ---------------------------------------------------------------- presets against the released configs
S4V = "HJYao00/Side4Video Recognition/configs/sthv2/"
RELEASED = {
    # preset: {dotted key: released value}; the source of each value is named in the preset file.
    "st_adapter_k400_b16": {
        "model.options.preset": "12x384", "model.num_frames": 8, "model.dropout": 0.5,
        "data.sampling": "dense", "data.stride": 16, "data.flip": 0.5, "data.test_clips": 3, "data.test_crops": 1,
        "train.epochs": 12, "train.batch_size": 192, "train.lr": 7.5e-4, "train.betas": [0.9, 0.999],
        "train.weight_decay": 0.01, "train.warmup_epochs": 2, "train.min_lr": 0.0, "train.label_smoothing": 0.0},
    "st_adapter_ssv2_b16": {
        "model.options.preset": "24x384", "model.num_frames": 8, "model.dropout": 0.5,
        "data.sampling": "segment", "data.crop_scale": [0.08, 1.0], "data.flip": 0.0,
        "data.test_clips": 1, "data.test_crops": 3,
        "train.epochs": 50, "train.batch_size": 256, "train.lr": 1e-3, "train.betas": [0.9, 0.999],
        "train.weight_decay": 0.01, "train.warmup_epochs": 2, "train.min_lr": 0.0, "train.label_smoothing": 0.0},
    "side4video_ssv2_b16": {
        "model.options.side_width": 320, "model.options.side_layers": 12, "model.num_frames": 8,
        "model.dropout": 0.0, "data.sampling": "segment", "data.crop_scale": [0.08, 1.0], "data.flip": 0.5,
        "data.flip_label_map": {86: 87, 87: 86, 93: 94, 94: 93, 166: 167, 167: 166},
        "train.epochs": 30, "train.batch_size": 128, "train.lr": 1e-3, "train.betas": [0.9, 0.999],
        "train.weight_decay": 0.15, "train.warmup_epochs": 4, "train.min_lr": 0.0, "train.label_smoothing": 0.1},
    "side4video_ssv2_l14": {
        "model.backbone": "ViT-L-14", "model.options.side_width": 512, "model.options.side_layers": 24,
        "model.num_frames": 8, "model.dropout": 0.0, "data.crop_scale": [0.08, 1.0],
        "train.epochs": 30, "train.batch_size": 128, "train.lr": 1e-4, "train.betas": [0.9, 0.999],
        "train.weight_decay": 0.15, "train.warmup_epochs": 4, "train.min_lr": 0.0, "train.label_smoothing": 0.1},
    "side4video_ssv2_e14": {
        "model.backbone": "EVA02-E-14", "model.options.side_width": 576, "model.options.side_layers": 32,
        "model.options.norm": "post", "model.options.pos_std": 0.02, "model.num_frames": 8, "model.dropout": 0.0,
        "train.epochs": 25, "train.batch_size": 64, "train.lr": 1e-4, "train.betas": [0.9, 0.999],
        "train.weight_decay": 0.15, "train.warmup_epochs": 6, "train.min_lr": 0.0, "train.label_smoothing": 0.1,
        "train.activation_checkpointing": True},
    "side4video_retrieval_b16": {
        "model.options.side_width": 320, "model.options.side_layers": 12, "model.num_frames": 12,
        "data.sampling": "segment", "data.flip": 0.0, "data.test_clips": 1,
        "train.epochs": 5, "train.batch_size": 128, "train.lr": 1e-4, "train.betas": [0.9, 0.98],
        "train.weight_decay": 0.2, "train.warmup_epochs": 0.5, "train.clip_grad": 1.0,
        "task.train_text": True, "task.text_lr": 1e-7},
    "msta_k400_b16": {  # METHODS.md section 2, the released video-language recipe
        "model.options.bottleneck": 128, "model.options.layers": [8, 12], "model.options.scale": 0.005,
        "model.options.adapter_dropout": 0.1, "train.batch_size": 32, "train.lr": 1e-3,
        "train.betas": [0.9, 0.98], "train.weight_decay": 0.001, "train.warmup_epochs": 5, "train.min_lr": 1e-5},
}
UNCOMMENTED_OK = {"base", "backbone", "method", "num_classes", "log_every", "name", "test_crops"}


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_preset_reproduces_released_config(preset):
    from vpeft.engine.config import load_config

    cfg = load_config(preset)
    for key, want in RELEASED[preset].items():
        got = _get(cfg, key)
        if isinstance(want, float):
            assert float(got) == pytest.approx(want), key
        else:
            assert got == want, key


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_preset_states_the_source_of_every_key(preset):
    from importlib import resources

    text = resources.files("vpeft.configs").joinpath(preset + ".yaml").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for ln in lines:
        key, _, value = ln.strip().partition(":")
        if not value.strip() or key in UNCOMMENTED_OK:
            continue  # a section header, or a key that is not part of the recipe
        assert "#" in ln, f"{preset}: {ln.strip()!r} does not say which released value it reproduces"


def test_every_recognition_and_retrieval_preset_is_in_the_table():
    from vpeft.engine.config import load_config, preset_names

    for name in preset_names():
        cfg = load_config(name)
        if cfg["device"] == "cpu" or name == "demo":
            continue  # CPU presets on synthetic data reproduce nothing
        if cfg["task"]["name"] in ("recognition", "retrieval"):
            assert name in RELEASED, name


# ---------------------------------------------------------------- trainable counts are unchanged
@pytest.mark.parametrize("name,width,layers,expected", [
    ("ViT-B-16", 320, 12, 21_056_192),
    ("ViT-L-14", 512, 24, 102_018_560),
])
def test_side4video_trainable_parameters_exact(name, width, layers, expected):
    import open_clip

    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config(name))
    vm = vpeft.adapt(model, "side4video", num_frames=8, num_classes=174, side_width=width, side_layers=layers)
    assert vm.num_trainable_parameters(include_head=False) == expected


def test_side4video_e14_light_trainable_parameters_exact():
    from vpeft.backbones.build import create_vision_tower

    vis = create_vision_tower("EVA02-E-14", device="meta", dtype=torch.bfloat16)
    vm = vpeft.adapt(vis, "side4video", num_frames=8, num_classes=174, side_width=576, side_layers=32)
    assert vm.head.norm is None  # the EVA head is the mean only
    assert vm.num_trainable_parameters(include_head=False) == 183_273_408
