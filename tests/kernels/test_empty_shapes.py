"""Empty dimensions at the kernel entry points: batch 0, seqlen 0, no channels or no state give outputs of the
right (empty) shape and gradients of every input's shape on every backend, without launching a kernel on
them; a convolution of no taps (d_conv 0) is a ValueError naming weight. Size-one dimensions compute as usual.
"""

import pytest
import torch
import torch.nn.functional as F
from hf_mamba.kernels import (
    add_rms_norm,
    causal_conv1d,
    causal_conv1d_update,
    rms_norm,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
)

SCAN_SIZES = [
    # (batch, d_inner, seqlen, d_state)
    pytest.param(0, 4, 5, 3, id="batch-0"),
    pytest.param(2, 4, 0, 3, id="seqlen-0"),
    pytest.param(0, 4, 0, 3, id="batch-0-seqlen-0"),
    pytest.param(2, 0, 5, 3, id="d_inner-0"),
    pytest.param(2, 4, 5, 0, id="d_state-0"),
    pytest.param(1, 1, 1, 1, id="all-1"),
]


def _leaves(*tensors):
    return [t.requires_grad_() for t in tensors]


@pytest.fixture(autouse=True)
def _backend_device(request):
    """Tensors made in a test are on its backend's device: Triton runs on the GPU where there is one, else
    under the interpreter on CPU tensors."""
    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend")
    with torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"):
        yield


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("batch, d_inner, seqlen, d_state", SCAN_SIZES)
def test_scan_of_empty_dimensions(batch, d_inner, seqlen, d_state, backend):
    torch.manual_seed(0)
    u, delta, z = _leaves(*torch.randn(3, batch, d_inner, seqlen))
    B, C = _leaves(*torch.randn(2, batch, d_state, seqlen))
    A, = _leaves(-torch.rand(d_inner, d_state) - 0.1)
    D, delta_bias = _leaves(*torch.randn(2, d_inner))
    initial_state, = _leaves(torch.randn(batch, d_inner, d_state))
    args = (u, delta, A, B, C, D, z, delta_bias, True, initial_state, True)
    y, final_state = selective_scan(*args, backend=backend)
    assert y.shape == u.shape and final_state.shape == initial_state.shape
    y_ref, final_ref = selective_scan_ref(*args)  # a plain loop over the steps, empty or not
    torch.testing.assert_close((y, final_state), (y_ref, final_ref), rtol=1e-5, atol=1e-5)
    if d_state == 0:  # no state: the skip alone
        torch.testing.assert_close(y, D[:, None] * u * F.silu(z))
    (y.sum() + final_state.sum()).backward()
    # Over no steps delta, B, C and delta_bias affect nothing, and may get no gradient.
    given = dict(u=u, z=z, D=D, initial_state=initial_state)
    if seqlen:
        given.update(delta=delta, B=B, C=C, delta_bias=delta_bias)
    for name, leaf in given.items():
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "batch, d_inner, d_state", [(0, 4, 3), (2, 0, 3), (2, 4, 0)], ids=["batch-0", "d_inner-0", "d_state-0"]
)
def test_state_update_of_empty_dimensions(batch, d_inner, d_state, backend):
    torch.manual_seed(0)
    state = torch.randn(batch, d_inner, d_state)
    x, dt, z = torch.randn(3, batch, d_inner)
    D = torch.randn(d_inner)
    y = selective_state_update(state, x, dt, -torch.rand(d_inner, d_state), torch.randn(batch, d_state),
                               torch.randn(batch, d_state), D, z, torch.randn(d_inner), True, backend=backend)
    assert y.shape == x.shape
    torch.testing.assert_close(y, D * x * F.silu(z) if d_state == 0 else y.new_empty(y.shape))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "batch, d_inner, seqlen", [(0, 4, 5), (2, 4, 0), (2, 0, 5)], ids=["batch-0", "seqlen-0", "d_inner-0"]
)
def test_conv_of_empty_dimensions(batch, d_inner, seqlen, backend):
    x, = _leaves(torch.randn(batch, d_inner, seqlen))
    weight, = _leaves(torch.randn(d_inner, 4))
    bias, = _leaves(torch.randn(d_inner))
    out = causal_conv1d(x, weight, bias, "silu", backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape and bias.grad.shape == bias.shape
    update = causal_conv1d_update(torch.randn(batch, d_inner), torch.randn(batch, d_inner, 4), weight.detach(),
                                  backend=backend)
    assert update.shape == (batch, d_inner)


def test_conv_without_taps_is_a_value_error():
    with pytest.raises(ValueError, match=r"weight must have shape \(d_inner=4, d_conv >= 1\), got \(4, 0\)"):
        causal_conv1d(torch.randn(2, 4, 5), torch.randn(4, 0))
    with pytest.raises(ValueError, match=r"weight must have shape \(d_inner=4, d_conv >= 1\), got \(4, 0\)"):
        causal_conv1d_update(torch.randn(2, 4), torch.randn(2, 4, 0), torch.randn(4, 0))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", [(0, 3, 8), (2, 0, 8), (2, 3, 0)], ids=["batch-0", "seqlen-0", "hidden-0"])
def test_norms_of_empty_dimensions(shape, backend):
    residual, delta = _leaves(*torch.randn(2, *shape))
    weight, = _leaves(torch.ones(shape[-1]))
    hidden, normed = add_rms_norm(residual, delta, weight, 1e-5, backend=backend)
    single = rms_norm(residual, weight, 1e-5, torch.float32, backend)
    assert hidden.shape == normed.shape == single.shape == shape
    (hidden.sum() + normed.sum() + single.sum()).backward()
    assert residual.grad.shape == delta.grad.shape == shape and weight.grad.shape == weight.shape
