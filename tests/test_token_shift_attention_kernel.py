"""The fused Triton token-shift attention against the eager reference.

On a machine without a GPU the kernels run through Triton's CPU interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before triton is imported), so
every test here that does not say "CUDA" runs on CPU tensors. Shapes are tiny (one
or two heads of width 64) because the interpreter costs ~0.6 ms per program instance;
the interpreter config uses 16-wide blocks, so N = 20 or 33 still spans several key
and query blocks with a ragged tail.
"""
from __future__ import annotations

import pytest
import torch

import vpeft_kernels
from vpeft_kernels import BackendUnavailableError, reference
from vpeft_kernels._backend import chosen_backend, not_supported_reasons

tsa = pytest.importorskip("vpeft_kernels.token_shift_attention",
                          reason="the triton backend of token_shift_attention did not load")

CUDA = torch.cuda.is_available()
INTERPRET = tsa._INTERPRET
needs_kernels = pytest.mark.skipif(
    not (CUDA or INTERPRET),
    reason="no CUDA device and TRITON_INTERPRET is not set: Triton kernels cannot run here")
DEV = "cuda" if CUDA else "cpu"

NAMES = ("s", "c", "pos", "ln_weight", "ln_bias", "w_qkv", "b_qkv", "w_out", "b_out")


def make_inputs(b, t, n, d, *, dtype=torch.float32, device=DEV, ln=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)

    return [
        r(b * t, n, d), r(b * t, d), r(n, d, scale=0.1),
        r(d, scale=0.1, shift=1.0) if ln else None, r(d, scale=0.1) if ln else None,
        r(3 * d, d, scale=d ** -0.5), r(3 * d, scale=0.1), r(d, d, scale=d ** -0.5), r(d, scale=0.1),
    ]


def run(args, t, heads, backend, grad_out):
    """Output and the gradients of every tensor input (None entries stay None)."""
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    if backend == "reference":
        out = reference.token_shift_attention(*leaves, num_frames=t, num_heads=heads)
    else:
        out = vpeft_kernels.token_shift_attention(*leaves, num_frames=t, num_heads=heads, backend=backend)
    out.backward(grad_out)
    return [out.detach()] + [None if a is None else a.grad for a in leaves]


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_all_close(got, ref, rtol, atol, what=""):
    for name, x, y in zip(("out",) + NAMES, got, ref):
        if y is None:
            assert x is None, f"{what}{name}: expected no gradient"
            continue
        assert x is not None, f"{what}{name}: gradient missing"
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}{name}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        scale = y.abs().max().item()
        err = max_err(x, y)
        assert err <= atol + rtol * scale, f"{what}{name}: max error {err:.3g} (scale {scale:.3g})"


# (B, T, N, d, heads): T = 1 (both neighbours zero), T = 2, T = 32, odd N, N = 1, batch 1,
# several query/key blocks with a ragged tail (N = 18, 20, 33), head dims 16, 32, 64, 128.
SHAPES = [
    pytest.param(2, 3, 20, 128, 2, id="B2-T3-N20-d128-h2"),
    pytest.param(1, 1, 9, 64, 1, id="B1-T1-N9-d64"),
    pytest.param(2, 2, 16, 64, 1, id="B2-T2-N16-d64"),
    pytest.param(1, 4, 33, 64, 1, id="B1-T4-N33-d64"),
    pytest.param(1, 2, 7, 64, 2, id="B1-T2-N7-d64-hd32"),
    pytest.param(1, 32, 5, 64, 1, id="B1-T32-N5-d64"),
    pytest.param(2, 2, 1, 64, 1, id="B2-T2-N1-d64"),
    pytest.param(1, 2, 18, 64, 4, id="B1-T2-N18-d64-hd16"),
    pytest.param(1, 2, 18, 128, 1, id="B1-T2-N18-d128-hd128"),
]


