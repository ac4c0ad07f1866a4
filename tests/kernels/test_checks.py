"""The kernel entry points reject bad arguments with a ValueError naming the argument, before any kernel runs:
non-floating-point or complex tensors, tensors on two devices, shapes that do not fit."""

import pytest
import torch
from hf_mamba.kernels import (
    add_rms_norm,
    causal_conv1d,
    causal_conv1d_update,
    rms_norm,
    selective_scan,
    selective_state_update,
)
from hf_mamba.kernels.checks import check_tensors
from hf_mamba.kernels.rms_norm import weightless_rms_norms

BATCH, D_INNER, SEQLEN, D_STATE, D_CONV = 2, 8, 5, 4, 4


def scan_args(**changes):
    args = dict(
        u=torch.randn(BATCH, D_INNER, SEQLEN), delta=torch.rand(BATCH, D_INNER, SEQLEN),
        A=-torch.rand(D_INNER, D_STATE), B=torch.randn(BATCH, D_STATE, SEQLEN), C=torch.randn(BATCH, D_STATE, SEQLEN),
    )  # fmt: skip
    return {**args, **changes}


def step_args(**changes):
    args = dict(
        state=torch.zeros(BATCH, D_INNER, D_STATE), x=torch.randn(BATCH, D_INNER), dt=torch.rand(BATCH, D_INNER),
        A=-torch.rand(D_INNER, D_STATE), B=torch.randn(BATCH, D_STATE), C=torch.randn(BATCH, D_STATE),
    )  # fmt: skip
    return {**args, **changes}


CASES = [
    pytest.param(lambda: selective_scan(**scan_args(u=torch.ones(BATCH, D_INNER, SEQLEN, dtype=torch.long))),
                 "u must be a floating-point tensor", id="scan-int"),
    pytest.param(lambda: selective_scan(**scan_args(B=torch.randn(BATCH, D_STATE, SEQLEN, dtype=torch.complex64))),
                 "B must be a floating-point tensor", id="scan-complex"),
    pytest.param(lambda: selective_scan(**scan_args(delta=torch.rand(BATCH, D_INNER, SEQLEN, device="meta"))),
                 "delta is on meta but u is on cpu", id="scan-two-devices"),
    pytest.param(lambda: selective_scan(**scan_args(C=torch.randn(BATCH, D_STATE + 1, SEQLEN))),
                 r"C must have shape \(2, 4, 5\)", id="scan-shape"),
    pytest.param(lambda: selective_scan(**scan_args(), seq_idx=torch.zeros(BATCH, SEQLEN, dtype=torch.int32,
                                                                             device="meta")),
                 "seq_idx is on meta", id="scan-seq_idx-device"),
    pytest.param(lambda: selective_state_update(**step_args(state=torch.zeros(BATCH, D_INNER, D_STATE,
                                                                              dtype=torch.int32))),
                 "state must be a floating-point tensor", id="step-int-state"),
    pytest.param(lambda: selective_state_update(**step_args(A=-torch.rand(D_STATE))),
                 r"A must have shape \(d_inner, d_state\)", id="step-A-1d"),
    pytest.param(lambda: causal_conv1d(torch.randn(D_INNER, SEQLEN), torch.randn(D_INNER, D_CONV)),
                 r"x must have shape \(batch, d_inner, seqlen\)", id="conv-2d-x"),
    pytest.param(lambda: causal_conv1d(torch.randn(BATCH, D_INNER, SEQLEN), torch.randn(D_INNER + 1, D_CONV)),
                 r"weight must have shape \(d_inner=8, d_conv >= 1\)", id="conv-weight"),
    pytest.param(lambda: causal_conv1d(torch.randn(BATCH, D_INNER, SEQLEN), torch.randn(D_INNER, D_CONV),
                                       initial_state=torch.zeros(BATCH, D_INNER, D_CONV)),
                 r"initial_state must have shape \(2, 8, 3\)", id="conv-initial-state"),
    pytest.param(lambda: causal_conv1d(torch.randn(BATCH, D_INNER, SEQLEN), torch.ones(D_INNER, D_CONV,
                                                                                        dtype=torch.int64)),
                 "weight must be a floating-point tensor", id="conv-int-weight"),
    pytest.param(lambda: causal_conv1d_update(torch.randn(BATCH, D_INNER), torch.zeros(BATCH, D_INNER, D_CONV),
                                              torch.randn(D_INNER, D_CONV, device="meta")),
                 "weight is on meta but x is on cpu", id="conv-update-two-devices"),
    pytest.param(lambda: add_rms_norm(torch.ones(2, 3, 8, dtype=torch.int32), torch.ones(2, 3, 8), torch.ones(8),
                                      1e-6),
                 "residual must be a floating-point tensor", id="add-rms-norm-int"),
    pytest.param(lambda: rms_norm(torch.randn(2, 3, 8), torch.ones(7), 1e-6, torch.float32),
                 r"weight must have shape \(8,\)", id="rms-norm-weight"),
    pytest.param(lambda: rms_norm(torch.randn(2, 3, 8), torch.ones(8), -1e-6, torch.float32),
                 r"eps must be a finite number >= 0, got -1e-06", id="rms-norm-negative-eps"),
    pytest.param(lambda: add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), float("nan")),
                 "eps must be a finite number >= 0, got nan", id="add-rms-norm-nan-eps"),
    pytest.param(lambda: add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(8), None),
                 "eps must be a finite number >= 0, got None", id="add-rms-norm-no-eps"),
    pytest.param(lambda: add_rms_norm(torch.randn(2, 8), None, torch.ones(8), 1e-6),
                 "residual and delta must both be tensors", id="add-rms-norm-no-delta"),
    pytest.param(lambda: weightless_rms_norms(torch.randn(2, 12), [4, 4, 4], True),
                 "eps must be a finite number >= 0, got True", id="weightless-bool-eps"),
]  # fmt: skip


@pytest.mark.parametrize("call,message", CASES)
def test_bad_arguments_raise_a_value_error_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_check_tensors_skips_missing_and_accepts_mixed_float_dtypes():
    check_tensors(a=torch.ones(2, dtype=torch.bfloat16), b=None, c=torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="b must be a tensor"):
        check_tensors(a=torch.ones(2), b=[1.0])
