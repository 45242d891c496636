"""Fused Triton adapter kernels (vpeft_kernels/adapter.py) against the eager reference.

On a machine without a GPU the kernels run in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set by conftest.py); shapes are tiny so every launch has a
handful of programs, but several per launch, so block edges and temporal neighbours
that live in another program are exercised. bf16 runs only on CUDA: the interpreter's
bf16 arithmetic is broken (see shared/ENVIRONMENT.md).
"""
from __future__ import annotations

import pytest
import torch

import vpeft_kernels as vk
from vpeft_kernels import _triton_common

adapter = pytest.importorskip("vpeft_kernels.adapter", reason="triton backend not importable")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = _triton_common.INTERPRET
needs_kernels = pytest.mark.skipif(not CUDA and not INTERPRET,
                                   reason="no CUDA device and TRITON_INTERPRET is not set")
cuda_only = pytest.mark.skipif(not CUDA, reason="bf16 needs a CUDA device: Triton's CPU interpreter "
                                                "gets bf16 arithmetic wrong")

# (B, T, N, D, r): the odd one from the issue, T=1 (centre tap only), r not a multiple
# of 16 (masked bottleneck tiles), a batch of several clips
# The last one is multi-tile in every launch under the interpreter config (16-row, 32-col
# tiles): 60 rows = 4 row tiles, D=80 = 3 column tiles and 5 K steps, r=40 = 2 column
# tiles of the down GEMM, and temporal neighbours (10 rows apart) in other row tiles.
# The MSTA bottleneck kernels walk r in 16-wide column blocks there: r=24/32/40 take 2-3
# blocks (with a tail), and D/r = 3 group members take two 2-member steps of the group sum.
SHAPES = [(1, 3, 7, 48, 16), (2, 2, 4, 32, 16), (1, 1, 5, 64, 32), (2, 4, 3, 48, 24), (2, 3, 9, 80, 40)]
SHAPE_IDS = ["B1T3N7D48r16", "B2T2N4D32r16", "B1T1N5D64r32", "B2T4N3D48r24", "B2T3N9D80r40-multitile"]


def _rand(*shape, dtype=torch.float32, std=0.5):
    return (torch.randn(*shape) * std).to(device=DEVICE, dtype=dtype)


def st_inputs(b, t, n, d, r, dtype=torch.float32):
    return [_rand(b * t, 1 + n, d, dtype=dtype, std=1.0), _rand(r, d, dtype=dtype, std=d ** -0.5),
            _rand(r, dtype=dtype), _rand(r, 3, dtype=dtype), _rand(r, dtype=dtype),
            _rand(d, r, dtype=dtype, std=r ** -0.5), _rand(d, dtype=dtype)]


def msta_inputs(b, t, n, d, r, dtype=torch.float32, vision=True):
    rows = (b * t, 1 + n) if vision else (b, n)
    xs = [_rand(*rows, d, dtype=dtype, std=1.0), _rand(r, d, dtype=dtype, std=d ** -0.5), _rand(r, dtype=dtype),
          _rand(r, r, dtype=dtype, std=r ** -0.5), _rand(r, dtype=dtype),
          _rand(d, r, dtype=dtype, std=r ** -0.5), _rand(d, dtype=dtype)]
    if vision:
        xs += [_rand(d, 3, dtype=dtype), _rand(d, dtype=dtype)]
    return xs


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    return [out.detach()] + [g.detach() for g in grads]


def _st(backend, t):
    return lambda *a: vk.st_adapter(*a, num_frames=t, backend=backend)


def _msta(backend, t, scale=0.25, vision=True, p=0.0):
    return lambda *a: vk.msta_adapter(*a, scale=scale, num_frames=t if vision else None, dropout_p=p,
                                      backend=backend)


NAMES_ST = ["out", "x", "w_down", "b_down", "w_conv", "b_conv", "w_up", "b_up"]
NAMES_MSTA = ["out", "u", "w_down", "b_down", "w_shared", "b_shared", "w_up", "b_up", "w_tconv", "b_tconv"]


def _assert_fp32_close(got, want, names):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = (a - b).abs().max().item()
        tol = 1e-4 * max(b.abs().max().item(), 1e-6)
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e}"


