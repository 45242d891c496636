"""The three methods as modules, and drop-in adaptation of open_clip models (CPU, random init)."""
import copy

import open_clip
import pytest
import torch

import vpeft
from vpeft.methods.side4video import ladder_layers

from conftest import tiny_clip, tiny_eva

T = 4


def _video(b=2, t=T, size=32):
    return torch.randn(b, t, 3, size, size)


def _create(name, meta=False):
    """An open_clip model by config name; on the meta device (shapes only, no memory) if asked."""
    if meta:
        with torch.device("meta"):
            return open_clip.CLIP(**open_clip.get_model_config(name))
    return open_clip.create_model(name, pretrained=None)


@pytest.mark.parametrize("method,options,expected", [
    ("st_adapter", dict(preset="12x384"), 7_110_144),
    ("st_adapter", dict(preset="24x384"), 14_220_288),
    ("msta", dict(bottleneck=128, layers=(8, 12), text=True), 1_744_000),
])
def test_trainable_parameters_vit_b16(method, options, expected):
    vm = vpeft.adapt(_create("ViT-B-16", meta=True), method, num_frames=8, num_classes=400, **options)
    assert vm.num_trainable_parameters(include_head=False) == expected
    assert vm.num_trainable_parameters() > expected  # the head is trainable too


@pytest.mark.parametrize("name,width,layers,expected", [
    ("ViT-B-16", 320, 12, 21.06e6),
    ("ViT-L-14", 512, 24, 102.0e6),
])
def test_trainable_parameters_side4video(name, width, layers, expected):
    vm = vpeft.adapt(_create(name, meta=True), "side4video", num_frames=8, num_classes=174,
                     side_width=width, side_layers=layers)
    n = vm.num_trainable_parameters(include_head=False)
    assert abs(n - expected) / expected < 0.01, n


def test_ladder_layer_choice():
    assert ladder_layers(12, 12) == list(range(12))
    assert ladder_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert ladder_layers(64, 32) == list(range(1, 64, 2))
    with pytest.raises(ValueError, match="side_layers=5 must divide"):
        ladder_layers(12, 5)


def test_st_adapter_is_identity_at_init():
    model = tiny_clip().eval()
    frozen = copy.deepcopy(model)
    vm = vpeft.adapt(model, "st_adapter", num_frames=T, preset="24x384", bottleneck=16)
    frames = _video().flatten(0, 1)
    with torch.no_grad():
        # the user's own forward goes through the adapted blocks (drop-in)
        torch.testing.assert_close(vm.backbone.encode_image(frames), frozen.encode_image(frames), rtol=0, atol=0)


def test_st_adapter_identity_at_init_on_eva_post_norm():
    model = tiny_eva().eval()
    frozen = copy.deepcopy(model)
    vm = vpeft.adapt(model, "st_adapter", num_frames=2, bottleneck=16)
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(vm.backbone(x), frozen(x), rtol=0, atol=0)


@pytest.mark.parametrize("factory", [tiny_clip, tiny_eva])
def test_pooled_pipeline_equals_model_encoder(factory):
    model = factory().eval()
    frames = torch.randn(3, 3, *([32, 32] if factory is tiny_clip else [28, 28]))
    with torch.no_grad():
        ref = model.encode_image(frames) if hasattr(model, "encode_image") else model(frames)
        vm = vpeft.adapt(model, "linear_probe", num_frames=1)
        torch.testing.assert_close(vm.encode_video(frames[:, None]), ref)


def test_eva_post_norm_gets_post_norm_side_network():
    vm = vpeft.adapt(tiny_eva(depth=2), "side4video", num_frames=2, num_classes=3, side_width=64, side_layers=1)
    assert vm.side.ladder.norm == "post" and vm.side.blocks[0].post_norm
    assert vm.side.layer_ids == [1]
    vm.train()
    vm(torch.randn(2, 2, 3, 28, 28)).sum().backward()
    assert vm.side.ladder.weight.grad is not None


