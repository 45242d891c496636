"""The compiled ladder projection (csrc/, backend "extension") against the eager reference.

CPU kernels only here (CUDA kernels are compile-checked by scripts/check_cuda_compile.sh
and need a GPU to run). If the extension is not built these tests skip with the loader's
reason, except test_extension_is_built, which fails when VPEFT_REQUIRE_EXTENSION=1 (CI).
"""
import os

import pytest
import torch

import vpeft_kernels as vk
from vpeft_kernels import _extension, reference

STATUS = vk.extension_status()
needs_ext = pytest.mark.skipif(not STATUS["available"], reason=f"ladder extension not available: {STATUS['summary']}")

# Odd sizes on purpose: M = 3 * 5 rows, D = 37, d = 19.
LEAD, D, DOUT = (3, 5), 37, 19


def _inputs(levels, norm, dtype=torch.float32, lead=LEAD, dim=D, dout=DOUT, stacked=False, grad=True):
    n_ln = dim if norm == "pre" else dout
    g = torch.Generator().manual_seed(levels * 7 + (norm == "post"))

    def r(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
        return t.requires_grad_(grad)

    if stacked:
        z = r(levels, *lead, dim, shift=0.5)
    else:
        z = [r(*lead, dim, shift=0.5) for _ in range(levels)]
    return (z, r(levels, n_ln, scale=0.5, shift=1.0), r(levels, n_ln, scale=0.5),
            r(levels, dout, dim, scale=dim ** -0.5), r(levels, dout, scale=0.1))


def _leaves(args):
    z = args[0]
    return (list(z) if isinstance(z, list) else [z]) + list(args[1:])


def _run(args, norm, backend):
    out = vk.ladder_projection(*args, norm=norm, backend=backend)
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, _leaves(args), gout)
    return out, grads


def test_extension_is_built():
    """CI sets VPEFT_REQUIRE_EXTENSION=1: there a missing or mismatched build is a failure."""
    if os.environ.get("VPEFT_REQUIRE_EXTENSION") == "1":
        assert STATUS["available"], f"VPEFT_REQUIRE_EXTENSION=1 but: {STATUS['summary']}"
    elif not STATUS["available"]:
        pytest.skip(f"ladder extension not available: {STATUS['summary']}")
    assert STATUS["build"]["torch"] == torch.__version__
    assert "available" in vk.backend_status()["extension"]


@needs_ext
@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("levels", [1, 32])
def test_matches_reference_fp32(norm, levels):
    args = _inputs(levels, norm)
    assert vk.chosen_backend("ladder_projection", None, *args, norm=norm) == "extension"
    out, grads = _run(args, norm, "extension")
    ref_out, ref_grads = _run(args, norm, "eager")
    assert out.shape == (levels, *LEAD, DOUT)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    names = [f"z[{i}]" for i in range(levels)] + ["ln_weight", "ln_bias", "w_proj", "b_proj"]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@needs_ext
