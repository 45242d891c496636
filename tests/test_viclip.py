"""ViCLIP backbone: (n t) token layout, official checkpoint key mapping, adapters on it."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vpeft
import vpeft_kernels
from vpeft.backbones.viclip import (VICLIP_CONFIGS, ViCLIPConfig, create_viclip, from_official_state_dict, load_viclip_checkpoint,
                                    to_official_state_dict)

T = 4
SMALL = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=2, num_frames=T,
             text_width=32, text_layers=3, text_heads=2, embed_dim=24)


def tiny_viclip(**kw):
    return create_viclip(None, **{**SMALL, **kw}).eval()


def _video(b=2):
    return torch.randn(b, T, 3, 32, 32)


# ---------------------------------------------------------------- msta_adapter layout="nt"
def _conv3d_msta_nt(u, down, shared, up, tconv, t, scale):
    """Independent oracle: the modules of METHODS.md section 2 on the (n t) layout."""
    h = F.relu(shared(F.relu(down(u))))
    a = up(h)
    b, nt1, r = h.shape
    n = (nt1 - 1) // t
    hp = h[:, 1:].reshape(b, n, t, r).permute(0, 3, 2, 1).unsqueeze(-1)      # (B, r, T, N, 1)
    tc = tconv(hp).squeeze(-1).permute(0, 3, 2, 1).reshape(b, n * t, -1)    # (B, N*T, D)
    return scale * torch.cat([a[:, :1], a[:, 1:] + tc], dim=1)


def test_msta_adapter_nt_layout_matches_conv3d():
    d, r, b, n = 16, 4, 2, 5
    down, shared, up = nn.Linear(d, r), nn.Linear(r, r), nn.Linear(r, d)
    tconv = nn.Conv3d(r, d, (3, 1, 1), padding=(1, 0, 0), groups=r)
    u = torch.randn(b, 1 + n * T, d, requires_grad=True)
    w_t, b_t = tconv.weight[:, 0, :, 0, 0], tconv.bias
    out = vpeft_kernels.msta_adapter(u, down.weight, down.bias, shared.weight, shared.bias, up.weight, up.bias,
                                     w_t, b_t, scale=0.5, num_frames=T, layout="nt")
    ref = _conv3d_msta_nt(u, down, shared, up, tconv, T, 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # [CLS] gets the spatial up-projection only
    torch.testing.assert_close(out[:, 0], 0.5 * up(F.relu(shared(F.relu(down(u[:, 0]))))))
    # gradient scaling as in "bt": weights get gradients as if s = 1 (ref's divided by s),
    # the gradient into u is that of s * A(u) (scaled by s)
    g_out = torch.randn_like(out)
    gu, gw = torch.autograd.grad(out, (u, up.weight), g_out)
    ru, rw = torch.autograd.grad(ref, (u, up.weight), g_out)
    torch.testing.assert_close(gu, ru, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw / 0.5, rtol=1e-5, atol=1e-6)


def test_msta_adapter_layout_errors():
    d, r = 16, 4
    w = [torch.randn(r, d), torch.randn(r), torch.randn(r, r), torch.randn(r), torch.randn(d, r), torch.randn(d),
         torch.randn(d, 3), torch.randn(d)]
    with pytest.raises(ValueError, match="layout must be 'bt' or 'nt'"):
        vpeft_kernels.msta_adapter(torch.randn(2, 9, d), *w, scale=1.0, num_frames=T, layout="tn")
    with pytest.raises(ValueError, match="not a multiple of num_frames=4"):
        vpeft_kernels.msta_adapter(torch.randn(2, 1 + 7, d), *w, scale=1.0, num_frames=T, layout="nt")
    # "bt" checks rows, "nt" checks tokens: (2, 1+8, d) is a valid nt input but 2 rows is not B*T for T=4
    vpeft_kernels.msta_adapter(torch.randn(2, 1 + 8, d), *w, scale=1.0, num_frames=T, layout="nt")
    with pytest.raises(ValueError, match="multiple of num_frames"):
        vpeft_kernels.msta_adapter(torch.randn(2, 1 + 8, d), *w, scale=1.0, num_frames=T)


# ---------------------------------------------------------------- backbone structure
def test_patch_tokens_are_in_n_t_order():
    m = tiny_viclip()
    v = _video(1)
    base = m.visual.embed(v)
    v2 = v.clone()
    v2[:, 2, :, :8, :8] += 1.0            # frame 2, patch 0 only
    changed = (m.visual.embed(v2) - base).abs().amax(-1)[0] > 1e-6
    n = (32 // 8) ** 2
    expected = torch.zeros(1 + n * T, dtype=torch.bool)
    expected[1 + 0 * T + 2] = True
    assert torch.equal(changed, expected)
    assert base.shape == (1, 1 + n * T, 64)


def test_temporal_embedding_is_zero_init_and_on_patches_only():
    m = tiny_viclip()
    assert torch.count_nonzero(m.visual.temporal_positional_embedding) == 0
    v = _video(1)
    base = m.visual.embed(v)
    with torch.no_grad():
        m.visual.temporal_positional_embedding.normal_()
    moved = m.visual.embed(v)
    torch.testing.assert_close(moved[:, 0], base[:, 0], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 1:], base[:, 1:])


def test_joint_attention_mixes_frames_and_text_context_is_32():
    m = tiny_viclip()
    v = _video(1)
    v2 = v.clone()
    v2[:, -1] = 0
    assert not torch.allclose(m.encode_video(v), m.encode_video(v2))
    assert m.context_length == 32
    tok = m.tokenize(["a video of juggling", "x " * 100])
    assert tok.shape == (2, 32)
    assert m.encode_text(tok).shape == (2, 24)
    f_v, f_t, scale = m(v, tok)
    torch.testing.assert_close(f_v.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(scale, torch.tensor(100.0))


def test_named_configs():
    cfg_b, cfg_l = VICLIP_CONFIGS["ViCLIP-B-16"], VICLIP_CONFIGS["ViCLIP-L-14"]
    assert (cfg_b.vision_width, cfg_b.vision_layers, cfg_b.text_width, cfg_b.context_length) == (768, 12, 512, 32)
    assert (cfg_l.vision_width, cfg_l.vision_layers, cfg_l.text_width, cfg_l.text_layers) == (1024, 24, 768, 12)
    with pytest.raises(ValueError, match="unknown ViCLIP config"):
        create_viclip("ViCLIP-H")
    with pytest.raises(ValueError, match="unknown ViCLIP config field"):
        create_viclip(None, widht=3)


# ---------------------------------------------------------------- checkpoint key mapping
def _official_layout(cfg: ViCLIPConfig):
    """Key names and shapes of the official ViCLIP checkpoint (InternVideo viclip_vision.py /
    viclip_text.py / viclip.py), written out independently of vpeft's mapping."""
    d, dt, e, p = cfg.vision_width, cfg.text_width, cfg.embed_dim, cfg.patch_size
    n = (cfg.image_size // p) ** 2
    shapes = {
        "vision_encoder.conv1.weight": (d, 3, 1, p, p),
        "vision_encoder.class_embedding": (d,),
        "vision_encoder.positional_embedding": (n + 1, d),
        "vision_encoder.temporal_positional_embedding": (1, cfg.num_frames, d),
        "vision_encoder.ln_pre.weight": (d,), "vision_encoder.ln_pre.bias": (d,),
        "vision_encoder.ln_post.weight": (d,), "vision_encoder.ln_post.bias": (d,),
        "vision_encoder.proj": (d, e),
        "text_encoder.token_embedding.weight": (cfg.vocab_size, dt),
        "text_encoder.positional_embedding": (cfg.context_length, dt),
        "text_encoder.ln_final.weight": (dt,), "text_encoder.ln_final.bias": (dt,),
        "text_encoder.text_projection": (dt, e),
        "temp": (),
    }
    for prefix, w, layers in (("vision_encoder", d, cfg.vision_layers), ("text_encoder", dt, cfg.text_layers)):
        for i in range(layers):
            b = f"{prefix}.transformer.resblocks.{i}."
            shapes.update({
                b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
                b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,),
            })
    return shapes


