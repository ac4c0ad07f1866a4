"""The CPU fast path ("torch" backend) against the exact sequential reference, in float64 so that
any difference is a bug, not rounding: outputs, final state and every gradient."""

import pytest
import torch
from hf_mamba.kernels import selective_scan_ref
from hf_mamba.kernels.selective_scan.torch_scan import selective_scan_torch


def make_inputs(batch, d_inner, seqlen, d_state):
    def make(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_(True)

    return dict(
        u=make(batch, d_inner, seqlen),
        delta=make(batch, d_inner, seqlen, scale=0.5),
        A=(-torch.rand(d_inner, d_state, dtype=torch.float64) * 4).requires_grad_(True),
        B=make(batch, d_state, seqlen),
        C=make(batch, d_state, seqlen),
        D=make(d_inner),
        z=make(batch, d_inner, seqlen),
        delta_bias=make(d_inner),
        delta_softplus=True,
        initial_state=make(batch, d_inner, d_state),
        return_final_state=True,
    )


@pytest.mark.parametrize(
    "shape, chunk_size",
    [
        pytest.param((2, 3, 1, 4), None, id="seqlen1"),
        pytest.param((2, 5, 37, 4), None, id="one-block"),
        pytest.param((1, 3, 300, 2), None, id="several-blocks"),
        pytest.param((1, 3, 600, 2), None, id="chunked-auto"),
        pytest.param((2, 3, 45, 4), 7, id="chunked-ragged"),
        pytest.param((2, 3, 45, 4), 45, id="chunk-equals-seqlen"),
    ],
)
def test_torch_scan_matches_reference(shape, chunk_size):
    torch.manual_seed(0)
    inputs = make_inputs(*shape)
    y_ref, h_ref = selective_scan_ref(**inputs)
    grads_ref = torch.autograd.grad((y_ref.sum() + h_ref.sum()), [v for v in inputs.values() if torch.is_tensor(v)])
    y, h = selective_scan_torch(**inputs, chunk_size=chunk_size)
    grads = torch.autograd.grad((y.sum() + h.sum()), [v for v in inputs.values() if torch.is_tensor(v)])
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)
    names = [k for k, v in inputs.items() if torch.is_tensor(v)]
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-11, msg=name)


def test_torch_scan_empty_sequence_returns_initial_state():
    inputs = make_inputs(2, 3, 0, 4)
    y, h = selective_scan_torch(**inputs)
    assert y.shape == (2, 3, 0)
    torch.testing.assert_close(h, inputs["initial_state"])
