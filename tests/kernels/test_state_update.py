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
