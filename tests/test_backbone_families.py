"""Every accepted vision tower family on a small random-init model: the pooling rule, one
training step per method with only the trained parameters changing, and clear refusals."""
import pytest
import torch

import vpeft
from vpeft.backbones import UnsupportedBackbone, vision_tower
from vpeft.backbones.build import create_backbone

# family under test -> registered tiny backbone (see vpeft.backbones.build)
FAMILY_MODELS = {
    "native ViT": "vpeft-tiny",
    "CLIPA": "tiny-clipa",
    "CoCa": "tiny-coca",
    "EVA02": "tiny-eva02",
    "SigLIP": "tiny-siglip",          # SigLIP and SigLIP2 share the vision architecture (no [CLS], map head)
    "PE-Core": "tiny-pe-core",
    "PE-Core no-CLS (bigG)": "tiny-pe-core-nocls",
    "MobileCLIP-B": "tiny-mobileclip-b",
    "ViTamin": "tiny-vitamin",
    "timm ViT": "tiny-timm-vit",
    "DINOv2-reg": "tiny-dinov2-reg",
    "DeiT": "tiny-deit",
    "bare Eva": "tiny-eva-bare",
}
T = 3


def image_embedding(model, x):
    """The model's own image embedding (before any L2 normalisation)."""
    if hasattr(model, "encode_image"):
        return model.encode_image(x, normalize=False)
    if hasattr(model, "trunk"):                 # an open_clip TimmModel tower on its own
        return model(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)   # a bare timm model