@needs_kernels
@pytest.mark.parametrize("ln", [True, False], ids=["layernorm", "no-layernorm"])
@pytest.mark.parametrize("b,t,n,d,heads", SHAPES)
def test_fp32_matches_reference(b, t, n, d, heads, ln):
    args = make_inputs(b, t, n, d, ln=ln)
    grad_out = torch.randn(b * t, n, d, device=DEV)
    got = run(args, t, heads, "triton", grad_out)
    ref = run(args, t, heads, "reference", grad_out)
    assert_all_close(got, ref, rtol=2e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("ln", [True, False], ids=["layernorm", "no-layernorm"])
@pytest.mark.parametrize("b,t,n,d,heads", [SHAPES[0], SHAPES[1], SHAPES[3]])
def test_fp16_within_twice_eager_error(b, t, n, d, heads, ln):
    """flash-attention's rule: error vs an fp32 reference at most 2x eager fp16's (+ small atol)."""
    args16 = make_inputs(b, t, n, d, ln=ln, dtype=torch.float16)
    args32 = [None if a is None else a.float() for a in args16]
    grad16 = torch.randn(b * t, n, d, device=DEV).half()
    exact = run(args32, t, heads, "reference", grad16.float())
    eager = run(args16, t, heads, "reference", grad16)
    fused = run(args16, t, heads, "triton", grad16)
    for name, f, e, x in zip(("out",) + NAMES, fused, eager, exact):
        if x is None:
            assert f is None
            continue
        assert f.dtype == torch.float16
        atol = 1e-4 * x.abs().max().item()
        assert max_err(f, x) <= 2 * max_err(e, x) + atol, \
            f"{name}: fused fp16 error {max_err(f, x):.3g}, eager fp16 error {max_err(e, x):.3g}"


@needs_kernels
def test_cls_gradient_reaches_only_source_channels():
    """d out / d c: frame t's first half feeds frame t-1, its second half frame t+1."""
    b, t, n, d, heads = 1, 3, 8, 64, 1
    args = make_inputs(b, t, n, d)
    c = args[1].clone().requires_grad_()
    out = vpeft_kernels.token_shift_attention(args[0], c, *args[2:], num_frames=t, num_heads=heads,
                                              backend="triton")
    out[1].sum().backward()  # only frame 1's output: reads frame 2's [0, d/2) and frame 0's [d/2, d)
    g = c.grad
    assert torch.count_nonzero(g[0, : d // 2]) == 0 and torch.count_nonzero(g[0, d // 2:]) > 0
    assert torch.count_nonzero(g[1]) == 0
    assert torch.count_nonzero(g[2, : d // 2]) > 0 and torch.count_nonzero(g[2, d // 2:]) == 0


@needs_kernels
def test_saves_only_flash_attention_set():
    """Nothing with N+1 tokens and no N x N matrix is kept for the backward pass."""
    b, t, n, d, heads = 1, 2, 20, 128, 2
    args = [None if a is None else a.requires_grad_() for a in make_inputs(b, t, n, d)]
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        vpeft_kernels.token_shift_attention(*args, num_frames=t, num_heads=heads, backend="triton")
    shapes = sorted(tuple(x.shape) for x in saved)
    bt = b * t
    inputs = sorted(tuple(a.shape) for a in args if a is not None and a.dim() and a is not args[6] and a is not args[8])
    expected = sorted(inputs + [(bt, n, 3 * d), (bt, n, d), (bt, heads, n), (bt, 2 * d)])
    assert shapes == expected
    # and the extra bytes over the op's own inputs are flash-attention's q, k, v, o, lse + kv_cls
    extra = sum(x.numel() * x.element_size() for x in saved if not any(x is a for a in args))
    assert extra == 4 * (bt * n * 3 * d + bt * n * d + bt * heads * n + bt * 2 * d)


@needs_kernels
def test_does_not_write_into_inputs_and_takes_noncontiguous():
    b, t, n, d, heads = 1, 2, 12, 64, 1
    args = make_inputs(b, t, n, d)
    s_t = args[0].transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not s_t.is_contiguous()
    args[0] = s_t
    before = [None if a is None else a.clone() for a in args]
    out = vpeft_kernels.token_shift_attention(*args, num_frames=t, num_heads=heads, backend="triton")
    ref = reference.token_shift_attention(*before, num_frames=t, num_heads=heads)
    assert max_err(out, ref) < 1e-5
    for a, a0 in zip(args, before):
        if a is not None:
            assert torch.equal(a, a0)


@needs_kernels
def test_partial_requires_grad_and_noncontiguous_grad():
    """Only s and w_qkv trainable, and an upstream gradient that is an expanded view."""
    b, t, n, d, heads = 1, 3, 10, 64, 1
    args = make_inputs(b, t, n, d)
    grad_row = torch.randn(1, n, d, device=DEV)
    grads = []
    for backend in ("triton", "eager"):
        leaves = [a.clone() for a in args]
        leaves[0].requires_grad_()
        leaves[5].requires_grad_()
        out = vpeft_kernels.token_shift_attention(*leaves, num_frames=t, num_heads=heads, backend=backend)
        out.backward(grad_row.expand(b * t, n, d))
        assert all(a.grad is None for i, a in enumerate(leaves) if i not in (0, 5))
        grads.append((leaves[0].grad, leaves[5].grad))
    for x, y in zip(*grads):
        assert max_err(x, y) <= 1e-5 * (1 + y.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("ln", [True, False], ids=["layernorm", "no-layernorm"])
def test_opcheck(ln):
    b, t, n, d, heads = 1, 2, 9, 64, 1
    args = [None if a is None else a.requires_grad_() for a in make_inputs(b, t, n, d, ln=ln)]
    torch.library.opcheck(torch.ops.vpeft.token_shift_attention_fwd.default,
                          tuple(args) + (t, heads, 1e-5))
    with torch.no_grad():
        out, qkv, o, lse, kv_cls = torch.ops.vpeft.token_shift_attention_fwd(*args, t, heads, 1e-5)
    saved = [a.detach() if a is not None else None for a in args]
    torch.library.opcheck(torch.ops.vpeft.token_shift_attention_bwd.default,
                          (torch.randn_like(out), saved[0], saved[1], saved[2], saved[3], saved[4],
                           saved[5], saved[7], qkv, o, lse, kv_cls, t, heads, 1e-5))


@needs_kernels
def test_torch_compile_fullgraph():
    """One opaque custom op under Dynamo + Inductor, forward and backward (a few s on CPU)."""
    b, t, n, d, heads = 1, 2, 20, 64, 1
    args = make_inputs(b, t, n, d)
    grad_out = torch.randn(b * t, n, d, device=DEV)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(*a):
        return vpeft_kernels.token_shift_attention(*a, num_frames=t, num_heads=heads, backend="triton")

    leaves = [a.clone().requires_grad_() for a in args]
    out = step(*leaves)
    out.backward(grad_out)
    got = [out.detach()] + [a.grad for a in leaves]
    ref = run(args, t, heads, "reference", grad_out)
    assert_all_close(got, ref, rtol=2e-5, atol=1e-5, what="compiled ")


def test_public_name_is_the_function():
    """Importing the submodule must not shadow the public op of the same name."""
    assert callable(vpeft_kernels.token_shift_attention)
    assert vpeft_kernels.backend_status()["triton"].startswith("available")


def test_dispatch_reasons_on_cpu():
    args = make_inputs(1, 2, 8, 64, device="cpu")
    kw = dict(num_frames=2, num_heads=1)
    # auto never sends CPU tensors to the interpreter
    assert chosen_backend("token_shift_attention", "auto", *args, **kw) == "eager"
    if not INTERPRET:
        why = not_supported_reasons("token_shift_attention", *args, **kw)["triton"]
        assert any("TRITON_INTERPRET" in w for w in why)
        return
    bf = [a.bfloat16() for a in args]
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        vpeft_kernels.token_shift_attention(*bf, **kw, backend="triton")
    odd = make_inputs(1, 2, 8, 96, device="cpu")
    why = not_supported_reasons("token_shift_attention", *odd, num_frames=2, num_heads=2)["triton"]
    assert any("head dim 48" in w for w in why)
    mixed = list(args)
    mixed[5] = mixed[5].half()
    why = not_supported_reasons("token_shift_attention", *mixed, **kw)["triton"]
    assert any("one dtype" in w for w in why)
    mixed[5] = mixed[5].double()
    why = not_supported_reasons("token_shift_attention", *mixed, **kw)["triton"]
    assert any("float64" in w and "not supported" in w for w in why)


def test_every_gpu_head_dim_has_configs():
    """Each supported head dim has fwd and bwd GPU configs in fp32 and 16-bit (the sm_90
    check compiles them), and only fp32 at head dim 128 takes the split-dq backward."""
    import importlib
    tsa = importlib.import_module("vpeft_kernels.token_shift_attention")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for hd in tsa.SUPPORTED_HEAD_DIMS:
            assert tsa._gpu_table("fwd", dtype, hd) and tsa._gpu_table("bwd", dtype, hd), (dtype, hd)
            assert tsa._split_dq(dtype, hd) == (dtype == torch.float32 and hd == 128)


@needs_kernels
def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast the inputs are cast to its dtype; gradients come back in the inputs' dtypes."""
    b, t, n, d, heads = 1, 2, 12, 64, 1
    device_type = "cuda" if CUDA else "cpu"
    amp = torch.bfloat16 if CUDA else torch.float16  # bf16 is wrong in the CPU interpreter
    args = make_inputs(b, t, n, d)
    grad = torch.randn(b * t, n, d, device=DEV)
    leaves = [a.clone().requires_grad_() for a in args]
    with torch.autocast(device_type, dtype=amp):
        assert chosen_backend("token_shift_attention", "triton", *leaves, num_frames=t, num_heads=heads) == "triton"
        out = vpeft_kernels.token_shift_attention(*leaves, num_frames=t, num_heads=heads, backend="triton")
    out.backward(grad.to(amp))
    low = run([a.to(amp) for a in args], t, heads, "triton", grad.to(amp))
    assert out.dtype == amp and torch.equal(out.detach(), low[0])
    for a, g_low in zip(leaves, low[1:]):
        assert a.grad.dtype == torch.float32 and torch.equal(a.grad, g_low.float())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (auto picks triton only for CUDA tensors)")
def test_auto_picks_triton_on_cuda():
    args = make_inputs(1, 2, 8, 64, device="cuda")
    assert chosen_backend("token_shift_attention", "auto", *args, num_frames=2, num_heads=1) == "triton"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: bf16 is computed wrongly by Triton's CPU interpreter, "
                    "and Side4Video-sized shapes are too slow for it")
@pytest.mark.parametrize("ln", [True, False], ids=["layernorm", "no-layernorm"])
@pytest.mark.parametrize("b,t,n,d,heads", [(2, 8, 196, 320, 5), (1, 3, 257, 128, 2), (2, 1, 50, 192, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_within_twice_eager_error(b, t, n, d, heads, ln, dtype):
    args = make_inputs(b, t, n, d, ln=ln, dtype=dtype, device="cuda")
    args32 = [None if a is None else a.float() for a in args]
    grad = torch.randn(b * t, n, d, device="cuda").to(dtype)
    exact = run(args32, t, heads, "reference", grad.float())
    eager = run(args, t, heads, "reference", grad)
    fused = run(args, t, heads, "triton", grad)
    for name, f, e, x in zip(("out",) + NAMES, fused, eager, exact):
        if x is None:
            continue
        atol = 2e-3 * x.abs().max().item()
        assert max_err(f, x) <= 2 * max_err(e, x) + atol, \
            f"{name}: fused error {max_err(f, x):.3g}, eager error {max_err(e, x):.3g}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_fp32_matches_reference():
    args = make_inputs(2, 4, 196, 192, device="cuda")
    grad = torch.randn(8, 196, 192, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    got = run(args, 4, 3, "triton", grad)
    ref = run(args, 4, 3, "reference", grad)
    assert_all_close(got, ref, rtol=1e-4, atol=1e-5)