def _assert_lowp_close(got, eager, exact, names, atol=1e-3):
    """flash-attention's rule: kernel error vs an fp32 reference at most twice the
    error of eager PyTorch in the same dtype (plus a small atol for exact ties)."""
    for name, a, e, x in zip(names, got, eager, exact):
        assert a.dtype == e.dtype, name
        kernel_err = (a.float() - x).abs().max().item()
        eager_err = (e.float() - x).abs().max().item()
        scale = max(x.abs().max().item(), 1.0)
        assert kernel_err <= 2 * eager_err + atol * scale, (
            f"{name}: kernel error {kernel_err:.3e}, eager {eager_err:.3e}")


def _compare(fn_kernel, fn_ref, inputs, names, dtype):
    out_shape = fn_ref(*inputs).shape
    dy = _rand(*out_shape, dtype=dtype, std=1.0)
    got = _grads(fn_kernel, inputs, dy)
    if dtype == torch.float32:
        _assert_fp32_close(got, _grads(fn_ref, inputs, dy), names)
    else:
        eager = _grads(fn_ref, inputs, dy)
        exact = _grads(fn_ref, [t.float() for t in inputs], dy.float())
        _assert_lowp_close(got, eager, exact, names)


# ------------------------------------------------------------------- correctness


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_st_adapter_matches_reference(shape, dtype):
    b, t, n, d, r = shape
    _compare(_st("triton", t), _st("eager", t), st_inputs(b, t, n, d, r, dtype), NAMES_ST, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_msta_vision_matches_reference(shape, dtype):
    b, t, n, d, r = shape
    _compare(_msta("triton", t), _msta("eager", t), msta_inputs(b, t, n, d, r, dtype), NAMES_MSTA, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(2, 1, 9, 32, 16), (1, 1, 5, 48, 48)], ids=["B2L9D32r16", "B1L5D48r48"])
def test_msta_text_matches_reference(shape, dtype):
    b, t, n, d, r = shape
    _compare(_msta("triton", t, vision=False, scale=0.005), _msta("eager", t, vision=False, scale=0.005),
             msta_inputs(b, t, n, d, r, dtype, vision=False), NAMES_MSTA[:8], dtype)