def _small_options(method, tower):
    if method == "msta":
        return dict(bottleneck=32, layers=(1, 2))
    if method == "st_adapter":
        return dict(bottleneck=16)
    if method == "side4video":
        return dict(side_width=64, side_layers=tower.depth)
    return {}


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
@pytest.mark.parametrize("method", ["linear_probe", "st_adapter"])
def test_identical_frames_give_the_image_embedding(family, method):
    """On a clip of T identical frames, linear_probe's and a fresh (identity-init)
    st_adapter's encode_video equal the model's own encode_image of that frame."""
    model = create_backbone(FAMILY_MODELS[family])
    size = vision_tower(model).image_size
    frame = torch.randn(2, 3, *size)
    with torch.no_grad():
        want = image_embedding(model, frame)
        vm = vpeft.adapt(model, method, num_frames=T, **_small_options(method, vision_tower(model)))
        got = vm.encode_video(frame.unsqueeze(1).expand(2, T, *frame.shape[1:]).contiguous())
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
@pytest.mark.parametrize("method", list(vpeft.METHODS))
def test_one_training_step_changes_only_trained_parameters(family, method):
    model = create_backbone(FAMILY_MODELS[family])
    tower = vision_tower(model)
    try:
        vm = vpeft.adapt(model, method, num_frames=2, num_classes=3, dropout=0.0, **_small_options(method, tower))
    except UnsupportedBackbone as e:  # an honest refusal is allowed, nothing else
        pytest.skip(f"refused: {e}")
    trained = {n for n, p in vm.named_parameters() if p.requires_grad}
    assert trained
    before = {n: p.detach().clone() for n, p in vm.named_parameters()}
    opt = torch.optim.SGD([p for p in vm.parameters() if p.requires_grad], lr=0.5)
    vm.train()
    video = torch.randn(2, 2, 3, *tower.image_size)
    loss = torch.nn.functional.cross_entropy(vm(video), torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    changed = _changed(before, vm)
    assert changed <= trained, sorted(changed - trained)[:5]
    assert changed, "nothing was trained"
    if method == "full_finetune":
        assert all(n.startswith(("backbone.visual.", "head.")) or not hasattr(model, "visual")
                   for n in trained), "full_finetune trains only the vision tower and the head"
        assert not any(n.endswith(("visual.proj", "logit_scale")) for n in trained)
    else:
        assert not any(n.startswith("backbone.") and "adapter" not in n for n in changed)


def test_prefix_tokens_never_take_the_temporal_path():
    """[CLS] and register tokens stay per-frame: changing another frame leaves them unchanged
    after an ST-Adapter with non-zero temporal taps (DINOv2 with 4 registers)."""
    from vpeft.methods.st_adapter import STAdapter

    a = STAdapter(16, 4, num_frames=3, num_prefix_tokens=5)
    torch.nn.init.normal_(a.temporal_weight)
    x = torch.randn(3, 5 + 4, 16)
    y = x.clone()
    y[1] += 1.0                              # frame 1 changes
    ax, ay = a(x), a(y)
    torch.testing.assert_close(ax[:, :5], x[:, :5])           # prefix tokens pass unchanged
    assert not torch.allclose(ax[0, 5:], ay[0, 5:])          # frame 0's patches see frame 1


def test_full_finetune_trains_vision_only_unless_text():
    model = create_backbone("vpeft-tiny")
    vm = vpeft.adapt(model, "full_finetune", num_frames=2, num_classes=3)
    names = {n for n, p in vm.named_parameters() if p.requires_grad}
    assert "backbone.visual.conv1.weight" in names and "head.fc.weight" in names
    assert not any(n.startswith("backbone.transformer.") for n in names)
    assert "backbone.logit_scale" not in names and "backbone.visual.proj" not in names
    vm2 = vpeft.adapt(create_backbone("vpeft-tiny"), "full_finetune", num_frames=2, text=True)
    names2 = {n for n, p in vm2.named_parameters() if p.requires_grad}
    assert "backbone.visual.proj" in names2 and "backbone.logit_scale" in names2
    assert any(n.startswith("backbone.transformer.") for n in names2)


def test_side4video_summary_token_for_towers_without_cls():
    """No [CLS] (SigLIP): the ladder's shifted token is the model's pooled feature of that level."""
    model = create_backbone("tiny-siglip")
    tower = vision_tower(model)
    x = torch.randn(2, tower.num_patches, tower.width)
    view = tower.side_view(x)
    assert view.shape == (2, 1 + tower.num_patches, tower.width)
    torch.testing.assert_close(view[:, 0], tower.pool_tokens(x))
    torch.testing.assert_close(view[:, 1:], x)
    # registers are dropped, the [CLS] kept (DINOv2 reg4)
    reg = vision_tower(create_backbone("tiny-dinov2-reg"))
    z = torch.randn(2, 5 + reg.num_patches, reg.width)
    torch.testing.assert_close(reg.side_view(z), torch.cat([z[:, :1], z[:, 5:]], 1))


@pytest.mark.parametrize("build, cls_name", [
    (lambda: __import__("open_clip").model.ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2,
                                                          image_size=32, width=8), "ModifiedResNet"),
    (lambda: __import__("timm").create_model("convnext_atto"), "ConvNeXt"),
    (lambda: __import__("timm").create_model("vit_relpos_small_patch16_224", depth=1), "VisionTransformerRelPos"),
    (lambda: torch.nn.Linear(3, 3), "Linear"),
])
def test_unsupported_towers_are_refused_with_one_clear_message(build, cls_name):
    with pytest.raises(UnsupportedBackbone) as e:
        vpeft.adapt(build(), "linear_probe", num_frames=2)
    msg = str(e.value)
    assert cls_name in msg and "Supported vision tower families" in msg
    for family in ("openclip_vit", "timm_vit", "timm_eva", "viclip"):
        assert family in msg


def test_bare_timm_vit_has_no_text_for_msta():
    model = create_backbone("tiny-timm-vit")
    vm = vpeft.adapt(model, "msta", num_frames=2, bottleneck=32)
    assert vm.text_tower is None
    with pytest.raises(ValueError, match="no text tower"):
        vpeft.adapt(create_backbone("tiny-timm-vit"), "msta", num_frames=2, bottleneck=32, text=True)


def test_coca_text_decoder_is_initialised():
    """open_clip leaves CoCa's text_decoder.text_projection as torch.empty: a random build must
    initialise it (garbage up to 1e36 made 'frozen parameter changed' checks fail at random)."""
    for _ in range(3):
        p = create_backbone("tiny-coca").text_decoder.text_projection
        assert torch.isfinite(p).all() and 0 < p.abs().max() < 10
