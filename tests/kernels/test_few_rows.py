"""few_rows_linear (a decode step's projections in one launch) against the exact product: on a GPU within one
rounding of the fp32 sum to the output dtype, as F.linear's; under the interpreter, which rounds fp32 to bf16
by truncation, within one unit in the last place."""

import pytest
import torch
from hf_mamba.kernels import few_rows_linear
from hf_mamba.kernels.few_rows import DEFAULT_TUNING, MAX_ROWS, FewRowsTuning, block_n
from scan_testing import DEVICE, ON_GPU


def assert_one_rounding(out, exact, dtype):
    """out is exact (float64) rounded once to dtype: within one unit in the last place of the fp32 sum, plus
    the fp32 sum's own error."""
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert out.dtype == dtype
    assert ((out.double() - exact).abs() <= ulp + 1e-5 * exact.abs().max()).all(), (out.double() - exact).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "rows,n_in,n_out,bias",
    [(1, 256, 48, False), (3, 200, 70, True), (MAX_ROWS, 384, 33, True), (5, 8, 16, False)],
    ids=["one-row", "uneven-in", "most-rows", "narrow"],
)
def test_matches_the_exact_product(rows, n_in, n_out, bias, dtype):
    torch.manual_seed(0)
    g = dict(device=DEVICE, dtype=dtype)
    x = torch.randn(rows, n_in, **g)
    weight = torch.randn(n_out, n_in, **g) / n_in**0.5
    b = torch.randn(n_out, **g) if bias else None
    exact = x.double() @ weight.double().T + (b.double() if bias else 0)
    assert_one_rounding(few_rows_linear(x, weight, b), exact, dtype)
    if ON_GPU:  # F.linear's own rounding of its fp32 sum: the same up to summation order
        torch.testing.assert_close(few_rows_linear(x, weight, b), torch.nn.functional.linear(x, weight, b))


@pytest.mark.parametrize("n_in,bias", [(256, False), (200, True)], ids=["even", "uneven-in"])
def test_one_row_on_cuda_cores_matches_the_exact_product(n_in, bias):
    """The CUDA-core variant for a single row (FewRowsTuning.one_row_fma) rounds its fp32 sum once too."""
    torch.manual_seed(2)
    g = dict(device=DEVICE, dtype=torch.bfloat16)
    x, weight = torch.randn(1, n_in, **g), torch.randn(70, n_in, **g) / n_in**0.5
    b = torch.randn(70, **g) if bias else None
    exact = x.double() @ weight.double().T + (b.double() if bias else 0)
    out = few_rows_linear(x, weight, b, tuning=FewRowsTuning(one_row_fma=True, tile_bytes=512))
    assert_one_rounding(out, exact, torch.bfloat16)


@pytest.mark.parametrize("split_k,n_in", [(2, 256), (3, 200), (4, 48)], ids=["two", "three-uneven", "short-k"])
def test_split_over_k_adds_the_parts_in_order(split_k, n_in):
    """FewRowsTuning.split_k: programs over parts of K, the last to arrive adding the parts up: one rounding
    of the fp32 sum, equal to itself call after call (the counters go back to zero), bias added once."""
    torch.manual_seed(3)
    g = dict(device=DEVICE, dtype=torch.bfloat16)
    x, weight, b = torch.randn(5, n_in, **g), torch.randn(40, n_in, **g) / n_in**0.5, torch.randn(40, **g)
    tuning = FewRowsTuning(split_k=split_k, tile_bytes=512)
    first = few_rows_linear(x, weight, b, tuning=tuning)
    assert_one_rounding(first, x.double() @ weight.double().T + b.double(), torch.bfloat16)
    assert torch.equal(few_rows_linear(x, weight, b, tuning=tuning), first)


def test_strided_rows_and_leading_dims():
    """x as a decode step hands it over: (batch, 1, in) or a strided view of a longer tensor."""
    torch.manual_seed(1)
    weight = torch.randn(40, 64, device=DEVICE, dtype=torch.bfloat16)
    tokens = torch.randn(4, 3, 64, device=DEVICE, dtype=torch.bfloat16)
    out = few_rows_linear(tokens[:, 1:2], weight)
    assert out.shape == (4, 1, 40)
    assert_one_rounding(out, tokens[:, 1:2].double() @ weight.double().T, torch.bfloat16)
    assert few_rows_linear(tokens[:0, 0], weight).shape == (0, 40)


def test_bad_arguments_name_what_was_expected():
    weight = torch.randn(8, 16, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(2, 16, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 16 rows"):
        few_rows_linear(torch.randn(MAX_ROWS + 1, 16, device=DEVICE, dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\) and dtype torch.bfloat16"):
        few_rows_linear(x.half(), weight)
    with pytest.raises(ValueError, match="weight must be a 2-d bf16 or fp16"):
        few_rows_linear(x.float(), weight.float())
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        few_rows_linear(x, weight, torch.zeros(9, device=DEVICE, dtype=torch.bfloat16))


def test_outputs_per_program_keep_the_multiprocessors_busy():
    """The widest tile that still gives two programs per multiprocessor, down to 16 outputs."""
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count if ON_GPU else 4  # the interpreter's
    assert block_n(128 * sms, DEVICE) == 64
    assert block_n(64 * sms, DEVICE) == 32
    assert block_n(8, DEVICE) == 16
    assert block_n(64 * sms, DEVICE, DEFAULT_TUNING) == 32
