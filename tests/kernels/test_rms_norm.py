"""add_rms_norm (the residual add + RMSNorm between blocks) and the training norm against the model's
ops (their PyTorch references), forward and backward; the decode step's custom ops.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import pytest
import torch
from hf_mamba.kernels import add_rms_norm, add_rms_norm_ref
from hf_mamba.kernels.rms_norm import rms_norm, rms_norm_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CASES = [
    # (residual dtype, delta dtype, weight dtype, hidden_size)
    pytest.param(torch.float32, torch.float32, torch.float32, 64, id="fp32-64"),
    pytest.param(torch.float32, torch.bfloat16, torch.bfloat16, 96, id="fp32-residual-bf16-model-96"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, 100, id="bf16-residual-100"),
    pytest.param(torch.float32, torch.float16, torch.float16, 33, id="fp32-residual-fp16-model-33"),
]


@pytest.mark.parametrize("res_dtype, delta_dtype, w_dtype, hidden_size", CASES)
def test_add_rms_norm_matches_the_model_ops(res_dtype, delta_dtype, w_dtype, hidden_size, nan_fill_empty):
    torch.manual_seed(0)
    residual = torch.randn(3, 1, hidden_size, device=DEVICE).to(res_dtype)
    delta = torch.randn(3, 1, hidden_size, device=DEVICE).to(delta_dtype)
    weight = (1 + 0.1 * torch.randn(hidden_size, device=DEVICE)).to(w_dtype)
    hidden, normed = add_rms_norm(residual, delta, weight, 1e-5, backend="triton")
    hidden_ref, normed_ref = add_rms_norm_ref(residual, delta, weight, 1e-5)
    assert hidden.dtype == hidden_ref.dtype and normed.dtype == normed_ref.dtype == w_dtype
    # One fp32 add, rounded once: exact in fp32; in 2-byte dtypes within one unit in the last place (the
    # Triton interpreter rounds fp32 -> bf16 towards zero, PyTorch to nearest).
    hidden_tol = 0 if hidden.dtype == torch.float32 else 8e-3
    torch.testing.assert_close(hidden, hidden_ref, rtol=hidden_tol, atol=hidden_tol)
    # fp32: rsqrt rounding; 2-byte dtypes: a unit in the last place of the sum and of the normalised value.
    tol = 1e-6 if w_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(normed.float(), normed_ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("res_dtype", [torch.float32, torch.float16], ids=["fp32-residual", "fp16-residual"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
# the comparison run adds an inf on purpose (the product rounded to fp16 first), and the interpreter's numpy
# says so when the row's norm multiplies it
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_add_rms_norm_multiplies_delta_by_its_scale(res_dtype, backend, nan_fill_empty):
    """delta_scale (an fp16 out_proj's output still to be multiplied by its power of two per token): the sum is
    what adding the multiplied output gives, bit for bit, where that product fits fp16 or the stream is fp32
    (a power of two times an fp16 value is exact in fp32); past fp16's range an fp16 stream gets the one
    rounding of the fp32 sum, where the product rounded to fp16 first would be inf."""
    torch.manual_seed(0)
    hidden_size = 40
    residual = torch.randn(4, 1, hidden_size, device=DEVICE).mul(30).to(res_dtype)
    delta = torch.randn(4, 1, hidden_size, device=DEVICE).half()
    delta[3] *= 0.25  # whatever the device's random numbers, |delta| 2^15 stays under 65504 in row 3 but at [3, 0, 0]
    scale = torch.tensor([1.0, 4.0, 2.0**10, 2.0**15], device=DEVICE)[:, None, None]
    delta[3, 0, 0], residual[3, 0, 0] = 2.5, -30000.0  # 2.5 * 2^15 = 81920 is past 65504, the sum is not
    weight = (1 + 0.1 * torch.randn(hidden_size, device=DEVICE)).half()
    hidden, normed = add_rms_norm(residual, delta, weight, 1e-5, backend=backend, delta_scale=scale)
    multiplied = delta * scale  # fp32
    if res_dtype == torch.float16:
        multiplied = multiplied.half()
    hidden_then, normed_then = add_rms_norm(residual, multiplied, weight, 1e-5, backend=backend)
    assert hidden.dtype == hidden_then.dtype == res_dtype and normed.dtype == torch.float16
    fits = slice(None) if res_dtype == torch.float32 else slice(0, 3)
    assert torch.equal(hidden[fits], hidden_then[fits]) and torch.equal(normed[fits], normed_then[fits])
    if res_dtype == torch.float16:
        assert torch.isinf(hidden_then[3]).any()  # the product rounded to fp16 first
        assert torch.equal(hidden[3], (residual[3].float() + delta[3].float() * 2.0**15).half())
        assert torch.isfinite(hidden).all() and torch.isfinite(normed).all()
    with pytest.raises(ValueError, match=r"delta_scale must have shape \(4, 1, 1\)"):
        add_rms_norm(residual, delta, weight, 1e-5, backend=backend, delta_scale=scale[:, 0])


TRAIN_CASES = [
    # (input dtype, weight dtype, hidden_size, rows): rows past 4 programs per multiprocessor make each
    # program loop over several rows, the last one partly
    pytest.param(torch.float32, torch.float32, 64, 7, id="fp32-64"),
    pytest.param(torch.bfloat16, torch.float32, 96, dict(cpu=41, gpu=1100), id="bf16-input-fp32-weight-96-many-rows"),
    pytest.param(torch.bfloat16, torch.bfloat16, 100, 9, id="bf16-100"),
    pytest.param(torch.float16, torch.float32, 33, 5, id="fp16-input-33"),
    pytest.param(torch.float32, torch.float32, 16, 0, id="no-rows"),
]


@pytest.mark.parametrize("in_dtype, w_dtype, hidden_size, rows", TRAIN_CASES)
def test_training_rms_norm_matches_the_model_ops(in_dtype, w_dtype, hidden_size, rows, nan_fill_empty):
    """The training norm's forward, dx and dweight against autograd through the model's PyTorch ops
    (rms_norm_ref), as MambaRMSNorm calls it: x upcast to fp32."""
    from hf_mamba.kernels.rms_norm.triton_rms_norm import rms_norm_train_triton

    if isinstance(rows, dict):  # the interpreter has 4 "multiprocessors", an H200 132
        rows = rows["gpu" if DEVICE.type == "cuda" else "cpu"]
    torch.manual_seed(0)
    x = torch.randn(rows, hidden_size, device=DEVICE).to(in_dtype).float()
    weight = (1 + 0.1 * torch.randn(hidden_size, device=DEVICE)).to(w_dtype)
    grad = torch.randn(rows, hidden_size, device=DEVICE).to(torch.promote_types(w_dtype, in_dtype))
    results = []
    for fn in (rms_norm_train_triton, rms_norm_ref):
        x_, w_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(x_, w_, 1e-5, in_dtype)
        out.backward(grad)
        results.append((out, x_.grad, w_.grad))
    (out, dx, dw), (out_ref, dx_ref, dw_ref) = results
    assert out.dtype == out_ref.dtype and dx.dtype == torch.float32 and dw.dtype == w_dtype
    # fp32: rsqrt and summation order. 16-bit roundings: a unit in the last place (the interpreter
    # rounds towards zero, PyTorch to nearest), and dweight's products rounded before the sum there.
    tol = 2e-5 if in_dtype == w_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), out_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dw.float(), dw_ref.float(), rtol=tol, atol=tol * rows ** 0.5)


NO_GRAD_CASES = [
    # (input dtype, weight dtype, hidden_size, leading shape): a decode step's (batch, 1) rows, a prefill's
    pytest.param(torch.float32, torch.float32, 64, (2, 1), id="fp32-64-decode"),
    pytest.param(torch.bfloat16, torch.bfloat16, 100, (3, 1), id="bf16-100-decode"),
    pytest.param(torch.bfloat16, torch.float32, 96, (2, 7), id="bf16-input-fp32-weight-96"),
    pytest.param(torch.float16, torch.float16, 33, (1, 5), id="fp16-33"),
    pytest.param(torch.float32, torch.float32, 16, (0, 1), id="no-rows"),
]


@pytest.mark.parametrize("in_dtype, w_dtype, hidden_size, lead", NO_GRAD_CASES)
def test_no_grad_rms_norm_matches_the_model_ops(in_dtype, w_dtype, hidden_size, lead, monkeypatch, nan_fill_empty):
    """backend "triton" without gradients (the first block's norm of a decode step, MambaRMSNorm's call:
    x upcast to fp32): one launch of the forward kernel, the PyTorch ops' values and dtype."""
    from hf_mamba.kernels.rms_norm import triton_rms_norm

    launches = []
    launch = triton_rms_norm.launch
    monkeypatch.setattr(triton_rms_norm, "launch", lambda *a, **k: launches.append(a[0]) or launch(*a, **k))
    torch.manual_seed(1)
    x = torch.randn(*lead, hidden_size, device=DEVICE).to(in_dtype).float()
    weight = (1 + 0.1 * torch.randn(hidden_size, device=DEVICE)).to(w_dtype).requires_grad_()
    with torch.no_grad():
        out = rms_norm(x, weight, 1e-5, in_dtype, backend="triton")
    ref = rms_norm_ref(x, weight.detach(), 1e-5, in_dtype)
    assert launches == ([triton_rms_norm._rms_norm_fwd_kernel] if x.numel() else [])
    assert out.dtype == ref.dtype and out.shape == ref.shape and not out.requires_grad
    # As the training norm's forward: rsqrt's rounding, and a unit in the last place of 16-bit roundings.
    tol = 2e-5 if in_dtype == w_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


ADD_TRAIN_CASES = [
    # (residual, delta, weight dtype, out_dtype, hidden_size, rows, whether the sum has a gradient of its
    # own): the sum's gradient is the next block's residual gradient, None after the last block
    pytest.param(torch.float32, torch.float32, torch.float32, None, 64, 7, True, id="fp32"),
    pytest.param(torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, 96, dict(cpu=41, gpu=1100), True,
                 id="fp32-model-bf16-autocast-many-rows"),
    pytest.param(torch.float32, torch.bfloat16, torch.bfloat16, None, 100, 9, False, id="bf16-model-fp32-residual"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, None, 33, 5, True, id="bf16"),
    pytest.param(torch.float32, torch.float16, torch.float32, torch.float16, 40, 6, False, id="fp16-autocast"),
    pytest.param(torch.float32, torch.float32, torch.float32, None, 16, 0, True, id="no-rows"),
]


@pytest.mark.parametrize("res_dtype, delta_dtype, w_dtype, out_dtype, hidden_size, rows, sum_grad", ADD_TRAIN_CASES)
def test_training_add_rms_norm_matches_the_model_ops(
    res_dtype, delta_dtype, w_dtype, out_dtype, hidden_size, rows, sum_grad, nan_fill_empty
):
    """add_rms_norm with autograd on Triton: both outputs and the gradients of residual, delta and weight
    against autograd through the model's ops (add_rms_norm_ref)."""
    if isinstance(rows, dict):  # the interpreter has 4 "multiprocessors", an H200 132
        rows = rows["gpu" if DEVICE.type == "cuda" else "cpu"]
    torch.manual_seed(0)
    inputs = (
        torch.randn(rows, hidden_size, device=DEVICE).to(res_dtype),
        torch.randn(rows, hidden_size, device=DEVICE).to(delta_dtype),
        (1 + 0.1 * torch.randn(hidden_size, device=DEVICE)).to(w_dtype),
    )
    grad_normed = torch.randn(rows, hidden_size, device=DEVICE)
    grad_hidden = torch.randn(rows, hidden_size, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        hidden, normed = add_rms_norm(*leaves, 1e-5, backend=backend, out_dtype=out_dtype)
        loss = (normed.float() * grad_normed).sum()
        if sum_grad:
            loss = loss + (hidden.float() * grad_hidden).sum()
        loss.backward()
        results.append([hidden, normed] + [leaf.grad for leaf in leaves])
    names = ("hidden", "normed", "dresidual", "ddelta", "dweight")
    # fp32: rsqrt and summation order. 16-bit roundings: a unit in the last place (the interpreter
    # rounds towards zero, PyTorch to nearest), and dweight's products rounded before the sum there.
    tol = 2e-5 if {res_dtype, delta_dtype, w_dtype, out_dtype} <= {torch.float32, None} else 3e-2
    for name, value, ref in zip(names, *results, strict=True):
        assert value.dtype == ref.dtype, name
        atol = tol * rows**0.5 if name == "dweight" else tol
        torch.testing.assert_close(value.float(), ref.float(), rtol=tol, atol=atol, msg=name)


def test_add_rms_norm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 7), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="weight must have shape"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="out_dtype must be None or a floating-point torch.dtype"):
        add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), 1e-5, out_dtype=torch.int32)