def test_official_checkpoint_round_trip(tmp_path):
    cfg = ViCLIPConfig(**SMALL)
    g = torch.Generator().manual_seed(1)
    official = {k: torch.randn(s, generator=g) for k, s in _official_layout(cfg).items()}
    official["temp"] = torch.tensor(0.02)
    path = tmp_path / "ViClip-tiny.pth"
    torch.save({"model": official, "epoch": 3}, path)

    model = load_viclip_checkpoint(tiny_viclip(), str(path))
    sd = model.state_dict()
    assert len(sd) == len(official)
    # spot checks of the mapping, then the exact inverse
    torch.testing.assert_close(sd["visual.conv1.weight"], official["vision_encoder.conv1.weight"][:, :, 0])
    torch.testing.assert_close(sd["transformer.resblocks.1.mlp.c_fc.weight"],
                               official["text_encoder.transformer.resblocks.1.mlp.c_fc.weight"])
    torch.testing.assert_close(model.logit_scale.exp(), 1.0 / official["temp"])
    back = to_official_state_dict(sd)
    assert set(back) == set(official)
    for k in official:
        assert torch.equal(back[k], official[k]), k
    # a DDP-saved file with a "module." prefix loads the same
    again = load_viclip_checkpoint(tiny_viclip(), {"module." + k: v for k, v in official.items()})
    assert all(torch.equal(again.state_dict()[k], sd[k]) for k in sd)


