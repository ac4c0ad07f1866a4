"""The shared Triton helpers (`triton_utils`) in small kernels against PyTorch: softplus, the sigmoid and
SiLU gate, the exp2 rate, and the combine functions of the recurrence scans. The fast-math forms and
the lane primitives are inline PTX, which only a GPU runs."""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hf_mamba.kernels.triton_utils import (
    add_pair,
    lane_id,
    linear_combine,
    log1p_series,
    log2_rate,
    shfl,
    shfl_xor_code,
    sigmoid,
    silu,
    softplus,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FAST_MATH = [False, pytest.param(True, marks=pytest.mark.skipif(not CUDA, reason="inline PTX: GPU only"))]


@triton.jit
def _elementwise_kernel(p_x, p_out, n, OP: tl.constexpr, FAST_MATH: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(p_x + o, mask=m, other=0.0)
    if OP == "softplus":
        y = softplus(x, FAST_MATH)
    elif OP == "sigmoid":
        y = sigmoid(x, FAST_MATH)
    elif OP == "silu":
        y = silu(x, FAST_MATH)
    elif OP == "log1p_series":
        y = log1p_series(x)
    elif OP == "log2_rate":
        y = log2_rate(x, False)
    else:
        y = log2_rate(x, True)
    tl.store(p_out + o, y, mask=m)


@pytest.mark.parametrize("fast_math", FAST_MATH)
@pytest.mark.parametrize(
    "op,expected",
    [
        ("softplus", F.softplus),
        ("sigmoid", torch.sigmoid),
        ("silu", F.silu),
        ("log2_rate", lambda x: x * 1.4426950408889634),
        ("log2_rate_of_A_log", lambda x: -torch.exp(x) * 1.4426950408889634),
    ],
)
def test_elementwise_helpers(op, expected, fast_math):
    """Across the range the scan meets, softplus past its linear switch at 20 included."""
    x = torch.cat([torch.linspace(-30, 30, 121), torch.tensor([19.99, 20.0, 20.01])]).to(DEVICE)
    if op == "log2_rate_of_A_log":
        x = x / 10
    out = torch.empty_like(x)
    _elementwise_kernel[(1,)](x, out, x.numel(), OP=op, FAST_MATH=fast_math, BLOCK=128)
    tol = 2e-6 if not fast_math else 5e-6  # ex2 / lg2 / rcp.approx: 2^-22 relative
    torch.testing.assert_close(out, expected(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("fast_math", FAST_MATH)
def test_softplus_relative_error_over_the_whole_range(fast_math):
    """Relative to fp64 softplus, over [-100, 30]: below x = -17 where 1 + e^x rounds to 1 and log(1 + e^x)
    would be 0, around the series' switch at x = ln(1/8), and at the linear switch at 20. Outputs below
    fp32's smallest normal number (x < -87.3) to an absolute 2^-126 (ftz flushes them to 0)."""
    x = torch.cat([torch.linspace(-100, 30, 1301), torch.tensor([-2.0795, -2.0794, 19.99, 20.0, 20.01, 89.0, 1e4])])
    x = torch.cat([x, torch.tensor([float("-inf"), float("inf")])]).to(DEVICE)
    out = torch.empty_like(x)
    _elementwise_kernel[(1,)](x, out, x.numel(), OP="softplus", FAST_MATH=fast_math, BLOCK=2048)
    # On a GPU e^x is ex2.approx of x log2(e), and that product's rounding, up to |x| log2(e) 2^-24 in the
    # exponent, is the same relative error in e^x (3.8e-6 at x = -87); the interpreter's exp is exact.
    exponent_rounding = x.double().clamp(-200, 0).abs() * math.log2(math.e) * 2.0**-24 if CUDA else 0.0
    tol = (1e-6 if not fast_math else 5e-6) + exponent_rounding
    expected = F.softplus(x.double())
    excess = (out.double() - expected).abs() - (tol * expected.abs() + 2.0**-126)
    excess = torch.where(expected.isinf(), (out.double() != expected).double(), excess)  # +inf in, +inf out
    assert (excess <= 0).all(), f"softplus off at x = {x[excess.argmax()].item()}: {out[excess.argmax()].item()}"


def test_log1p_series():
    """FAST_MATH softplus's series below e = 1/8, against fp64 log1p (run under the interpreter on CPU)."""
    e = torch.cat([torch.logspace(-30, -0.9031, 200), torch.tensor([0.0, 0.125])]).to(DEVICE)
    out = torch.empty_like(e)
    _elementwise_kernel[(1,)](e, out, e.numel(), OP="log1p_series", FAST_MATH=False, BLOCK=256)
    torch.testing.assert_close(out.double(), torch.log1p(e.double()), rtol=3e-7, atol=0)


@triton.jit
def _scan_kernel(p_a, p_b, p_h, p_sums, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    a = tl.load(p_a + o)
    b = tl.load(p_b + o)
    _, h = tl.associative_scan((a, b), 0, linear_combine)
    tl.store(p_h + o, h)
    sa, sb = tl.reduce((a, b), 0, add_pair)
    tl.store(p_sums, sa)
    tl.store(p_sums + 1, sb)


def test_linear_combine_scans_the_recurrence():
    """h_t = a_t h_{t-1} + b_t from h = 0 by `tl.associative_scan`, and two sums in one `tl.reduce`."""
    torch.manual_seed(0)
    a, b = torch.rand(32, device=DEVICE), torch.randn(32, device=DEVICE)
    h, sums = torch.empty_like(a), torch.empty(2, device=DEVICE)
    _scan_kernel[(1,)](a, b, h, sums, BLOCK=32)
    expected, state = [], torch.zeros((), device=DEVICE)
    for t in range(32):
        state = a[t] * state + b[t]
        expected.append(state)
    torch.testing.assert_close(h, torch.stack(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums, torch.stack([a.sum(), b.sum()]), rtol=1e-5, atol=1e-5)


@triton.jit
def _lane_kernel(p_x, p_lane, p_out, ASM: tl.constexpr):
    o = tl.arange(0, 32)
    x = tl.load(p_x + o)
    tl.store(p_lane + o, lane_id(o))
    tl.store(p_out + o, shfl(x, ASM))


@pytest.mark.skipif(not CUDA, reason="inline PTX: GPU only")
@pytest.mark.parametrize("offset", [1, 16])
def test_lane_primitives(offset):
    """lane_id is the lane; shfl with shfl_xor_code's instruction reads the lane `offset` apart."""
    x = torch.arange(32, dtype=torch.float32, device=DEVICE)
    lanes = torch.empty(32, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(x)
    asm = shfl_xor_code("x", offset).split('"')[1]
    _lane_kernel[(1,)](x, lanes, out, ASM=asm, num_warps=1)
    assert torch.equal(lanes.cpu(), torch.arange(32, dtype=torch.int32))
    assert torch.equal(out.cpu(), (torch.arange(32) ^ offset).float())