def test_decode_step_custom_ops():
    """The decode step's ops torch.compile traces (eager mode launches their kernels directly): opcheck, and
    the same outputs and state updates as the eager launch."""
    from hf_mamba.kernels.causal_conv1d import triton_conv_update
    from hf_mamba.kernels.rms_norm import triton_rms_norm
    from hf_mamba.kernels.selective_scan import triton_state_update

    torch.manual_seed(4)
    g = dict(device=DEVICE)
    batch, d_inner, d_state, hidden = 2, 40, 8, 24
    x = torch.randn(batch, 2 * d_inner, **g)[:, :d_inner]  # strided, as in_proj's first half
    cases = [
        (triton_conv_update.causal_conv1d_update_op, triton_conv_update._conv_update,
         (x, torch.randn(batch, d_inner, 4, **g), torch.randn(d_inner, 4, **g), torch.randn(d_inner, **g), True)),
        (triton_state_update.selective_state_update_op, triton_state_update._state_update,
         (torch.randn(batch, d_inner, d_state, **g), x, torch.rand(batch, d_inner, **g),
          -torch.rand(d_inner, d_state, **g) - 0.1, torch.randn(batch, d_state, **g), torch.randn(batch, d_state, **g),
          torch.randn(d_inner, **g), torch.randn(batch, d_inner, **g), torch.randn(d_inner, **g), True)),
        (triton_rms_norm.add_rms_norm_op, triton_rms_norm._add_rms_norm,
         (torch.randn(batch, 1, hidden, **g), torch.randn(batch, 1, hidden, **g), torch.rand(hidden, **g) + 0.5, 0.1,
          torch.bfloat16)),
    ]
    for op, launch, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        op_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        eager_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        # Outputs and the inputs after the call (conv_state and state are updated in place).
        tensors = [a for a in op_args if isinstance(a, torch.Tensor)]
        eager_tensors = [a for a in eager_args if isinstance(a, torch.Tensor)]
        torch.testing.assert_close((op(*op_args), tensors), (launch(*eager_args), eager_tensors), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_function_matches_composed_ops(dtype):
    """The norm's autograd function (keeps x and 1/rms, recomputes the normalised x) against the
    composed ops it replaces: same output, same gradients; and against finite differences in fp64."""
    import torch.nn.functional as F
    from hf_mamba.kernels.rms_norm.torch_rms_norm import RMSNormFunction

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    grad = torch.randn(2, 5, 8)
    out = RMSNormFunction.apply(x, weight, 1e-6, dtype)
    ref = weight * F.rms_norm(x, (8,), eps=1e-6).to(dtype)
    assert torch.equal(out, ref)
    grads = torch.autograd.grad(out, (x, weight), grad)
    ref_grads = torch.autograd.grad(ref, (x, weight), grad)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    x64 = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6, torch.float64), (x64, w64))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_add_rms_norm_reads_the_wide_residual(backend, nan_fill_empty):
    """An fp32 residual beyond fp16's range (65504) before an fp16 norm: normalised from the fp32 sum, so the
    output is finite and equals the fp64 norm rounded to fp16, as the unfused norm gives it; the sum itself
    stays fp32. Gradients finite."""
    torch.manual_seed(0)
    hidden_size = 24
    residual = (1e5 * torch.randn(2, 3, hidden_size, device=DEVICE)).requires_grad_()
    delta = torch.randn(2, 3, hidden_size, device=DEVICE).half().requires_grad_()
    weight = (1 + 0.1 * torch.randn(hidden_size, device=DEVICE)).half().requires_grad_()
    assert residual.abs().max() > 65504
    hidden, normed = add_rms_norm(residual, delta, weight, 1e-5, backend=backend)
    assert hidden.dtype == torch.float32 and normed.dtype == torch.float16
    torch.testing.assert_close(hidden, residual + delta.float(), rtol=0, atol=0)
    x64 = (residual + delta.float()).double()
    expected = weight.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).half().double()
    torch.testing.assert_close(normed.double(), expected, rtol=2e-3, atol=2e-3)  # fp16: one rounding, two
    # The unfused norm (MambaRMSNorm's) on the same sum: the same values.
    torch.testing.assert_close(rms_norm(hidden, weight, 1e-5, torch.float16, backend), normed, rtol=2e-3, atol=2e-3)
    (normed.float().sum() + hidden.sum()).backward()
    for name, leaf in (("residual", residual), ("delta", delta), ("weight", weight)):
        assert torch.isfinite(leaf.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "shape, sizes",
    [((2, 1, 40), (8, 16, 16)), ((3, 70, 22), (6, 8, 8)), ((130, 77), (45, 16, 16))],
    ids=["decode-step", "chunk", "rows-past-one-program"],
)
def test_weightless_rms_norms_one_launch_matches_the_norms_part_by_part(shape, sizes, dtype):
    """Falcon Mamba's three norms in one kernel give weightless_rms_norm's values on each part (fp32 math, one
    rounding to x's dtype), here on a strided x (a slice of a wider tensor, as from a fused projection)."""
    from hf_mamba.kernels.rms_norm import weightless_rms_norm, weightless_rms_norms

    torch.manual_seed(1)
    wide = torch.randn(*shape[:-1], shape[-1] + 5, device=DEVICE) * 3
    x = wide[..., : shape[-1]].to(dtype)
    parts = weightless_rms_norms(x, sizes, 1e-6, backend="triton")
    refs = [weightless_rms_norm(p, 1e-6) for p in x.split(sizes, -1)]
    for part, ref in zip(parts, refs, strict=True):
        assert part.dtype == dtype and part.shape == ref.shape
        # fp32: the sums' order; 16-bit: at most one rounding step apart
        tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(part, ref, **tol)