def test_checkpoint_errors_name_the_key():
    cfg = ViCLIPConfig(**SMALL)
    official = {k: torch.zeros(s) for k, s in _official_layout(cfg).items()}
    bad = dict(official)
    bad["vision_encoder.temporal_positional_embedding"] = torch.zeros(1, 8, 64)
    with pytest.raises(ValueError, match="temporal_positional_embedding has shape"):
        load_viclip_checkpoint(tiny_viclip(), bad)
    bad = dict(official)
    bad["vision_encoder.conv1.weight"] = torch.zeros(64, 3, 2, 8, 8)
    with pytest.raises(ValueError, match="temporal kernel 1"):
        from_official_state_dict(bad)
    bad = dict(official)
    del bad["text_encoder.ln_final.bias"]
    with pytest.raises(ValueError, match="missing"):
        load_viclip_checkpoint(tiny_viclip(), bad)


# ---------------------------------------------------------------- adapting ViCLIP
def test_msta_trainable_parameters_viclip_b_equal_vit_b16():
    with torch.device("meta"):
        model = create_viclip("ViCLIP-B-16")
    vm = vpeft.adapt(model, "msta", num_frames=8, bottleneck=128, layers=(8, 12))
    assert vm.num_trainable_parameters(include_head=False) == 1_744_000
    assert all(m.layout == "nt" for m in vm.msta)


def test_msta_on_viclip_is_drop_in_and_trains():
    model = tiny_viclip()
    frozen = copy.deepcopy(model)
    vm = vpeft.adapt(model, "msta", num_frames=T, bottleneck=16, layers=(2, 3), scale=1.0).eval()
    v = _video()
    out = vm.encode_video(v)
    torch.testing.assert_close(out, vm.backbone.encode_video(v))
    assert not torch.allclose(out, frozen.encode_video(v))
    tok = model.tokenize(["a video of a cat"])
    assert not torch.allclose(vm.encode_text(tok), frozen.encode_text(tok))
    vm.train()
    loss = vm.encode_video(v).square().sum() + vm.encode_text(tok).square().sum()
    loss.backward()
    assert all(p.grad is not None for p in vm.msta.parameters())
    assert all(p.grad is None for p in vm.backbone.parameters())


def test_st_adapter_on_viclip_identity_at_init_then_temporal():
    model = tiny_viclip()
    frozen = copy.deepcopy(model)
    vm = vpeft.adapt(model, "st_adapter", num_frames=T, num_classes=3, bottleneck=8).eval()
    v = _video()
    with torch.no_grad():
        torch.testing.assert_close(vm.backbone.encode_video(v), frozen.encode_video(v), rtol=0, atol=0)
        assert vm(v).shape == (2, 3)
        # a non-zero temporal tap on one adapter: patch tokens move, the [CLS] passes unchanged
        ad = vm.backbone.visual.transformer.resblocks[0].adapter_mlp
        ad.temporal_weight.normal_()
        x = torch.randn(2, 1 + 16 * T, 64)
        y = ad(x)
        torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=0)
        assert not torch.allclose(y[:, 1:], x[:, 1:])


def test_viclip_well_defined_methods_and_clear_errors():
    with pytest.raises(ValueError, match="side4video is not defined on ViCLIP"):
        vpeft.adapt(tiny_viclip(), "side4video", num_frames=T)
    with pytest.raises(ValueError, match="built for 4 frames"):
        vpeft.adapt(tiny_viclip(), "msta", num_frames=8, bottleneck=16)
    vm = vpeft.adapt(tiny_viclip(), "linear_probe", num_frames=T, num_classes=5)
    assert vm(_video()).shape == (2, 5)


