"""The fast launch path (`hf_mamba.kernels._launch.launch`): a cached compiled kernel is reused only
for arguments Triton would specialise alike."""

import pytest
import torch
import triton
import triton.language as tl
from hf_mamba.kernels import _launch


def test_signature_separates_what_triton_specialises_on():
    sig = _launch._signature
    x = torch.zeros(64)
    # ints: == 1, divisibility by 16, 32-bit range (16 and 32 specialise alike; 1, 2 and 2^40 do not)
    assert sig((16,)) == sig((32,)) == sig((0,))
    assert len({sig((1,)), sig((2,)), sig((16,)), sig((2**40,)), sig((2**40 + 1,))}) == 5
    # bools are not ints; None, floats by value
    assert sig((True,)) != sig((1,)) and sig((False,)) != sig((0,))
    assert sig((None,)) != sig((0,)) and sig((1e-5,)) != sig((1e-6,))
    # tensors: dtype and a 16-byte aligned data pointer
    assert sig((x,)) == sig((torch.ones(8),)) == sig((x[4:],))
    assert sig((x,)) != sig((x[1:],)) and sig((x,)) != sig((x.to(torch.bfloat16),))
    assert sig((torch.nn.Parameter(x),)) == sig((x,))
    # anything else: no key, so the ordinary launch path
    assert sig((x, object())) is None


def test_trailing_values_follow_the_signature():
    def kernel(p, n, A: tl.constexpr, B: tl.constexpr = 7):
        pass

    fake = type("Fake", (), {"fn": staticmethod(kernel)})()
    assert _launch._trailing_values(fake, 2, {"A": 3, "num_warps": 4}) == (3, 7)
    assert _launch._trailing_values(fake, 2, {"B": 1, "A": 3}) == (3, 1)


@triton.jit
def _strided_copy_kernel(p_x, p_y, n, s_x, s_y, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    tl.store(p_y + o * s_y, tl.load(p_x + o * s_x, mask=m) * SCALE, mask=m)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path runs on CUDA only")
def test_fast_launch_reuses_only_matching_kernels():
    """Launches that alternate strides of 1 and 2, aligned and unaligned pointers, dtypes and
    constexprs all compute what a plain launch does; repeats reuse a cached kernel."""
    base = torch.arange(4096, device="cuda", dtype=torch.float32)
    cases = [
        (base, 1, 1, 2.0), (base[1:], 1, 1, 2.0), (base, 2, 1, 2.0), (base[3:], 2, 1, 3.0),
        (base.to(torch.bfloat16), 1, 1, 2.0), (base, 1, 16, 2.0), (base[16:], 16, 1, 2.0),
    ]
    _launch._compiled.clear()
    for _ in range(3):  # the first round fills the cache, the later ones launch from it
        for x, s_x, s_y, scale in cases:
            n = 100
            y = torch.full((n * s_y + 5,), -1.0, device="cuda", dtype=x.dtype)
            _launch.launch(
                _strided_copy_kernel, (triton.cdiv(n, 64),), x, y[1:], n, s_x, s_y, SCALE=scale, BLOCK=64
            )
            expected = torch.full_like(y, -1.0)
            expected[1:][: n * s_y : s_y] = x[: n * s_x : s_x][:n] * scale
            torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert len(_launch._compiled) == len(cases)
