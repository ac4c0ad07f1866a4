"""Causal depthwise conv1d (PyTorch path and Triton kernel) against a plain loop, and its one-step update.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F
from hf_mamba.kernels import causal_conv1d, causal_conv1d_update
from hf_mamba.kernels.causal_conv1d.triton_conv import ConvTuning, causal_conv1d_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def causal_conv1d_loop(x, weight, bias, activation, initial_state):
    """out[t] = act(bias + sum_k weight[k] x[t - d_conv + 1 + k]), one step at a time in fp32."""
    batch, d_inner, seqlen = x.shape
    d_conv = weight.shape[1]
    past = initial_state.float() if initial_state is not None else x.new_zeros(batch, d_inner, d_conv - 1).float()
    x_ext = torch.cat([past, x.float()], dim=-1)  # (batch, d_inner, d_conv - 1 + seqlen)
    outs = []
    for t in range(seqlen):
        out = (x_ext[:, :, t : t + d_conv] * weight.float()).sum(-1)  # (batch, d_inner)
        if bias is not None:
            out = out + bias.float()
        outs.append(out)
    out = torch.stack(outs, dim=-1)
    return F.silu(out) if activation is not None else out


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


CASES = [
    pytest.param(dict(shape=(2, 5, 1), d_conv=4, bias=True, act="silu"), id="L1"),
    pytest.param(dict(shape=(2, 7, 63), d_conv=4, bias=True, act="silu", init=True), id="L63-init"),
    pytest.param(dict(shape=(1, 3, 129), d_conv=3, bias=False, act=None), id="L129-nobias-noact"),
    pytest.param(dict(shape=(2, 20, 70), d_conv=4, bias=True, act="silu", cl=True), id="L70-channels-last-in-out"),
    pytest.param(dict(shape=(2, 10, 2), d_conv=4, bias=True, act="silu", init=True), id="L-shorter-than-kernel"),
    pytest.param(dict(shape=(2, 20, 70), d_conv=4, bias=False, act=None, cl=True, init=True), id="L70-cl-init"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_causal_conv1d_matches_loop(case, dtype, backend):
    torch.manual_seed(0)
    batch, d_inner, seqlen = case["shape"]
    d_conv = case["d_conv"]
    g = dict(device=DEVICE)
    if case.get("cl"):  # channels-last input too: a view of a wider (batch, seqlen, 2 * d_inner) tensor
        x = torch.randn(batch, seqlen, 2 * d_inner, **g).to(dtype)[..., :d_inner].transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(batch, d_inner, seqlen, **g).to(dtype).requires_grad_()
    weight = torch.randn(d_inner, d_conv, **g).to(dtype).requires_grad_()
    bias = torch.randn(d_inner, **g).to(dtype).requires_grad_() if case["bias"] else None
    init = torch.randn(batch, d_inner, d_conv - 1, **g).to(dtype).requires_grad_() if case.get("init") else None
    if backend == "triton" and init is not None:  # the kernel from zeros, its first outputs recomputed
        out = causal_conv1d(x, weight, bias, case["act"], init, backend=backend,
                            channels_last_out=case.get("cl", False))
    elif backend == "triton":  # 32-step blocks: several blocks along time at L = 129
        out = causal_conv1d_triton(x, weight, bias, case["act"], channels_last_out=case.get("cl", False),
                                   tuning=ConvTuning(block_l=32))
    else:
        out = causal_conv1d(x, weight, bias, case["act"], init, backend=backend)
    leaves = [t for t in (x, weight, bias, init) if t is not None]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref_bias = ref_leaves[2] if bias is not None else None
    ref_init = ref_leaves[-1] if init is not None else None
    ref = causal_conv1d_loop(ref_leaves[0], ref_leaves[1], ref_bias, case["act"], ref_init)
    assert out.dtype == dtype and out.shape == ref.shape
    assert _rel_err(out, ref) < TOL[dtype]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * dout.float()).sum(), ref_leaves)
    for g_, g_ref in zip(grads, grads_ref, strict=True):
        assert _rel_err(g_, g_ref) < TOL[dtype] * 2


UPDATE_CASES = [
    pytest.param(dict(d_inner=6, d_conv=4, bias=True, act="silu"), id="d6-k4"),
    pytest.param(dict(d_inner=130, d_conv=4, bias=True, act="silu", strided=True), id="d130-k4-strided-x"),
    pytest.param(dict(d_inner=5, d_conv=3, bias=False, act=None), id="d5-k3-nobias-noact"),
    pytest.param(dict(d_inner=7, d_conv=2, bias=True, act="silu"), id="d7-k2"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", UPDATE_CASES)
def test_causal_conv1d_update_continues_the_sequence(case, dtype, backend, nan_fill_empty):
    """Feeding the tokens one at a time through the update equals the convolution of the whole sequence,
    and the state ends holding the last d_conv inputs."""
    torch.manual_seed(1)
    batch, seqlen, d_inner, d_conv = 2, 9, case["d_inner"], case["d_conv"]
    g = dict(device=DEVICE)
    x = torch.randn(batch, seqlen, 2 * d_inner, **g).to(dtype)
    # The model passes x as the first half of in_proj's output: a strided (batch, d_inner) view.
    x = x[..., :d_inner] if case.get("strided") else x[..., :d_inner].contiguous()
    weight = torch.randn(d_inner, d_conv, **g)
    bias = torch.randn(d_inner, **g) if case["bias"] else None
    ref = causal_conv1d_loop(x.transpose(1, 2), weight, bias, case["act"], None)  # (batch, d_inner, seqlen) fp32
    conv_state = torch.zeros(batch, d_inner, d_conv, dtype=dtype, **g)
    steps = [
        causal_conv1d_update(x[:, t], conv_state, weight, bias, case["act"], backend=backend) for t in range(seqlen)
    ]
    out = torch.stack(steps, dim=-1)
    assert out.dtype == dtype
    assert _rel_err(out, ref) < (1e-6 if dtype == torch.float32 else TOL[dtype])
    assert torch.equal(conv_state, x.transpose(1, 2)[:, :, -d_conv:])


def test_causal_conv1d_update_rejects_bad_shapes():
    x, state, weight = torch.randn(2, 6), torch.zeros(2, 6, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="conv_state must have shape"):
        causal_conv1d_update(x, torch.zeros(2, 6, 3), weight)
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d_update(x, state, torch.randn(5, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        causal_conv1d_update(x[:, :, None], state, weight)
    with pytest.raises(ValueError, match="bias must have shape"):
        causal_conv1d_update(x, state, weight, torch.randn(4))


def test_packed_conv_equals_separate_documents():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    weight, bias = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    seq_idx = torch.tensor([[0] * 4 + [1] * 1 + [2] * 5, [0] * 10])
    packed = causal_conv1d(x, weight, bias, "silu", seq_idx=seq_idx)
    for row, spans in ((0, [(0, 4), (4, 5), (5, 10)]), (1, [(0, 10)])):
        for start, end in spans:
            alone = causal_conv1d(x[row : row + 1, :, start:end], weight, bias, "silu")
            torch.testing.assert_close(packed[row : row + 1, :, start:end], alone, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="seq_idx"):
        causal_conv1d(
            x, weight, bias, "silu", initial_state=torch.zeros(2, 3, 3, dtype=torch.float64), seq_idx=seq_idx
        )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_triton_packed_conv_matches_torch(bias):
    """seq_idx in the Triton kernel (forward and every gradient) equals the PyTorch path, across blocks."""
    torch.manual_seed(2)
    g = dict(device=DEVICE)
    x = torch.randn(2, 6, 37, **g).requires_grad_()
    weight = torch.randn(6, 4, **g).requires_grad_()
    b = torch.randn(6, **g).requires_grad_() if bias else None
    seq_idx = torch.tensor([[0] * 15 + [1] * 2 + [2] * 20, [5] * 30 + [6] * 7], device=DEVICE)
    leaves = [t for t in (x, weight, b) if t is not None]
    outs, grads = [], []
    for backend in ("torch", "triton"):
        if backend == "triton":  # blocks of 4 channels x 16 steps
            out = causal_conv1d_triton(x, weight, b, "silu", seq_idx=seq_idx, tuning=ConvTuning(block_d=4, block_l=16))
        else:
            out = causal_conv1d(x, weight, b, "silu", seq_idx=seq_idx, backend=backend)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), **g).view_as(out)).sum(), leaves))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g_triton, g_torch in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_triton, g_torch, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv_rejects_initial_state_with_seq_idx(backend):
    x = torch.randn(1, 2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="seq_idx or initial_state"):
        causal_conv1d(x, torch.randn(2, 4, device=DEVICE), initial_state=torch.zeros(1, 2, 3, device=DEVICE),
                      seq_idx=torch.zeros(1, 5, dtype=torch.int32, device=DEVICE), backend=backend)


def test_triton_conv_custom_op():
    """opcheck of the op torch.compile traces, and its gradients equal the eager autograd.Function's."""
    from hf_mamba.kernels.causal_conv1d import triton_conv

    torch.manual_seed(3)
    g = dict(device=DEVICE)
    x = torch.randn(2, 5, 19, **g).requires_grad_()
    weight = torch.randn(5, 4, **g).requires_grad_()
    bias = torch.randn(5, **g).requires_grad_()
    seq_idx = torch.tensor([[0] * 7 + [1] * 12, [3] * 19], device=DEVICE)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    x_cl = torch.randn(2, 19, 10, **g)[..., :5].transpose(1, 2).requires_grad_()  # a channels-last view
    for x_in in (x, x_cl):
        for channels_last in (False, True):
            args = (x_in, weight, bias, seq_idx, True, channels_last)
            torch.library.opcheck(triton_conv.causal_conv1d_fwd_op, args, test_utils=checks)
    results = []
    eager = lambda *a: triton_conv._CausalConv1dEager.apply(*a, ConvTuning())  # noqa: E731
    for fn in (triton_conv.causal_conv1d_fwd_op, eager):
        out = fn(x, weight, bias, seq_idx, True, True)
        assert out.transpose(1, 2).is_contiguous()  # channels-last, as asked
        results.append((out, *torch.autograd.grad((out * out.detach().cos()).sum(), (x, weight, bias))))
    for op_value, eager_value in zip(*results, strict=True):
        torch.testing.assert_close(op_value, eager_value, rtol=0, atol=0)