def _official_forward(sd, cfg: ViCLIPConfig, video, text):
    """The official ViCLIP forward (InternVideo viclip_vision.py / viclip_text.py), restated from its
    description on the official state dict: Conv3d patches, (b t) -> (b n) t temporal embedding,
    b (n t) token order, sequence-first nn.MultiheadAttention blocks, QuickGELU MLPs."""
    def block(prefix, x, heads, mask=None):                  # x: (L, B, D) sequence first
        d = x.shape[-1]
        attn = nn.MultiheadAttention(d, heads)
        attn.load_state_dict({k[len(prefix + "attn."):]: v for k, v in sd.items() if k.startswith(prefix + "attn.")})
        ln = lambda z, n: F.layer_norm(z, (d,), sd[prefix + n + ".weight"], sd[prefix + n + ".bias"])
        x = x + attn(ln(x, "ln_1"), ln(x, "ln_1"), ln(x, "ln_1"), need_weights=False, attn_mask=mask)[0]
        h = F.linear(ln(x, "ln_2"), sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        return x + F.linear(h, sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"])

    v = "vision_encoder."
    d = cfg.vision_width
    x = F.conv3d(video.permute(0, 2, 1, 3, 4), sd[v + "conv1.weight"], stride=(1, cfg.patch_size, cfg.patch_size))
    b, c, t, h, w = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
    x = torch.cat([sd[v + "class_embedding"] + torch.zeros(b * t, 1, d), x], dim=1) + sd[v + "positional_embedding"]
    cls = x[:b, :1]
    x = x[:, 1:].reshape(b, t, h * w, d).transpose(1, 2).reshape(b * h * w, t, d)
    x = x + sd[v + "temporal_positional_embedding"]
    x = x.reshape(b, h * w * t, d)
    x = F.layer_norm(torch.cat([cls, x], 1), (d,), sd[v + "ln_pre.weight"], sd[v + "ln_pre.bias"]).transpose(0, 1)
    for i in range(cfg.vision_layers):
        x = block(f"{v}transformer.resblocks.{i}.", x, cfg.vision_heads)
    x = F.layer_norm(x.transpose(0, 1), (d,), sd[v + "ln_post.weight"], sd[v + "ln_post.bias"])
    video_feat = x[:, 0] @ sd[v + "proj"]

    s = "text_encoder."
    dt = cfg.text_width
    y = (sd[s + "token_embedding.weight"][text] + sd[s + "positional_embedding"]).transpose(0, 1)
    mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
    for i in range(cfg.text_layers):
        y = block(f"{s}transformer.resblocks.{i}.", y, cfg.text_heads, mask)
    y = F.layer_norm(y.transpose(0, 1), (dt,), sd[s + "ln_final.weight"], sd[s + "ln_final.bias"])
    text_feat = y[torch.arange(y.shape[0]), text.argmax(-1)] @ sd[s + "text_projection"]
    return video_feat, text_feat


def test_loaded_checkpoint_computes_the_official_forward():
    cfg = ViCLIPConfig(**SMALL)
    g = torch.Generator().manual_seed(2)
    official = {k: 0.2 * torch.randn(s, generator=g) for k, s in _official_layout(cfg).items()}
    for k in official:
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            official[k] = 1.0 + official[k]
    official["temp"] = torch.tensor(0.01)
    model = load_viclip_checkpoint(tiny_viclip(), {"model": official})
    video = torch.randn(2, T, 3, 32, 32)
    text = model.tokenize(["a video of a cat", "a dog runs"])
    with torch.no_grad():
        ref_v, ref_t = _official_forward(official, cfg, video, text)
        torch.testing.assert_close(model.encode_video(video), ref_v, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.encode_text(text), ref_t, rtol=1e-4, atol=1e-4)


class _TrainingConfig:  # stands in for the pickled config object a training run may save
    lr = 1e-3


def test_checkpoint_file_with_pickled_objects_gets_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {}, "config": _TrainingConfig()}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_viclip_checkpoint(tiny_viclip(), str(path))
    with pytest.raises(FileNotFoundError):
        load_viclip_checkpoint(tiny_viclip(), str(tmp_path / "missing.pth"))