METHOD_OPTIONS = {
    "linear_probe": {},
    "full_finetune": {},
    "st_adapter": dict(preset="24x384", bottleneck=16),
    "msta": dict(bottleneck=16, layers=(3, 4)),
    "side4video": dict(side_width=64, side_layers=2),
}


def _trained_prefixes(method):
    return {"linear_probe": ("head.",), "full_finetune": ("backbone.", "head."),
            "st_adapter": ("head.",), "msta": ("msta.", "head."), "side4video": ("side.", "head.")}[method]


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_one_step_changes_only_trained_parameters(method):
    vm = vpeft.adapt(tiny_clip(), method, num_frames=T, num_classes=5, **METHOD_OPTIONS[method])
    before = {k: v.clone() for k, v in vm.named_parameters()}
    opt = torch.optim.SGD([p for p in vm.parameters() if p.requires_grad], lr=0.1)
    vm.train()
    loss = torch.nn.functional.cross_entropy(vm(_video()), torch.tensor([1, 3]))
    loss.backward()
    opt.step()
    changed = {k for k, v in vm.named_parameters() if not torch.equal(v, before[k])}
    assert changed
    for k in changed:
        is_adapter = ".adapter_" in k
        assert k.startswith(_trained_prefixes(method)) or is_adapter, k
    if method == "st_adapter":
        assert any(".adapter_mlp." in k for k in changed)
    frozen = [k for k, p in vm.named_parameters() if not p.requires_grad]
    if method != "full_finetune":
        assert frozen and not (set(frozen) & changed)
        assert all(not m.training for n, m in vm.backbone.named_modules() if "adapter" not in n)


def test_side4video_keeps_no_backbone_activation_for_backward():
    model = tiny_clip(width=64)                       # backbone D = 64, MLP hidden 256
    vm = vpeft.adapt(model, "side4video", num_frames=T, num_classes=5, side_width=192, side_layers=2)
    vm.train()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    video = _video()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = vm(video)
    with torch.no_grad():
        _, kept = vm._tokens(video.flatten(0, 1), keep=tuple(vm.side.layer_ids))
    # nothing from inside the backbone's blocks (MLP hidden, attention) is saved; the only saved
    # tensors of the backbone's width are the ladder inputs, i.e. the chosen layers' outputs
    assert saved and all(t.shape[-1] != 256 for t in saved)
    backbone_width = [t for t in saved if t.shape[-1] == 64 and not t.requires_grad]
    assert backbone_width
    for t in backbone_width:
        assert any(t.shape == k.shape and torch.equal(t, k) for k in kept)
    out.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in vm.backbone.parameters())


def _set_temporal_weights_nonzero(vm):
    with torch.no_grad():
        for n, p in vm.named_parameters():
            if "temporal" in n or "tconv" in n or ".dw." in n:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("method", ["st_adapter", "msta", "side4video", "linear_probe"])
def test_reversing_frames(method):
    vm = vpeft.adapt(tiny_clip(), method, num_frames=T, num_classes=5, **METHOD_OPTIONS[method]).eval()
    _set_temporal_weights_nonzero(vm)
    with torch.no_grad():
        vm.head.fc.weight.normal_(0, 0.5)  # the classifier starts small (N(0, 0.02)); make its input visible
    if method == "st_adapter":
        with torch.no_grad():
            for n, p in vm.named_parameters():
                if n.endswith("up.weight"):
                    p.normal_(0, 0.5)
    video = _video()
    with torch.no_grad():
        a, b = vm(video), vm(video.flip(1))
    if method == "linear_probe":
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        assert (a - b).abs().max() > 1e-4