@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("levels", [1, 3])
def test_gradcheck_fp64(norm, levels):
    args = _inputs(levels, norm, torch.float64, lead=(3,), dim=7, dout=5)

    def f(*flat):
        z, rest = list(flat[:levels]), flat[levels:]
        return vk.ladder_projection(z, *rest, norm=norm, backend="extension")

    assert torch.autograd.gradcheck(f, tuple(_leaves(args)), eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_fp64_forward_l32_odd(norm):
    args = _inputs(32, norm, torch.float64, grad=False)
    out = vk.ladder_projection(*args, norm=norm, backend="extension")
    torch.testing.assert_close(out, reference.ladder_projection(*args, norm=norm), rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_stacked_input_and_weights_only(norm):
    """A stacked (L, ..., D) z is read in place; frozen features (no grad on z) skip the
    input gradient and still give every parameter gradient."""
    args = _inputs(4, norm, stacked=True)
    out, grads = _run(args, norm, "extension")
    ref_out, ref_grads = _run(args, norm, "eager")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    frozen = (args[0].detach(),) + args[1:]
    out = vk.ladder_projection(*frozen, norm=norm, backend="extension")
    p_grads = torch.autograd.grad(out, list(args[1:]), torch.ones_like(out))
    p_ref = torch.autograd.grad(reference.ladder_projection(*frozen, norm=norm), list(args[1:]), torch.ones_like(out))
    for a, b in zip(p_grads, p_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _error_vs_fp64(args, norm, dtype, backend, frozen=False, device="cpu"):
    """Output and gradients (z unless frozen, then every parameter) of ``backend`` run in
    ``dtype`` on ``args`` (fp64 tensors holding ``dtype``-representable values), as fp64."""
    def cast(t, grad):
        return t.detach().to(device, dtype).requires_grad_(grad)

    z = args[0]
    z = cast(z, not frozen) if isinstance(z, torch.Tensor) else [cast(t, not frozen) for t in z]
    params = [cast(p, True) for p in args[1:]]
    out = vk.ladder_projection(z, *params, norm=norm, backend=backend)
    g = torch.Generator().manual_seed(3)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device, dtype)
    leaves = ([] if frozen else (list(z) if isinstance(z, list) else [z])) + params
    return [out.double().cpu()] + [t.double().cpu() for t in torch.autograd.grad(out, leaves, gout)]


# Large-mean inputs: z has mean 40, std 1 (mean >> std), where folding the LayerNorm into the
# GEMM (out = rstd * (z Wg^T - mean * s) + c) would cancel catastrophically in a 16-bit
# GEMM output if the mean were not taken out in fp32.
def _check_large_mean(norm, dtype, layout, frozen, device="cpu", lead=(4, 9), dim=37, dout=19):
    base = _inputs(3, norm, torch.float64, lead=lead, dim=dim, dout=dout, stacked=layout == "stacked",
                   grad=False)

    def rounded(t, shift=0.0):  # the inputs every run sees: dtype-representable values
        return (t + shift).to(dtype).double()

    z = rounded(base[0], 40.0) if layout == "stacked" else [rounded(t, 40.0) for t in base[0]]
    args = (z,) + tuple(rounded(p) for p in base[1:])
    ref = _error_vs_fp64(args, norm, torch.float64, "eager", frozen)
    ext = _error_vs_fp64(args, norm, dtype, "extension", frozen, device)
    eag = _error_vs_fp64(args, norm, dtype, "eager", frozen, device)
    floor = 2e-4 if dtype == torch.float32 else 2e-3
    names = ["out"] + ([] if frozen else ["z"]) + ["ln_weight", "ln_bias", "w_proj", "b_proj"]
    for name, r, x, e in zip(names, ref, ext, eag):
        assert x.shape == r.shape, name
        scale = r.abs().max().item()
        err_x = (x - r).abs().max().item()
        err_e = (e - r).abs().max().item()
        assert err_x <= 2 * err_e + floor * scale, f"{name}: extension {err_x:.3g} vs eager {err_e:.3g} (scale {scale:.3g})"


@needs_ext
@pytest.mark.parametrize("layout", ["list", "stacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("frozen", [False, True], ids=["grad-z", "frozen-z"])
def test_large_mean_every_gradient_vs_eager(norm, dtype, layout, frozen):
    """Output and every gradient (z, ln_weight, ln_bias, w_proj, b_proj) against an fp64
    reference on the same rounded inputs: the extension's error is at most twice eager's
    in the same dtype (plus a small floor). Odd D, 3 levels, z as a list of level tensors
    or as one strided (L, ..., D) block."""
    _check_large_mean(norm, dtype, layout, frozen)


@needs_ext
@pytest.mark.skipif(not torch.cuda.is_available() or not STATUS["cuda"],
                    reason="needs a GPU and the CUDA kernels of the extension")
@pytest.mark.parametrize("dim", [768, 771])  # 16-byte accesses / element by element
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_cuda_large_mean_vs_eager(norm, dim):
    """The CUDA kernels: several 256-row chunks per level (column sums across blocks)."""
    _check_large_mean(norm, torch.bfloat16, "list", False, device="cuda", lead=(3, 197), dim=dim, dout=320)


@needs_ext
@pytest.mark.parametrize("layout", ["list", "stacked"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_saved_for_backward_is_inputs_plus_stats(norm, layout):
    """Autograd keeps z itself (the caller's storage), the parameters and the (L, M) fp32
    statistics, nothing else: no (L, M, D) normalised copy (pre norm) and no (L, M, d)
    Linear output (post norm). Counted with saved_tensors_hooks, byte for byte."""
    levels, lead, dim, dout = 4, (6, 11), 48, 16
    rows = 6 * 11

    def saved(backend):
        args = _inputs(levels, norm, lead=lead, dim=dim, dout=dout, stacked=layout == "stacked")
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            vk.ladder_projection(*args, norm=norm, backend=backend)
        return kept, args

    kept, args = saved("extension")
    storages = {t.untyped_storage().data_ptr() for t in _leaves(args)}
    stats = [t for t in kept if t.untyped_storage().data_ptr() not in storages]
    assert all(t.shape == (levels, rows) and t.dtype == torch.float32 for t in stats), \
        [(tuple(t.shape), t.dtype) for t in stats]
    assert len(stats) == 2  # mean and rstd
    z_bytes = sum(t.numel() * t.element_size() for t in _leaves(args)[:1 if layout == "stacked" else levels])
    params = sum(t.numel() * t.element_size() for t in args[1:])
    total = sum(t.numel() * t.element_size() for t in kept)
    assert total == z_bytes + params + 2 * levels * rows * 4
    eager, _ = saved("eager")
    big = (levels * rows * (dim if norm == "pre" else dout)) * 4  # what the extension does not keep
    assert sum(t.numel() * t.element_size() for t in eager) >= total + big - 2 * levels * rows * 4


@needs_ext
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_opcheck(norm):
    args = _inputs(3, norm, lead=(2, 3), dim=9, dout=7)
    z = list(args[0])  # (..., D) level tensors, as the op takes them
    op_args = (z,) + tuple(args[1:]) + (norm == "post", 1e-5)
    torch.library.opcheck(torch.ops.vpeft_ext.ladder_forward.default, op_args)
    out, mean, rstd = torch.ops.vpeft_ext.ladder_forward(*op_args)
    det = [t.detach() for t in z]
    params = [t.detach() for t in args[1:]]
    for input_grad in (True, False):
        torch.library.opcheck(torch.ops.vpeft_ext.ladder_backward.default,
                              (torch.randn_like(out), det, *params, mean, rstd, norm == "post", 1e-5, input_grad))


@needs_ext
def test_torch_compile_fullgraph():
    args = _inputs(3, "pre", lead=(2, 5), dim=16, dout=8)

    def f(z, lw, lb, w, b):
        return vk.ladder_projection(z, lw, lb, w, b, norm="pre", backend="extension").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, _leaves(args))
    ref_grads = torch.autograd.grad(f(*args), _leaves(args))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@needs_ext
@pytest.mark.slow
def test_torch_compile_inductor_backend_auto():
    """Default torch.compile (inductor), backend chosen by auto inside the compiled region."""
    args = _inputs(2, "post", lead=(10,), dim=16, dout=8)

    def f(z, lw, lb, w, b):
        return vk.ladder_projection(z, lw, lb, w, b, norm="post").square().sum()

    loss = torch.compile(f, fullgraph=True)(*args)
    grads = torch.autograd.grad(loss, _leaves(args))
    ref_grads = torch.autograd.grad(reference.ladder_projection(*args, norm="post").square().sum(), _leaves(args))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_ext
def test_backend_reasons():
    args = _inputs(2, "pre", grad=False)
    ints = ([t.to(torch.int32) for t in args[0]],) + tuple(p.to(torch.int32) for p in args[1:])
    assert any("dtype" in r for r in vk.not_supported_reasons("ladder_projection", *ints, norm="pre")["extension"])
    mixed = (args[0],) + tuple(p.double() for p in args[1:])
    reasons = vk.not_supported_reasons("ladder_projection", *mixed, norm="pre")["extension"]
    assert any("one dtype" in r for r in reasons)
    # auto falls back to eager for what the extension can't take
    assert vk.chosen_backend("ladder_projection", None, *mixed, norm="pre") == "eager"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast numerics: auto stays eager
        assert vk.chosen_backend("ladder_projection", None, *args, norm="pre") == "eager"
        assert vk.chosen_backend("ladder_projection", "extension", *args, norm="pre") == "extension"
    meta = ([t.to("meta") for t in args[0]],) + tuple(p.to("meta") for p in args[1:])
    assert any("device" in r for r in vk.not_supported_reasons("ladder_projection", *meta, norm="pre")["extension"])


def test_mismatched_build_is_refused_with_one_line_reason():
    running = {"torch": "2.15.0+cu132", "torch_cuda": "13.2"}
    why = _extension.mismatch({"torch": "2.14.0+cu128", "torch_cuda": "12.8"}, running)
    assert why.startswith("built for torch 2.14.0+cu128 / CUDA 12.8, running torch 2.15.0+cu132 / CUDA 13.2")
    assert "\n" not in why
    assert _extension.mismatch(dict(running), running) is None
    assert _extension.mismatch({"torch": "2.15.0+cu132", "torch_cuda": None}, running) is not None


def test_build_record_is_read_without_loading(tmp_path):
    lib = tmp_path / "fake.so"
    lib.write_bytes(b"\x7fELF junk" + _extension.MARKER + b'{"torch": "1.0", "torch_cuda": null}\x00 tail')
    assert _extension.read_build_info(str(lib)) == {"torch": "1.0", "torch_cuda": None}
    (tmp_path / "bare.so").write_bytes(b"nothing here")
    assert _extension.read_build_info(str(tmp_path / "bare.so")) is None
