"""Each eager reference op against an independent, straightforward computation."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vpeft_kernels
from vpeft_kernels import reference as R



@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _grads(fn, tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)  # not randn_like: strides vary
    (out * g).sum().backward()
    return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in tensors]


def _leaf(*shape):
    return torch.randn(*shape).requires_grad_()


def _conv3d_taps(h, w, b, groups_out=None):
    """h (B, T, N, C) -> Conv3d over T with the taps w (Cout, 3), groups = C."""
    bsz, t, n, c = h.shape
    cout = w.shape[0]
    x = h.permute(0, 3, 1, 2).unsqueeze(-1)                    # (B, C, T, N, 1)
    y = F.conv3d(x, w.reshape(cout, 1, 3, 1, 1), b, padding=(1, 0, 0), groups=c)
    return y.squeeze(-1).permute(0, 2, 3, 1)                   # (B, T, N, Cout)


@pytest.mark.parametrize("bsz,t,n,d,r", [(2, 3, 5, 12, 4), (1, 1, 3, 8, 8), (1, 4, 7, 6, 2)])
def test_st_adapter_matches_conv3d(bsz, t, n, d, r):
    x, wd, bd, wc, bc, wu, bu = (_leaf(bsz * t, 1 + n, d), _leaf(r, d), _leaf(r), _leaf(r, 3), _leaf(r),
                                 _leaf(d, r), _leaf(d))
    ins = [x, wd, bd, wc, bc, wu, bu]

    def ours():
        return vpeft_kernels.st_adapter(*ins, num_frames=t, backend="eager")

    def independent():
        h = F.linear(x[:, 1:], wd, bd).reshape(bsz, t, n, r)
        h = _conv3d_taps(h, wc, bc).reshape(bsz * t, n, r)
        return torch.cat([x[:, :1], x[:, 1:] + F.linear(h, wu, bu)], 1)

    o1, g1 = _grads(ours, ins)
    o2, g2 = _grads(independent, ins)
    torch.testing.assert_close(o1, o2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(o1[:, 0], x[:, 0].detach())


def test_temporal_taps_definition():
    """out[t] = w0 * in[t-1] + w1 * in[t] + w2 * in[t+1] + b, zero padded, by hand."""
    h = torch.randn(1, 4, 2, 3)
    w = torch.randn(3, 3)
    b = torch.randn(3)
    out = R.temporal_taps(h, w, b)
    for t in range(4):
        exp = h[:, t] * w[:, 1] + b
        if t > 0:
            exp = exp + h[:, t - 1] * w[:, 0]
        if t < 3:
            exp = exp + h[:, t + 1] * w[:, 2]
        torch.testing.assert_close(out[:, t], exp)


@pytest.mark.parametrize("vision", [True, False])
@pytest.mark.parametrize("scale", [0.005, 0.5])
def test_msta_adapter_matches_modules_and_scaling(vision, scale):
    bsz, t, n, d, r = 2, 3, 4, 8, 4
    rows = bsz * t if vision else bsz
    u = _leaf(rows, 1 + n, d)
    down, shared, up = nn.Linear(d, r), nn.Linear(r, r), nn.Linear(r, d)
    tconv = nn.Conv3d(r, d, (3, 1, 1), padding=(1, 0, 0), groups=r) if vision else None
    w_t = tconv.weight[:, 0, :, 0, 0] if vision else None
    b_t = tconv.bias if vision else None

    out = vpeft_kernels.msta_adapter(u, down.weight, down.bias, shared.weight, shared.bias, up.weight, up.bias,
                                     w_t, b_t, scale=scale, num_frames=t if vision else None, backend="eager")

    # independent: A(u) with modules, Conv3d for the grouped temporal up-projection
    u2 = u.detach().clone().requires_grad_()
    h = F.relu(shared(F.relu(down(u2))))
    a = up(h)
    if vision:
        hp = h[:, 1:].reshape(bsz, t, n, r).permute(0, 3, 1, 2).unsqueeze(-1)
        tp = tconv(hp).squeeze(-1).permute(0, 2, 3, 1).reshape(bsz * t, n, d)
        a = torch.cat([a[:, :1], a[:, 1:] + tp], 1)
    torch.testing.assert_close(out, scale * a)

    g = torch.randn_like(out)
    params = [down.weight, shared.bias, up.weight] + ([tconv.weight, tconv.bias] if vision else [])
    grads_ours = torch.autograd.grad((out * g).sum(), [u] + params)
    grads_unit = torch.autograd.grad((a * g).sum(), [u2] + params)  # A(u) with s = 1
    # weights: as if s = 1; input: scaled by s
    torch.testing.assert_close(grads_ours[0], scale * grads_unit[0])
    for go, gu in zip(grads_ours[1:], grads_unit[1:]):
        torch.testing.assert_close(go, gu)


def test_msta_dropout_is_used_and_consistent():
    u = _leaf(4, 5, 8)
    ws = [_leaf(*s) for s in [(4, 8), (4,), (4, 4), (4,), (8, 4), (8,)]]
    torch.manual_seed(3)
    o1 = vpeft_kernels.msta_adapter(u, *ws, scale=1.0, dropout_p=0.5, backend="eager")
    torch.manual_seed(3)
    o2 = vpeft_kernels.msta_adapter(u, *ws, scale=1.0, dropout_p=0.5, backend="eager")
    o0 = vpeft_kernels.msta_adapter(u, *ws, scale=1.0, dropout_p=0.0, backend="eager")
    torch.testing.assert_close(o1, o2)
    assert not torch.allclose(o1, o0)


def test_token_shift_by_hand():
    c = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(6, 4)  # B=2, T=3, d=4
    out = R.token_shift(c, 3).reshape(2, 3, 4)
    cc = c.reshape(2, 3, 4)
    for b in range(2):
        for t in range(3):
            exp_fwd = cc[b, t + 1, :2] if t < 2 else torch.zeros(2)
            exp_bwd = cc[b, t - 1, 2:] if t > 0 else torch.zeros(2)
            torch.testing.assert_close(out[b, t], torch.cat([exp_fwd, exp_bwd]))


@pytest.mark.parametrize("t,heads", [(3, 2), (1, 1), (2, 2)])
@pytest.mark.parametrize("use_ln", [True, False])
def test_token_shift_attention_matches_multihead_attention(t, heads, use_ln):
    bsz, n, d = 2, 5, 8
    s, c, pos = _leaf(bsz * t, n, d), _leaf(bsz * t, d), _leaf(n, d)
    ln = nn.LayerNorm(d)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    mha = nn.MultiheadAttention(d, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    ins = [s, c, pos, ln.weight, ln.bias, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
           mha.out_proj.bias]

    def ours():
        return vpeft_kernels.token_shift_attention(
            s, c, pos, ln.weight if use_ln else None, ln.bias if use_ln else None, mha.in_proj_weight,
            mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, num_frames=t, num_heads=heads,
            backend="eager")

    def independent():
        cc = c.reshape(bsz, t, d)
        rows = []
        for b in range(bsz):
            for f in range(t):
                nxt = cc[b, f + 1, : d // 2] if f + 1 < t else torch.zeros(d // 2)
                prv = cc[b, f - 1, d // 2:] if f > 0 else torch.zeros(d - d // 2)
                rows.append(torch.cat([nxt, prv]))
        shifted = torch.stack(rows)[:, None]
        x = torch.cat([shifted, s + pos], 1)
        if use_ln:
            x = ln(x)
        return mha(x[:, 1:], x, x, need_weights=False)[0]

    o1, g1 = _grads(ours, ins)
    o2, g2 = _grads(independent, ins)
    torch.testing.assert_close(o1, o2)
    for i, (a, b) in enumerate(zip(g1, g2)):
        if not use_ln and i in (3, 4):
            continue  # LayerNorm unused
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("stacked", [False, True])
def test_ladder_projection_matches_modules(norm, stacked):
    levels, m, big, small = 3, 5, 12, 4
    z = [_leaf(2, m, big) for _ in range(levels)]
    lns = [nn.LayerNorm(big if norm == "pre" else small) for _ in range(levels)]
    lins = [nn.Linear(big, small) for _ in range(levels)]
    for ln in lns:
        with torch.no_grad():
            ln.weight.normal_()
            ln.bias.normal_()
    lw = torch.stack([ln.weight for ln in lns]).detach().requires_grad_()
    lb = torch.stack([ln.bias for ln in lns]).detach().requires_grad_()
    w = torch.stack([li.weight for li in lins]).detach().requires_grad_()
    b = torch.stack([li.bias for li in lins]).detach().requires_grad_()
    zin = torch.stack(z) if stacked else z
    out = vpeft_kernels.ladder_projection(zin, lw, lb, w, b, norm=norm, backend="eager")
    exp = torch.stack([lins[i](lns[i](z[i])) if norm == "pre" else lns[i](lins[i](z[i])) for i in range(levels)])
    torch.testing.assert_close(out, exp)
    g = torch.randn_like(out)
    ours = torch.autograd.grad((out * g).sum(), z + [lw, w])
    ref = torch.autograd.grad((exp * g).sum(), z + [lns[0].weight, lins[0].weight])
    for a, bb in zip(ours[:levels], ref[:levels]):
        torch.testing.assert_close(a, bb)
    torch.testing.assert_close(ours[levels][0], ref[levels])
    torch.testing.assert_close(ours[levels + 1][0], ref[levels + 1])


def test_bad_shapes_and_backends_give_clear_errors(monkeypatch):
    x = torch.randn(6, 5, 8)
    good = [torch.randn(4, 8), torch.randn(4), torch.randn(4, 3), torch.randn(4), torch.randn(8, 4), torch.randn(8)]
    with pytest.raises(ValueError, match="not a multiple of num_frames=4"):
        vpeft_kernels.st_adapter(x, *good, num_frames=4)
    bad = list(good)
    bad[2] = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"w_conv has shape \(4, 2\), expected \(4, 3\)"):
        vpeft_kernels.st_adapter(x, *bad, num_frames=3)
    with pytest.raises(ValueError, match="'bogus' is not a backend"):
        vpeft_kernels.st_adapter(x, *good, num_frames=3, backend="bogus")
    monkeypatch.setenv("VPEFT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="VPEFT_BACKEND='nonsense'"):
        vpeft_kernels.st_adapter(x, *good, num_frames=3)
    monkeypatch.setenv("VPEFT_BACKEND", "eager")
    vpeft_kernels.st_adapter(x, *good, num_frames=3)
    # the compiled extension implements the ladder only: asking it for an adapter says why not
    with pytest.raises(vpeft_kernels.BackendUnavailableError, match="extension.*st_adapter"):
        vpeft_kernels.st_adapter(x, *good, num_frames=3, backend="extension")
    u = torch.randn(6, 5, 12)
    w = [torch.randn(8, 12), torch.randn(8), torch.randn(8, 8), torch.randn(8), torch.randn(12, 8), torch.randn(12),
         torch.randn(12, 3), torch.randn(12)]
    with pytest.raises(ValueError, match="r=8 must divide the vision width D=12"):
        vpeft_kernels.msta_adapter(u, *w, scale=0.1, num_frames=3)
    assert set(vpeft_kernels.backend_status()) == {"triton", "extension", "eager"}