def test_adapter_state_dict_round_trip():
    vm = vpeft.adapt(tiny_clip(), "msta", num_frames=T, num_classes=5, **METHOD_OPTIONS["msta"]).eval()
    sd = vm.adapter_state_dict()
    assert sd and all(k.startswith(("msta.", "head.")) for k in sd)
    other = vpeft.adapt(tiny_clip(), "msta", num_frames=T, num_classes=5, **METHOD_OPTIONS["msta"]).eval()
    other.backbone.load_state_dict({k[len("backbone."):]: v for k, v in vm.state_dict().items()
                                    if k.startswith("backbone.")})
    video = _video()
    with torch.no_grad():
        assert not torch.allclose(vm(video), other(video))
        other.load_adapter_state_dict(sd)
        torch.testing.assert_close(vm(video), other(video))
    with pytest.raises(ValueError, match="missing"):
        other.load_adapter_state_dict({k: v for k, v in list(sd.items())[1:]})


def test_side4video_state_dict_has_batchnorm_buffers():
    vm = vpeft.adapt(tiny_clip(), "side4video", num_frames=T, num_classes=5, **METHOD_OPTIONS["side4video"])
    sd = vm.adapter_state_dict()
    assert any(k.endswith("running_mean") for k in sd)
    assert not any(k.startswith("backbone.") for k in sd)


def test_msta_text_adapters_change_text_embedding():
    model = tiny_clip()
    text = torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        plain = model.encode_text(text)
    vm = vpeft.adapt(model, "msta", num_frames=T, **METHOD_OPTIONS["msta"], scale=1.0).eval()
    with torch.no_grad():
        assert not torch.allclose(vm.encode_text(text), plain)
    assert vm.encode_video(_video()).shape == (2, 32)


def test_print_trainable_parameters(capsys):
    vm = vpeft.adapt(tiny_clip(), "st_adapter", num_frames=T, bottleneck=16)
    vm.print_trainable_parameters()
    assert f"{vm.num_trainable_parameters():,} trainable" in capsys.readouterr().out


def test_bad_inputs_give_clear_errors():
    vm = vpeft.adapt(tiny_clip(), "st_adapter", num_frames=T, num_classes=5, bottleneck=16)
    with pytest.raises(ValueError, match=r"T=3 frames, expected num_frames=4"):
        vm(_video(t=3))
    with pytest.raises(ValueError, match="1 channels, expected 3"):
        vm(torch.randn(2, T, 1, 32, 32))
    with pytest.raises(ValueError, match="16x16, expected 32x32"):
        vm(torch.randn(2, T, 3, 16, 16))
    with pytest.raises(ValueError, match="5-D tensor"):
        vm(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown method 'lora'"):
        vpeft.adapt(tiny_clip(), "lora", num_frames=T)
    with pytest.raises(ValueError, match=r"st_adapter option preset='6x128' \(str\); expected one of '12x384', '24x384'"):
        vpeft.adapt(tiny_clip(), "st_adapter", num_frames=T, preset="6x128")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bottlenek'\]"):
        vpeft.adapt(tiny_clip(), "st_adapter", num_frames=T, bottlenek=16)
    with pytest.raises(ValueError, match="r=24 must divide the vision width D=64"):
        vpeft.adapt(tiny_clip(), "msta", num_frames=T, bottleneck=24)
    with pytest.raises(ValueError, match=r"layers=\(3, 7\) is outside the model"):
        vpeft.adapt(tiny_clip(), "msta", num_frames=T, bottleneck=16, layers=(3, 7))
    with pytest.raises(ValueError, match=r"layers=\(0, 2\) is outside the model"):
        vpeft.adapt(tiny_clip(), "msta", num_frames=T, bottleneck=16, layers=(0, 2))
    with pytest.raises(ValueError, match="side_width=100 must be a multiple of 64"):
        vpeft.adapt(tiny_clip(), "side4video", num_frames=T, side_width=100)
    with pytest.raises(ValueError, match="already been adapted"):
        vpeft.adapt(vm.backbone, "st_adapter", num_frames=T)
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        vpeft.adapt(tiny_clip(), "st_adapter", num_frames=0)
