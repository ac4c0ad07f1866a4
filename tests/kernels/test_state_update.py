"""The decode step's Triton kernel (`triton_state_update`) against the PyTorch step."""

import pytest
import torch
from hf_mamba.kernels import selective_state_update, selective_state_update_ref
from scan_testing import DTYPES, ON_GPU, TOL, rel_err

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


STEP_CASES = [
    pytest.param(dict(shape=(2, 5, 4), D=True, z=True, bias=True, softplus=True), id="all"),
    pytest.param(dict(shape=(3, 7, 16)), id="plain"),
    pytest.param(dict(shape=(1, 10, 5), z=True, softplus=True), id="N5-z"),
    pytest.param(dict(shape=(16, 1536 if ON_GPU else 12, 16), D=True, z=True, bias=True, softplus=True), id="wide"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", STEP_CASES)
def test_triton_state_update_matches_reference(case, dtype, nan_fill_empty):
    torch.manual_seed(6)
    batch, d_inner, d_state = case["shape"]
    g = dict(device=DEVICE)
    state = torch.randn(batch, d_inner, d_state, **g)
    x, dt = torch.randn(2, batch, d_inner, **g).to(dtype)
    A = -torch.rand(d_inner, d_state, **g) - 0.1
    B = torch.randn(batch, 2 * d_state, **g).to(dtype)[:, ::2]  # strided, like slices of a projection
    C = torch.randn(batch, d_state, **g).to(dtype)
    D = torch.randn(d_inner, **g) if case.get("D") else None
    z = torch.randn(batch, d_inner, **g).to(dtype) if case.get("z") else None
    bias = torch.randn(d_inner, **g) if case.get("bias") else None
    softplus = case.get("softplus", False)
    if not softplus:
        dt = dt.abs()
    state_ref = state.clone()
    y = selective_state_update(state, x, dt, A, B, C, D, z, bias, softplus, backend="triton")
    y_ref = selective_state_update_ref(state_ref, x, dt, A, B, C, D, z, bias, softplus)
    assert y.dtype == dtype and y.shape == (batch, d_inner)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(state, state_ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_state_update_reads_A_log(backend, dtype, nan_fill_empty):
    """A_is_log=True with A_log gives the step with A = -exp(A_log): state and output. The PyTorch step
    computes A with the same op either way; the kernel computes exp in-kernel (numpy's under the interpreter,
    ex2 on a GPU) where the caller's A came from torch.exp."""
    torch.manual_seed(7)
    batch, d_inner, d_state = 2, 6, 5
    g = dict(device=DEVICE)
    state = torch.randn(batch, d_inner, d_state, **g)
    x, dt, z = torch.randn(3, batch, d_inner, **g).to(dtype)
    A_log = torch.log(torch.arange(1, d_state + 1, **g, dtype=torch.float32)).repeat(d_inner, 1)
    A_log = A_log + 0.1 * torch.randn(d_inner, d_state, **g)  # S4D-real, perturbed
    B, C = torch.randn(2, batch, d_state, **g).to(dtype)
    D, bias = torch.randn(2, d_inner, **g)
    results = []
    for A, A_is_log in ((A_log, True), (-torch.exp(A_log), False)):
        h = state.clone()
        y = selective_state_update(h, x, dt, A, B, C, D, z, bias, True, backend=backend, A_is_log=A_is_log)
        results.append((y, h))
    (y, h), (y_A, h_A) = results
    assert y.dtype == dtype and h.dtype == torch.float32
    if backend == "triton":  # exp of A_log in the kernel against torch.exp: an fp32 rounding apart
        torch.testing.assert_close(h, h_A, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y.float(), y_A.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    else:
        assert torch.equal(h, h_A) and torch.equal(y, y_A)
    h_ref = state.clone()
    y_ref = selective_state_update_ref(h_ref, x, dt, -torch.exp(A_log), B, C, D, z, bias, True)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(h, h_ref) < TOL[torch.float32]


def test_state_update_op_reads_A_log():
    """The custom op torch.compile traces takes A_is_log too: opcheck, and the eager launch's results."""
    from hf_mamba.kernels.selective_scan import triton_state_update

    torch.manual_seed(8)
    g = dict(device=DEVICE)
    batch, d_inner, d_state = 2, 6, 4
    args = (torch.randn(batch, d_inner, d_state, **g), torch.randn(batch, d_inner, **g),
            torch.rand(batch, d_inner, **g), torch.randn(d_inner, d_state, **g), torch.randn(batch, d_state, **g),
            torch.randn(batch, d_state, **g), torch.randn(d_inner, **g), torch.randn(batch, d_inner, **g),
            torch.randn(d_inner, **g), True, True)  # dt_softplus, A_is_log
    op = triton_state_update.selective_state_update_op
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    op_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    eager_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch.testing.assert_close((op(*op_args), op_args[0]), (triton_state_update._state_update(*eager_args),
                                                            eager_args[0]), rtol=0, atol=0)
