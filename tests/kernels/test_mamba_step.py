"""The mixer's fused decode step (`mamba_step_triton`, two launches) against the step composed of the
PyTorch conv update, x_proj, dt_proj and the reference state update."""

import pytest
import torch
from hf_mamba.kernels import causal_conv1d_update, selective_state_update_ref, weightless_rms_norm
from hf_mamba.kernels.mamba_step import mamba_step_triton
from scan_testing import DTYPES, ON_GPU, TOL, rel_err

DEVICE = torch.device("cuda" if ON_GPU else "cpu")

CASES = [
    pytest.param(dict(batch=2, d_inner=12, d_state=4, dt_rank=3, d_conv=4), id="small"),
    # d_inner past one block of the first kernel and not a multiple of either block; x_proj's outputs past
    # one program's tile; d_state and dt_rank not powers of two
    pytest.param(dict(batch=3, d_inner=150, d_state=5, dt_rank=30, d_conv=3, conv_bias=False), id="odd"),
    pytest.param(dict(batch=1, d_inner=96, d_state=16, dt_rank=6, d_conv=4, eps=1e-6), id="falcon"),
    pytest.param(dict(batch=16, d_inner=1536 if ON_GPU else 64, d_state=16, dt_rank=48 if ON_GPU else 4, d_conv=4),
                 id="130M" if ON_GPU else "batch16"),
]


def _weights(d_inner, d_state, dt_rank, d_conv, dtype, conv_bias=True):
    g = dict(device=DEVICE)
    return dict(
        conv_weight=(0.5 * torch.randn(d_inner, d_conv, **g)).to(dtype),
        conv_bias=torch.randn(d_inner, **g).to(dtype) if conv_bias else None,
        x_proj_weight=(torch.randn(dt_rank + 2 * d_state, d_inner, **g) / d_inner**0.5).to(dtype),
        dt_proj_weight=(torch.randn(d_inner, dt_rank, **g) / dt_rank**0.5).to(dtype),
        dt_proj_bias=torch.randn(d_inner, **g) - 2,
        A_log=torch.log(torch.arange(1, d_state + 1, **g, dtype=torch.float32)).repeat(d_inner, 1),
        D=torch.randn(d_inner, **g),
    )