# Padding masks (0 at padding) of 2 rows x 37 steps: left and right padding, a hole, and a row of padding
# that starts a block of the kernel (16 steps) and ends one.
# (mask, seq_idx, mask dtype, SiLU).
PAD_MASKS = [
    pytest.param([[0] * 5 + [1] * 32, [1] * 30 + [0] * 7], None, torch.int64, True, id="left-right"),
    pytest.param([[1] * 10 + [0] * 3 + [1] * 24, [1] * 16 + [0] * 16 + [1] * 5], None, torch.bool, True, id="holes"),
    pytest.param(
        [[0] * 3 + [1] * 34, [1] * 30 + [0] * 7], [[0] * 15 + [1] * 22, [5] * 20 + [6] * 17], torch.float32, False,
        id="packed-float-mask-no-act",
    ),
]


@pytest.mark.parametrize("pad_mask,seq_idx,mask_dtype,silu", PAD_MASKS)
def test_triton_conv_pad_mask_equals_masking_around_it(pad_mask, seq_idx, mask_dtype, silu):
    """conv_fwd / conv_bwd with pad_mask compute act(conv(x * mask)) * mask and its gradients, as the model's
    module path does with two elementwise products around the conv."""
    from hf_mamba.kernels.causal_conv1d.triton_conv import conv_bwd, conv_fwd

    torch.manual_seed(4)
    g = dict(device=DEVICE)
    mask = torch.tensor(pad_mask, **g)
    seq_idx = torch.tensor(seq_idx, **g) if seq_idx is not None else None
    # x channels-last (a view of in_proj's output), as the fused mixer passes it
    x = torch.randn(2, 37, 12, **g)[..., :6].transpose(1, 2).requires_grad_()
    weight = torch.randn(6, 4, **g).requires_grad_()
    bias = torch.randn(6, **g).requires_grad_()
    dout = torch.randn(2, 6, 37, **g)
    m = mask[:, None, :].float()
    ref = causal_conv1d(x * m, weight, bias, "silu" if silu else None, seq_idx=seq_idx, backend="torch") * m
    ref_grads = torch.autograd.grad(ref, (x, weight, bias), dout)
    tuning = ConvTuning(block_d=4, block_l=16)
    with torch.no_grad():
        out = conv_fwd(x, weight, bias, seq_idx, silu, True, tuning=tuning, pad_mask=mask.to(mask_dtype))
        grads = conv_bwd(x, weight, bias, seq_idx, silu, dout, tuning=tuning, pad_mask=mask.to(mask_dtype))
    assert out.eq(0).all(1).logical_or(mask.bool()).all()  # padded steps are exactly zero
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert grads[0][~mask.bool()[:, None, :].expand_as(x)].eq(0).all()  # no gradient to padded inputs
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seqlen", [2, 70])
def test_triton_conv_continues_from_initial_state_without_grad(seqlen):
    """Inference continuing a cache: the kernel's output with its first steps rewritten in place equals the
    PyTorch path's, in the channels-last layout asked for."""
    torch.manual_seed(4)
    x = torch.randn(2, 12, seqlen, device=DEVICE)
    weight, bias = torch.randn(12, 4, device=DEVICE), torch.randn(12, device=DEVICE)
    init = torch.randn(2, 12, 3, device=DEVICE)
    with torch.no_grad():
        out = causal_conv1d(x, weight, bias, "silu", init, backend="triton", channels_last_out=True)
        ref = causal_conv1d(x, weight, bias, "silu", init, backend="torch")
    assert out.stride(1) == 1 or seqlen == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