def test_weightless_rms_norms_keeps_gradients_and_checks_sizes():
    """With gradients wanted it takes the PyTorch ops (the kernel has no backward); sizes must cover the last dim."""
    from hf_mamba.kernels.rms_norm import weightless_rms_norm, weightless_rms_norms

    x = torch.randn(4, 12, device=DEVICE, requires_grad=True)
    parts = weightless_rms_norms(x, (4, 4, 4), 1e-6, backend="triton")
    assert all(p.grad_fn is not None for p in parts)
    (grad,) = torch.autograd.grad(sum(p.sum() for p in parts), x)
    x_ref = x.detach().requires_grad_()
    (grad_ref,) = torch.autograd.grad(sum(weightless_rms_norm(p, 1e-6).sum() for p in x_ref.split(4, -1)), x_ref)
    torch.testing.assert_close(grad, grad_ref)
    with pytest.raises(ValueError, match="sum\\(sizes\\) = 11"):
        weightless_rms_norms(x.detach(), (4, 4, 3), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weightless_rms_norms_backward_kernel_matches_autograd(dtype):
    """The fused mixer's backward through Falcon Mamba's norms, in one launch in place, gives autograd's gradient of
    the norms part by part (fp32 math in both; one rounding to the gradient's dtype)."""
    from hf_mamba.kernels.rms_norm import weightless_rms_norm
    from hf_mamba.kernels.rms_norm.triton_rms_norm import weightless_rms_norms_backward_triton_

    torch.manual_seed(2)
    sizes = (10, 16, 16)
    x = (torch.randn(70, 42, device=DEVICE) * 2).to(dtype)
    grad = torch.randn(70, 42, device=DEVICE).to(dtype)
    x32 = x.float().requires_grad_()
    normed = torch.cat([weightless_rms_norm(p, 1e-6) for p in x32.split(sizes, -1)], -1)
    (expected,) = torch.autograd.grad(normed, x32, grad.float())
    weightless_rms_norms_backward_triton_(grad, x, sizes, 1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.float(), expected, **tol)