def _composed_step(xz, conv_state, ssm_state, w, eps):
    """The modules' step in fp32 arithmetic: conv update, SiLU, x_proj, (norms), dt_proj, state update."""
    d_inner, dt_rank = w["dt_proj_weight"].shape
    d_state = w["A_log"].shape[1]
    x, z = xz.float().chunk(2, dim=-1)
    conv_bias = w["conv_bias"].float() if w["conv_bias"] is not None else None
    u = causal_conv1d_update(x, conv_state, w["conv_weight"].float(), conv_bias, "silu", backend="torch")
    u = u.to(xz.dtype).float()  # the conv output is rounded to xz's dtype, as the modules round it
    dt, B, C = (u @ w["x_proj_weight"].float().T).split([dt_rank, d_state, d_state], dim=-1)
    if eps is not None:
        dt, B, C = (weightless_rms_norm(t, eps) for t in (dt, B, C))
    dt = dt @ w["dt_proj_weight"].float().T
    A = -torch.exp(w["A_log"])
    return selective_state_update_ref(ssm_state, u, dt, A, B, C, w["D"], z, w["dt_proj_bias"], True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_mamba_step_matches_composed_step(case, dtype, nan_fill_empty):
    _check_three_steps(case, dtype)


def test_mamba_step_groups_rows_and_channel_blocks(monkeypatch, nan_fill_empty):
    """Batch rows sharing a program of the first kernel (an odd batch: the last group has a row past the end) and
    blocks of channels sharing one of the second (the last block past d_inner), forced on a small shape: the
    model's shapes take them at batch 16 and more (`step_grouping`)."""
    from hf_mamba.kernels import mamba_step

    assert mamba_step.step_grouping(16, 4096, 32, 5) == (4, 4)  # the 1.4B shape
    assert mamba_step.step_grouping(1, 8192, 64, 9) == (1, 1)
    monkeypatch.setattr(mamba_step, "MIN_PROGRAMS", 1)
    case = dict(batch=3, d_inner=150, d_state=5, dt_rank=30, d_conv=3, eps=1e-6)
    assert mamba_step.step_grouping(3, 150, 3, 2) == (2, 4)
    _check_three_steps(case, torch.float32)


def _check_three_steps(case, dtype):
    torch.manual_seed(11)
    batch, d_inner, d_state, d_conv = case["batch"], case["d_inner"], case["d_state"], case["d_conv"]
    eps = case.get("eps")
    w = _weights(d_inner, d_state, case["dt_rank"], d_conv, dtype, case.get("conv_bias", True))
    # xz as in_proj writes it, sliced from a wider buffer so its strides are not the contiguous ones
    xz = torch.randn(batch, 2 * d_inner + 8, device=DEVICE).to(dtype)[:, : 2 * d_inner]
    conv_state = torch.randn(batch, d_inner, d_conv, device=DEVICE).to(dtype)
    ssm_state = torch.randn(batch, d_inner, d_state, device=DEVICE)
    conv_ref, ssm_ref = conv_state.float().clone(), ssm_state.clone()
    # three steps: the states each step leaves are the next one's input
    for _ in range(3):
        y = mamba_step_triton(xz, conv_state, ssm_state=ssm_state, mixer_rms_eps=eps, **w)
        y_ref = _composed_step(xz, conv_ref, ssm_ref, w, eps)
        assert y.dtype == dtype and y.shape == (batch, d_inner)
        assert rel_err(y, y_ref) < TOL[dtype]
        assert torch.equal(conv_state.float(), conv_ref)  # the window shift is a copy: exact
        assert rel_err(ssm_state, ssm_ref) < TOL[dtype]
        conv_ref = conv_state.float().clone()  # the same rounded window on both sides
        xz = xz.roll(1, dims=-1)


def test_mamba_step_rejects_bad_arguments():
    """A size that does not fit the others is a ValueError naming the argument, before any launch."""
    w = _weights(12, 4, 3, 4, torch.float32)
    def randn(*shape):
        return torch.randn(*shape, device=DEVICE)

    xz, conv_state, ssm_state = randn(2, 24), randn(2, 12, 4), randn(2, 12, 4)
    bad = {
        "xz": dict(xz=randn(2, 23)),
        "conv_state": dict(conv_state=randn(2, 12, 3)),
        "x_proj_weight": dict(x_proj_weight=randn(10, 12)),
        "ssm_state": dict(ssm_state=randn(1, 12, 4)),
        "D": dict(D=randn(11)),
    }
    for name, change in bad.items():
        args = {**w, "xz": xz, "conv_state": conv_state, "ssm_state": ssm_state, **change}
        with pytest.raises(ValueError, match=name):
            mamba_step_triton(**args)
    with pytest.raises(ValueError, match="dt_proj_bias must be a floating-point tensor"):
        ints = {**w, "dt_proj_bias": torch.zeros(12, dtype=torch.long, device=DEVICE)}
        mamba_step_triton(xz, conv_state, ssm_state=ssm_state, **ints)
    with pytest.raises(ValueError, match="out_dtype"):
        mamba_step_triton(xz, conv_state, ssm_state=ssm_state, out_dtype=torch.int32, **w)
    empty = mamba_step_triton(randn(0, 24), randn(0, 12, 4), ssm_state=randn(0, 12, 4), **w)
    assert empty.shape == (0, 12)


def test_mamba_step_writes_y_in_out_dtype(nan_fill_empty):
    """fp16 inputs, out_dtype=float32 (what the model asks in fp16: y may pass 65504): the same y unrounded, the
    states as with the default."""
    torch.manual_seed(3)
    w = _weights(12, 4, 3, 4, torch.float16)
    xz = torch.randn(2, 24, device=DEVICE).half()
    states = [(torch.randn(2, 12, 4, device=DEVICE).half(), torch.randn(2, 12, 4, device=DEVICE)) for _ in range(2)]
    states[1] = (states[0][0].clone(), states[0][1].clone())
    y16 = mamba_step_triton(xz, states[0][0], ssm_state=states[0][1], **w)
    y32 = mamba_step_triton(xz, states[1][0], ssm_state=states[1][1], out_dtype=torch.float32, **w)
    assert y16.dtype == torch.float16 and y32.dtype == torch.float32
    assert torch.equal(y32.half(), y16)
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])


def test_mamba_step_sums_many_blocks(monkeypatch, nan_fill_empty):
    """33 blocks of the first kernel (d_inner 2112 in blocks of 64, forced: the model's shapes take wider blocks,
    at most 32 of them): the second kernel sums their partial rows in two loads of up to 32."""
    from hf_mamba.kernels import mamba_step

    assert [mamba_step.conv_block(d) for d in (1536, 2048, 4096, 8192)] == [64, 64, 128, 128]
    monkeypatch.setattr(mamba_step, "conv_block", lambda d_inner: 64)
    torch.manual_seed(12)
    w = _weights(2112, 4, 3, 4, torch.float32)
    xz = torch.randn(1, 2 * 2112, device=DEVICE)
    conv_state, ssm_state = torch.randn(1, 2112, 4, device=DEVICE), torch.randn(1, 2112, 4, device=DEVICE)
    conv_ref, ssm_ref = conv_state.clone(), ssm_state.clone()
    y = mamba_step_triton(xz, conv_state, ssm_state=ssm_state, **w)
    y_ref = _composed_step(xz, conv_ref, ssm_ref, w, None)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(ssm_state, ssm_ref) < TOL[torch.float32]