@needs_kernels
def test_msta_gradient_scaling():
    """Weights get gradients as if scale = 1; the input gradient is scaled by scale."""
    inputs = msta_inputs(1, 2, 3, 32, 16)
    dy = _rand(2, 4, 32, std=1.0)
    small = _grads(_msta("triton", 2, scale=0.01), inputs, dy)
    one = _grads(_msta("triton", 2, scale=1.0), inputs, dy)
    torch.testing.assert_close(small[0], 0.01 * one[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(small[1], 0.01 * one[1], rtol=1e-5, atol=1e-7)
    for a, b in zip(small[2:], one[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_non_contiguous_inputs_are_not_written():
    b, t, n, d, r = 1, 3, 7, 48, 16
    base = st_inputs(b, t, n, d, r)
    # the same values laid out non-contiguously: x from a (1+N, B*T, D) buffer, weights transposed
    x_nc = base[0].transpose(0, 1).contiguous().transpose(0, 1)
    wd_nc = base[1].t().contiguous().t()
    wc_nc = base[3].t().contiguous().t()
    wu_nc = base[5].t().contiguous().t()
    nc = [x_nc, wd_nc, base[2], wc_nc, base[4], wu_nc, base[6]]
    assert not x_nc.is_contiguous() and not wd_nc.is_contiguous()
    before = [a.clone() for a in nc]
    _assert_fp32_close(_grads(_st("triton", t), nc, base[0]), _grads(_st("eager", t), base, base[0]), NAMES_ST)
    for a, b_ in zip(nc, before):
        assert torch.equal(a, b_)
    m = msta_inputs(b, t, n, d, r)
    m_nc = [m[0].transpose(0, 1).contiguous().transpose(0, 1)] + m[1:]
    _assert_fp32_close(_grads(_msta("triton", t), m_nc, m[0]), _grads(_msta("eager", t), m, m[0]), NAMES_MSTA)


@needs_kernels
def test_backward_saves_only_inputs():
    """No activation is saved for backward: every saved tensor is one of the op's inputs."""
    b, t, n, d, r = 1, 3, 7, 48, 16
    for fn, inputs in ((_st("triton", t), st_inputs(b, t, n, d, r)),
                       (_msta("triton", t, p=0.1), msta_inputs(b, t, n, d, r))):
        leaves = [a.clone().requires_grad_() for a in inputs]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
            fn(*leaves)
        ptrs = {a.data_ptr() for a in leaves}
        big = [tuple(s.shape) for s in saved if s.data_ptr() not in ptrs and s.numel() > 1]
        assert saved and not big, f"activations saved for backward: {big}"


# ------------------------------------------------------------------------ dropout


from vpeft_kernels.selftest import msta_reference_with_mask as _msta_eager_with_mask  # noqa: E402


@needs_kernels
def test_msta_dropout_same_mask_forward_and_backward():
    b, t, n, d, r = 1, 3, 7, 48, 16
    p, scale = 0.3, 0.5
    inputs = msta_inputs(b, t, n, d, r)
    seed = torch.tensor([1234], device=DEVICE)

    def kernel(*a):
        return torch.ops.vpeft.msta_adapter(*a, seed, scale, t, p)

    rows = b * t * (1 + n)
    keep = adapter.dropout_keep_mask(seed, rows, r, p)
    frac = 1 - keep.float().mean().item()
    assert 0.15 < frac < 0.45, f"dropped fraction {frac} for p={p}"

    def eager(*a):
        return _msta_eager_with_mask(*a, mask=keep, p=p, scale=scale, num_frames=t)

    dy = _rand(b * t, 1 + n, d, std=1.0)
    # forward matching says the recovered mask is the forward's; gradients matching
    # says backward regenerated the same mask
    _assert_fp32_close(_grads(kernel, inputs, dy), _grads(eager, inputs, dy), NAMES_MSTA)
    other = adapter.dropout_keep_mask(torch.tensor([99], device=DEVICE), rows, r, p)
    assert not torch.equal(keep, other)


@needs_kernels
def test_msta_dropout_follows_torch_seed():
    inputs = msta_inputs(1, 2, 3, 32, 16)
    fn = _msta("triton", 2, p=0.5)
    torch.manual_seed(7)
    a = fn(*inputs)
    torch.manual_seed(7)
    b = fn(*inputs)
    c = fn(*inputs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(_msta("triton", 2, p=0.0)(*inputs), _msta("triton", 2, p=0.0)(*inputs))


# ------------------------------------------------------- registration and dispatch


@needs_kernels
def test_opcheck():
    b, t, n, d, r = 1, 2, 3, 32, 16
    x = st_inputs(b, t, n, d, r)
    leaves = [a.requires_grad_() for a in x]
    torch.library.opcheck(torch.ops.vpeft.st_adapter.default, (*leaves, t))
    m = [a.requires_grad_() for a in msta_inputs(b, t, n, d, r)]
    seed = torch.tensor([3], device=DEVICE)
    torch.library.opcheck(torch.ops.vpeft.msta_adapter.default, (*m, seed, 0.1, t, 0.2))
    mt = [a.requires_grad_() for a in msta_inputs(b, t, n, d, r, vision=False)]
    torch.library.opcheck(torch.ops.vpeft.msta_adapter.default, (*mt, None, None, seed, 0.1, 1, 0.0))
    dy = _rand(b * t, 1 + n, d)
    for needs in ([True] * 9, [False, True, False, True, False, True, True, False, True]):
        torch.library.opcheck(torch.ops.vpeft.st_adapter_backward.default,
                              (dy, *[a.detach() for a in x[:6]], t, needs[:7]))
        torch.library.opcheck(torch.ops.vpeft.msta_adapter_backward.default,
                              (dy, *[a.detach() for a in m[:6]], m[7].detach(), seed, 0.1, t, 0.2, needs))


@needs_kernels
def test_torch_compile_fullgraph():
    """Compiles through the public functions (backend selection included) with
    fullgraph=True. Takes about 40 s on a 2-core CPU, most of it inductor's C++ build."""
    b, t, n, d, r = 1, 3, 7, 48, 16
    st = st_inputs(b, t, n, d, r)
    m = msta_inputs(b, t, n, d, r)[1:]  # the MSTA branch reads the ST-Adapter output

    def f(x, wd, bd, wc, bc, wu, bu, ms):
        y = vk.st_adapter(x, wd, bd, wc, bc, wu, bu, num_frames=t, backend="triton")
        y = y + vk.msta_adapter(y, *ms, scale=0.1, num_frames=t, backend="triton")
        return (y * y).sum()

    def run(fn):
        leaves = [a.clone().requires_grad_() for a in st + m]
        loss = fn(*leaves[:7], leaves[7:])
        return [loss] + list(torch.autograd.grad(loss, leaves))

    got = run(torch.compile(f, fullgraph=True))
    want = run(f)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)


def test_backend_reasons():
    x = st_inputs(1, 2, 3, 32, 16)
    # auto never takes the interpreter: CPU tensors go to eager
    if not CUDA:
        assert vk.chosen_backend("st_adapter", "auto", *x, num_frames=2) == "eager"
        assert vk.chosen_backend("msta_adapter", "auto", *msta_inputs(1, 2, 3, 32, 16), scale=1.0,
                                 num_frames=2) == "eager"
    mixed = list(x)
    mixed[1] = mixed[1].double()
    why = vk.not_supported_reasons("st_adapter", *mixed, num_frames=2)["triton"]
    assert any("dtype" in w for w in why)
    # the MSTA kernels walk r in column blocks: a wide bottleneck is taken in every dtype
    m = msta_inputs(1, 1, 3, 256, 256, vision=False)
    assert not vk.not_supported_reasons("msta_adapter", *m, scale=1.0)["triton"]
    assert not vk.not_supported_reasons("msta_adapter", *[a.half() for a in m], scale=1.0)["triton"]
    if not CUDA:
        xb = [a.bfloat16() for a in x]
        with pytest.raises(vk.BackendUnavailableError, match="bfloat16"):
            vk.st_adapter(*xb, num_frames=2, backend="triton")


@pytest.mark.skipif(CUDA or INTERPRET, reason="checks the message shown without the interpreter on CPU")
def test_cpu_without_interpreter_names_the_switch():
    why = vk.not_supported_reasons("st_adapter", *st_inputs(1, 2, 3, 32, 16), num_frames=2)["triton"]
    assert any("TRITON_INTERPRET" in w for w in why)


# ---------------------------------------------------------------------- bf16, GPU


@cuda_only
@pytest.mark.parametrize("shape", SHAPES[:2], ids=SHAPE_IDS[:2])
def test_bf16_cuda(shape):
    b, t, n, d, r = shape
    dt = torch.bfloat16
    _compare(_st("triton", t), _st("eager", t), st_inputs(b, t, n, d, r, dt), NAMES_ST, dt)
    _compare(_msta("triton", t), _msta("eager", t), msta_inputs(b, t, n, d, r, dt), NAMES_MSTA, dt)


@cuda_only
def test_auto_picks_triton_on_cuda():
    x = st_inputs(1, 2, 3, 32, 16)
    assert vk.chosen_backend("st_adapter", "auto", *x, num_frames=2) == "triton"


@needs_kernels
@pytest.mark.parametrize("op", ["st", "msta"])
def test_autocast_runs_in_the_autocast_dtype(op):
    """fp32 parameters under autocast: the kernels run in the autocast dtype, not eager."""
    device_type = "cuda" if CUDA else "cpu"
    amp = torch.bfloat16 if CUDA else torch.float16  # bf16 is wrong in the CPU interpreter
    t = 2
    inputs = st_inputs(1, t, 5, 32, 16) if op == "st" else msta_inputs(1, t, 5, 32, 16)
    fn = _st("triton", t) if op == "st" else _msta("triton", t)
    name = "st_adapter" if op == "st" else "msta_adapter"
    kw = dict(num_frames=t) if op == "st" else dict(scale=0.25, num_frames=t)
    leaves = [x.clone().requires_grad_() for x in inputs]
    with torch.autocast(device_type, dtype=amp):
        assert vk.chosen_backend(name, "triton", *leaves, **kw) == "triton"
        out = fn(*leaves)
    dy = torch.randn(out.shape, device=DEVICE).to(amp)
    out.backward(dy)
    low = _grads(fn, [x.to(amp) for x in inputs], dy)
    assert out.dtype == amp and torch.equal(out.detach(), low[0])
    for leaf, g_low in zip(leaves, low[1:]):
        assert leaf.grad.dtype == torch.float32 and torch.equal(leaf.grad, g_low.float())


def test_msta_nt_layout_is_declined_with_a_reason():
    """ViCLIP's (n t) layout runs eager; asking the Triton kernels for it says why not."""
    u, *w = msta_inputs(1, 2, 4, 32, 16)
    u = u.reshape(1, -1, 32)[:, : 1 + 4 * 2]
    why = vk.not_supported_reasons("msta_adapter", u, *w, scale=0.5, num_frames=2, layout="nt")["triton"]
    assert any("layout='nt'" in r for r in why)
    out = vk.msta_adapter(u, *w, scale=0.5, num_frames=2, layout="nt")  # auto: eager
    assert out.shape == u.shape
