"""Helpers of the selective-scan tests: inputs, the comparison with the fp32 reference, document ids.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes; on a GPU
the same cases run at larger shapes. Errors are relative: ||out - ref|| / ||ref||, with the inputs
rounded to the tested dtype first, so the reference sees exactly what the kernel sees.
"""

import pytest
import torch
from hf_mamba.kernels import selective_scan, selective_scan_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# Relative-norm tolerances: fp32 accumulation everywhere, so the error is the output's rounding.
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
FP32_BF16 = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def shape_of(case):
    """(batch, d_inner, seqlen, d_state) of a case for this device."""
    return case["gpu" if ON_GPU else "cpu"]


def make_scan_inputs(case, dtype, softplus=True, transposed_BC=True):
    """Leaves for the kernel (in `dtype`) and for the reference (the same values in fp32)."""
    batch, d_inner, seqlen, d_state = shape_of(case)
    g = dict(device=DEVICE)
    u = torch.randn(batch, d_inner, seqlen, **g)
    delta = torch.randn(batch, d_inner, seqlen, **g) * 0.5 - (0.0 if softplus else -1.0)
    if not softplus:
        delta = delta.abs()
    A = -torch.exp(torch.randn(d_inner, d_state, **g) * 0.5)
    if transposed_BC:  # what the model passes: views of (batch, seqlen, d_state)
        B = torch.randn(batch, seqlen, d_state, **g).transpose(1, 2)
        C = torch.randn(batch, seqlen, d_state, **g).transpose(1, 2)
    else:
        B = torch.randn(batch, d_state, seqlen, **g)
        C = torch.randn(batch, d_state, seqlen, **g)
    D = torch.randn(d_inner, **g) if case.get("D") else None
    z = torch.randn(batch, d_inner, seqlen, **g) if case.get("z") else None
    bias = torch.randn(d_inner, **g) * 0.5 if case.get("bias") else None
    if bias is not None and not softplus:
        bias = bias.abs()  # without softplus, delta + bias must stay >= 0 or h grows without bound
    h0 = torch.randn(batch, d_inner, d_state, **g) if case.get("h0") else None
    low = {"u": u, "delta": delta, "B": B, "C": C, "z": z}  # these take the tested dtype
    full = {"A": A, "D": D, "delta_bias": bias, "initial_state": h0}  # these stay fp32
    kernel, ref = {}, {}
    for name, t in {**low, **full}.items():
        if t is None:
            kernel[name] = ref[name] = None
            continue
        k = t.to(dtype) if name in low else t.clone()
        kernel[name] = k.detach().requires_grad_()
        ref[name] = k.detach().float().requires_grad_()
    return kernel, ref


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def triton_scan(kernel, softplus=True, return_final_state=True, seq_idx=None, tuning=None):
    """The Triton scan of make_scan_inputs' kernel leaves; with a tuning, its launch choices."""
    if tuning is None:
        return selective_scan(
            **kernel, delta_softplus=softplus, return_final_state=return_final_state, backend="triton",
            seq_idx=seq_idx,
        )
    from hf_mamba.kernels.selective_scan.triton_scan import selective_scan_triton

    k = kernel
    return selective_scan_triton(
        k["u"], k["delta"], k["A"], k["B"], k["C"], k["D"], k["z"], k["delta_bias"], softplus,
        k["initial_state"], return_final_state, seq_idx=seq_idx, tuning=tuning,
    )


def check_scan(backend, case, dtype, softplus=True, transposed_BC=True, seq_idx=None, tuning=None, inputs=None):
    """Output, final state and every gradient of the scan against the reference."""
    kernel, ref = inputs or make_scan_inputs(case, dtype, softplus, transposed_BC)
    if backend == "triton":
        out, final = triton_scan(kernel, softplus, seq_idx=seq_idx, tuning=tuning)
    else:
        out, final = selective_scan(
            **kernel, delta_softplus=softplus, return_final_state=True, backend=backend, seq_idx=seq_idx
        )
    out_ref, final_ref = selective_scan_ref(**ref, delta_softplus=softplus, return_final_state=True, seq_idx=seq_idx)
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert final.dtype == torch.float32 and final.shape == final_ref.shape
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    tol = TOL[dtype]
    assert rel_err(out, out_ref) < tol, f"out: {rel_err(out, out_ref)}"
    assert rel_err(final, final_ref) < tol, f"final state: {rel_err(final, final_ref)}"

    dout = torch.randn_like(out)
    dfinal = torch.randn_like(final)
    names = [n for n, t in kernel.items() if t is not None]
    grads = torch.autograd.grad((out * dout).sum() + (final * dfinal).sum(), [kernel[n] for n in names])
    grads_ref = torch.autograd.grad(
        (out_ref * dout.float()).sum() + (final_ref * dfinal).sum(), [ref[n] for n in names]
    )
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == kernel[name].dtype and g.shape == g_ref.shape, name
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert rel_err(g, g_ref) < tol, f"d{name}: {rel_err(g, g_ref)}"


def document_ids(batch, seqlen, n_docs, seed):
    """(batch, seqlen) int32 ids of packed documents with random boundaries (one row a single document)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(seqlen, dtype=torch.int32)]
    for _ in range(batch - 1):
        starts = torch.randperm(seqlen - 1, generator=gen)[: n_docs - 1] + 1
        row = torch.zeros(seqlen, dtype=torch.int32)
        row[starts] = 1
        rows.append(torch.cumsum(row, 0, dtype=torch.int32) + 5)  # ids need not start at 0
    return torch.stack(rows).to(DEVICE)
