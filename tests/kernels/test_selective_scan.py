"""Selective scan and decode step: every backend against the exact fp32 sequential reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (see conftest.py) at tiny shapes; on a GPU
the same cases run at larger shapes. Errors are relative: ||out - ref|| / ||ref||, with the inputs
rounded to the tested dtype first, so the reference sees exactly what the kernel sees.
"""

import pytest
import torch
from hf_mamba.kernels import selective_scan, selective_scan_ref, selective_state_update, selective_state_update_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

ON_GPU = DEVICE.type == "cuda"

# Relative-norm tolerances: fp32 accumulation everywhere, so the error is the output's rounding.
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}

# (batch, d_inner, seqlen, d_state) on CPU (interpreter) and on the GPU.
SCAN_CASES = [
    pytest.param(dict(cpu=(2, 3, 1, 4), gpu=(2, 96, 1, 16), D=True, z=True, bias=True, h0=True), id="L1-all"),
    pytest.param(dict(cpu=(2, 5, 7, 4), gpu=(2, 200, 7, 16)), id="L7-plain"),
    pytest.param(dict(cpu=(1, 7, 63, 8), gpu=(2, 333, 511, 16), D=True, z=True), id="L63-d7-Dz"),
    pytest.param(dict(cpu=(1, 10, 129, 16), gpu=(2, 160, 1025, 16), D=True, z=True, bias=True, h0=True),
                 id="L129-d10-all"),
    pytest.param(dict(cpu=(2, 6, 40, 5), gpu=(3, 100, 389, 13), bias=True, h0=True), id="L40-N5-bias-h0"),
    pytest.param(dict(cpu=(1, 4, 33, 32), gpu=(1, 64, 500, 64), D=True, bias=True), id="L33-N32"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def _make_scan_inputs(case, dtype, softplus=True, transposed_BC=True):
    """Leaves for the kernel (in `dtype`) and for the reference (the same values in fp32)."""
    batch, d_inner, seqlen, d_state = case["gpu" if ON_GPU else "cpu"]
    g = dict(device=DEVICE)
    u = torch.randn(batch, d_inner, seqlen, **g)
    delta = torch.randn(batch, d_inner, seqlen, **g) * 0.5 - (0.0 if softplus else -1.0)
    if not softplus:
        delta = delta.abs()
    A = -torch.exp(torch.randn(d_inner, d_state, **g) * 0.5)
    if transposed_BC:  # what the model passes: views of (batch, seqlen, d_state)
        B = torch.randn(batch, seqlen, d_state, **g).transpose(1, 2)
        C = torch.randn(batch, seqlen, d_state, **g).transpose(1, 2)
    else:
        B = torch.randn(batch, d_state, seqlen, **g)
        C = torch.randn(batch, d_state, seqlen, **g)
    D = torch.randn(d_inner, **g) if case.get("D") else None
    z = torch.randn(batch, d_inner, seqlen, **g) if case.get("z") else None
    bias = torch.randn(d_inner, **g) * 0.5 if case.get("bias") else None
    if bias is not None and not softplus:
        bias = bias.abs()  # without softplus, delta + bias must stay >= 0 or h grows without bound
    h0 = torch.randn(batch, d_inner, d_state, **g) if case.get("h0") else None
    low = {"u": u, "delta": delta, "B": B, "C": C, "z": z}  # these take the tested dtype
    full = {"A": A, "D": D, "delta_bias": bias, "initial_state": h0}  # these stay fp32
    kernel, ref = {}, {}
    for name, t in {**low, **full}.items():
        if t is None:
            kernel[name] = ref[name] = None
            continue
        k = t.to(dtype) if name in low else t.clone()
        kernel[name] = k.detach().requires_grad_()
        ref[name] = k.detach().float().requires_grad_()
    return kernel, ref


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _check_scan(backend, case, dtype, softplus=True, transposed_BC=True, seq_idx=None):
    kernel, ref = _make_scan_inputs(case, dtype, softplus, transposed_BC)
    out, final = selective_scan(
        **kernel, delta_softplus=softplus, return_final_state=True, backend=backend, seq_idx=seq_idx
    )
    out_ref, final_ref = selective_scan_ref(
        **ref, delta_softplus=softplus, return_final_state=True, seq_idx=seq_idx
    )
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert final.dtype == torch.float32 and final.shape == final_ref.shape
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    tol = TOL[dtype]
    assert _rel_err(out, out_ref) < tol, f"out: {_rel_err(out, out_ref)}"
    assert _rel_err(final, final_ref) < tol, f"final state: {_rel_err(final, final_ref)}"

    dout = torch.randn_like(out)
    dfinal = torch.randn_like(final)
    names = [n for n, t in kernel.items() if t is not None]
    grads = torch.autograd.grad((out * dout).sum() + (final * dfinal).sum(), [kernel[n] for n in names])
    grads_ref = torch.autograd.grad(
        (out_ref * dout.float()).sum() + (final_ref * dfinal).sum(), [ref[n] for n in names]
    )
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == kernel[name].dtype and g.shape == g_ref.shape, name
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert _rel_err(g, g_ref) < tol, f"d{name}: {_rel_err(g, g_ref)}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SCAN_CASES)
def test_triton_scan_matches_reference(case, dtype, nan_fill_empty):
    torch.manual_seed(0)
    _check_scan("triton", case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_scan_segments(dtype, monkeypatch, nan_fill_empty):
    """Short batches cut the sequence into segments scanned in parallel, then chained."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    monkeypatch.setattr(triton_scan_seq, "MIN_TILES_PER_SEG", 2)
    monkeypatch.setattr(triton_scan_seq, "WARPS_PER_SM", 64)
    torch.manual_seed(7)
    case = dict(cpu=(1, 3, 77, 4), gpu=(1, 64, 1501, 16), D=True, z=True, bias=True, h0=True)
    _check_scan("triton", case, dtype)


@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("block_s", [1, 4, 16])
def test_chain_kernels(block_s, initial_state):
    """The kernels chaining segments (forward: states entering each segment; backward: adjoints
    leaving each) against the recurrences written as loops: 37 segments, so several loop steps of
    block_s segments and a partial last one, and elements (channel, state) past a program's end."""
    from hf_mamba.kernels._launch import cdiv, launch
    from hf_mamba.kernels.selective_scan import triton_scan_bwd, triton_scan_seq

    torch.manual_seed(3)
    batch, d_inner, d_state, n_seg, block_e = 2, 5, 3, 37, 8
    A_log = torch.randn(d_inner, d_state, device=DEVICE)
    A = -torch.exp(A_log)
    h_end = torch.randn(batch, d_inner, n_seg, d_state, device=DEVICE)
    dtsum = torch.rand(batch, d_inner, n_seg - 1, device=DEVICE)
    h0 = torch.randn(batch, d_inner, d_state, device=DEVICE) if initial_state else None
    h_in = torch.full_like(h_end, float("nan"))
    launch(
        triton_scan_seq._chain_segments_kernel, (batch, cdiv(d_inner * d_state, block_e)),
        h_end, dtsum, A_log, h0, h_in, d_inner, d_state, n_seg,
        USE_INITIAL_STATE=initial_state, A_LOG=True, BLOCK_E=block_e, BLOCK_S=block_s, num_warps=1,
    )
    h = h0 if initial_state else torch.zeros(batch, d_inner, d_state, device=DEVICE)
    expected = [h]
    for s in range(n_seg - 1):
        h = torch.exp(dtsum[:, :, s, None] * A) * h + h_end[:, :, s]
        expected.append(h)
    torch.testing.assert_close(h_in, torch.stack(expected, dim=2), rtol=1e-5, atol=1e-6)

    PQ = torch.randn(batch, n_seg, 2, d_state, d_inner, device=DEVICE)
    x = torch.full((batch, n_seg, d_state, d_inner), float("nan"), device=DEVICE)
    x[:, -1] = torch.randn(batch, d_state, d_inner, device=DEVICE)
    launch(
        triton_scan_bwd._chain_adjoint_kernel, (batch, cdiv(d_state * d_inner, block_e)),
        PQ, x, d_inner, d_state, n_seg, BLOCK_E=block_e, BLOCK_S=block_s, num_warps=1,
    )
    carry = x[:, -1].clone()
    for s in range(n_seg - 1, 0, -1):
        carry = PQ[:, s, 1] + PQ[:, s, 0] * carry
        torch.testing.assert_close(x[:, s - 1], carry, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_triton_scan_empty_sequence(dtype):
    """seqlen 0: an empty output, the initial state as the final one, and its gradient passed back."""
    A = -torch.rand(4, 4, device=DEVICE)
    u, B, C = (torch.randn(2, 4, 0, device=DEVICE, dtype=dtype) for _ in range(3))
    h0 = torch.randn(2, 4, 4, device=DEVICE, requires_grad=True)
    out, final = selective_scan(u, u, A, B, C, initial_state=h0, return_final_state=True, backend="triton")
    assert out.shape == (2, 4, 0) and out.dtype == dtype
    assert torch.equal(final, h0)
    dfinal = torch.randn_like(final)
    (grad,) = torch.autograd.grad(final, h0, dfinal)
    assert torch.equal(grad, dfinal)


def test_exp2_fma_accuracy():
    """`_exp2_fma` (2^x by a polynomial on the FMA pipe) against torch.exp2 in float64: relative error
    below 3e-7 (ex2.approx: 2^-22) where 2^x is a normal float, and 2^-126 (as good as zero) below."""
    import triton
    from hf_mamba.kernels.selective_scan.triton_scan_seq import _HEADER, _generated_kernel

    src = _HEADER + """
@triton.jit
def kernel(p_x, p_y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(p_y + o, _exp2_fma(tl.load(p_x + o, mask=o < n)), mask=o < n)
"""
    kernel = _generated_kernel(src, "test_exp2_fma", "kernel")
    x = torch.cat([torch.linspace(-125.9, 125.9, 20001), torch.arange(-40, 41) + 0.5, torch.tensor([-1e4, -300.0])])
    x = torch.cat([x, torch.zeros(1)]).to(DEVICE)  # 2^0 exactly 1: Δ = 0 (steps past the end) keeps h
    y = torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    exact = torch.exp2(x.double())
    normal = x > -126
    assert ((y[normal].double() - exact[normal]).abs() / exact[normal]).max() < 3e-7
    assert (y[~normal] == 2.0**-126).all() and y[-1] == 1.0


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_triton_scan_exp2_on_fma(dtype, monkeypatch, nan_fill_empty):
    """Decays on the FMA pipe for some states of both passes of a segmented forward: the outputs and
    final state against the reference, and against the all-special-function forward (fp32: 1e-6)."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    monkeypatch.setattr(triton_scan_seq, "MIN_TILES_PER_SEG", 2)
    monkeypatch.setattr(triton_scan_seq, "WARPS_PER_SM", 64)
    torch.manual_seed(8)
    case = dict(cpu=(1, 3, 77, 4), gpu=(1, 64, 1501, 16), D=True, z=True, bias=True, h0=True)
    kernel, _ = _make_scan_inputs(case, dtype)
    plain = selective_scan(**kernel, delta_softplus=True, return_final_state=True, backend="triton")
    monkeypatch.setattr(triton_scan_seq, "EXP2_FMA_PASS1", 0b0111)
    monkeypatch.setattr(triton_scan_seq, "EXP2_FMA", 0b1010)
    _check_scan("triton", case, dtype)
    fma = selective_scan(**kernel, delta_softplus=True, return_final_state=True, backend="triton")
    assert _rel_err(fma[1], plain[1]) < 1e-6
    assert _rel_err(fma[0], plain[0]) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(
    "dtype,tile",
    [pytest.param(torch.float32, 8, id="fp32"), pytest.param(torch.bfloat16, 8, id="bf16"),
     pytest.param(torch.bfloat16, 16, id="bf16-16-step-tiles")],
)
@pytest.mark.parametrize("documents", [pytest.param(False, id="plain"), pytest.param(True, id="seq_idx")])
def test_triton_scan_backward_segments(documents, dtype, tile, monkeypatch, nan_fill_empty):
    """The per-channel backward cut into segments: pass 1 (each segment's adjoint as a linear map of
    its carry), the chain from the last segment, pass 2 from the true carries; document resets inside
    and across segments. Short checkpoint chunks (two or four tiles), a ragged end and masked
    channels; the interpreter's tiles (8 steps) and the GPU's (16)."""
    from hf_mamba.kernels.selective_scan import triton_scan, triton_scan_bwd

    monkeypatch.setattr(triton_scan_bwd, "INTERPRET_TILE_STEPS", tile)
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", 32)
    monkeypatch.setattr(triton_scan_bwd, "MIN_TILES_PER_SEG", 2)
    monkeypatch.setattr(triton_scan_bwd, "WARPS_PER_SM", 64)
    torch.manual_seed(15)
    case = dict(cpu=(1, 5, 75, 4), gpu=(1, 100, 1499, 16), D=True, z=True, bias=True, h0=True)
    batch, _, seqlen, _ = case["gpu" if ON_GPU else "cpu"]
    seq_idx = _document_ids(batch, seqlen, 4, seed=2) if documents else None
    _check_scan("triton", case, dtype, transposed_BC=False, seq_idx=seq_idx)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("forward,block_d", [("seq", 1), ("chunk", 1), ("chunk", 4)])
def test_triton_scan_many_chunks(forward, block_d, dtype, monkeypatch, nan_fill_empty):
    """Short chunks: checkpoints, the state carried between chunks, the adjoint carried back;
    several channels per program (d_inner 5 is not a multiple of 4: masked rows). "chunk" runs the
    chunk kernels both ways, "seq" the per-channel ones."""
    from hf_mamba.kernels.selective_scan import triton_scan

    monkeypatch.setattr(triton_scan, "FORWARD", forward)
    monkeypatch.setattr(triton_scan, "BACKWARD", forward)
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", 16)
    monkeypatch.setattr(triton_scan, "BLOCK_D", block_d)
    torch.manual_seed(9)
    case = dict(cpu=(2, 5, 37, 6), gpu=(2, 100, 499, 16), D=True, z=True, bias=True, h0=True)
    _check_scan("triton", case, dtype)


@pytest.mark.parametrize("fwd_chunk,steps,warps", [(64, 4, 1), (256, 8, 2)])
def test_triton_scan_long_forward_chunks(fwd_chunk, steps, warps, monkeypatch, nan_fill_empty):
    """The chunk forward walking chunks several backward chunks long stores the checkpoints from
    inside them (backward chunk 16 here; sequences ending inside a forward chunk)."""
    from hf_mamba.kernels.selective_scan import triton_scan

    monkeypatch.setattr(triton_scan, "FORWARD", "chunk")
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", 16)
    monkeypatch.setattr(triton_scan, "FWD_MAX_CHUNK", fwd_chunk)
    monkeypatch.setattr(triton_scan, "FWD_STEPS_PER_THREAD", steps)
    monkeypatch.setattr(triton_scan, "FWD_MAX_WARPS", warps)
    torch.manual_seed(12)
    case = dict(cpu=(2, 3, 77, 4), gpu=(2, 100, 1001, 16), D=True, z=True, bias=True, h0=True)
    _check_scan("triton", case, torch.float32)


def test_triton_scan_chunk_forward_large_d_state(nan_fill_empty):
    """Above SEQ_MAX_D_STATE only the chunk forward runs; a state size that is not a power of two."""
    torch.manual_seed(11)
    case = dict(cpu=(1, 3, 20, 65), gpu=(2, 64, 300, 65), D=True, z=True, bias=True, h0=True)
    _check_scan("triton", case, torch.float32)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("channels_per_thread", [1, 2, 4])
def test_triton_scan_channels_per_thread(channels_per_thread, dtype, monkeypatch, nan_fill_empty):
    """The forward can give each thread several channels (d_inner 70: a partly masked block)."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    monkeypatch.setattr(triton_scan_seq, "CHANNELS_PER_THREAD", channels_per_thread)
    torch.manual_seed(10)
    case = dict(cpu=(2, 70, 23, 4), gpu=(2, 200, 499, 16), D=True, z=True, bias=True, h0=True)
    _check_scan("triton", case, dtype)


@pytest.mark.parametrize("states_per_lane", [pytest.param(2, id="4-lanes"), pytest.param(4, id="2-lanes")])
def test_triton_scan_lanes_per_channel(states_per_lane, monkeypatch, nan_fill_empty):
    """The forward can spread one channel's state over several lanes (used for large d_state)."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    monkeypatch.setattr(triton_scan_seq, "STATES_PER_LANE", states_per_lane)
    torch.manual_seed(8)
    case = dict(cpu=(2, 5, 19, 8), gpu=(2, 100, 499, 16), D=True, z=True, bias=True, h0=True)
    _check_scan("triton", case, torch.float32)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("variant", ["plain", "segments", "seq_idx"])
def test_triton_scan_spread_lanes(variant, dtype, monkeypatch, nan_fill_empty):
    """The forward with d_state 16 spread over 4 lanes per channel (Δ gathered and y reduce-scattered
    between lanes), against the reference, with its gradients through the checkpoints it stores:
    d_inner 70 (a partly masked block of 8 channels), an odd length, the segments of a short batch,
    and document resets."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    monkeypatch.setattr(triton_scan_seq, "LANES", 4)
    if variant == "segments":
        monkeypatch.setattr(triton_scan_seq, "MIN_TILES_PER_SEG", 2)
        monkeypatch.setattr(triton_scan_seq, "WARPS_PER_SM", 64)
    built = []
    fwd_kernel = triton_scan_seq._fwd_kernel
    monkeypatch.setattr(triton_scan_seq, "_fwd_kernel", lambda *key: built.append(key) or fwd_kernel(*key))
    torch.manual_seed(11)
    batch, d_inner, seqlen = (2, 70, 45) if not ON_GPU else (2, 300, 1111)
    if variant == "segments":
        batch = 1
    case = dict(cpu=(batch, d_inner, seqlen, 16), gpu=(batch, d_inner, seqlen, 16), D=True, z=True, bias=True, h0=True)
    seq_idx = _document_ids(batch, seqlen, 3, seed=1) if variant == "seq_idx" else None
    _check_scan("triton", case, dtype, transposed_BC=False, seq_idx=seq_idx)
    assert built and all(key[2] == 4 for key in built)  # (d_state, T, lanes)


def test_lanes_per_channel_rule(monkeypatch):
    """d_state 16 spreads over 4 lanes where that alone gives 4 one-warp programs per multiprocessor
    and u, Δ, z are time-contiguous (and only then skips segments); larger d_state always keeps at
    most 16 states per lane."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    monkeypatch.setattr(triton_scan_seq, "sm_count", lambda device: 132)
    rule = triton_scan_seq._lanes_per_channel
    cpu = torch.device("cpu")
    assert rule(8, 1536, 16, 8, True, cpu) == (4, True)  # 1536 programs of 8 channels >= 4 x 132
    assert rule(2, 1536, 16, 8, True, cpu) == (1, False)  # 384 programs
    assert rule(8, 1536, 16, 8, False, cpu) == (1, False)  # channels-last: one lane and segments
    assert rule(1, 2048, 16, 8, True, cpu) == (1, False)  # 256 programs: one lane and segments
    assert rule(1, 2048, 64, 8, True, cpu) == (4, False)  # 16 states per lane: for registers, not a spread
    assert rule(8, 1536, 16, 2, True, cpu) == (1, False)  # 4 lanes must divide the tile's steps
    monkeypatch.setattr(triton_scan_seq, "LANES", 2)
    assert rule(1, 2048, 16, 8, True, cpu) == (2, False)  # a sweep setting, segments as WARPS_PER_SM says


@pytest.mark.parametrize(
    "softplus,transposed_BC",
    [pytest.param(False, False, id="no-softplus-contiguousBC"), pytest.param(True, False, id="contiguousBC")],
)
def test_triton_scan_variants(softplus, transposed_BC, nan_fill_empty):
    torch.manual_seed(1)
    case = dict(cpu=(2, 5, 21, 4), gpu=(2, 130, 301, 16), D=True, z=True, bias=True, h0=True)
    _check_scan("triton", case, torch.float32, softplus, transposed_BC)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize(
    "layout",
    ["time-contiguous", "time-contiguous-untiled", "time-contiguous-untiled-even", "state-contiguous",
     "x_proj-slice", "odd-offset", "x_proj-slice-time-rows"],
)
def test_triton_scan_BC_layouts(layout, dtype, monkeypatch, nan_fill_empty):
    """B and C in every layout the forward meets: time-contiguous (copied tile by tile, or read as
    passed; one vector per state and tile, bf16 as words of two steps where the copy or an even
    length aligns them), state-contiguous views and slices of an
    x_proj-like output (bf16: words of two states), a slice at an odd element offset, which cannot be
    read in pairs, and the sweep's option of copying B, C to unit time stride first."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    if layout.endswith("-time-rows"):
        monkeypatch.setattr(triton_scan_seq, "BC_LAYOUT", "time rows")
        layout = layout.removesuffix("-time-rows")
    even = layout.endswith("-even")
    layout = layout.removesuffix("-even")
    untiled = layout.endswith("-untiled")
    layout = layout.removesuffix("-untiled")
    monkeypatch.setattr(triton_scan_seq, "BC_TILE_COPY", not untiled)

    torch.manual_seed(13)
    batch, d_inner, seqlen, d_state = (2, 5, 19 + even, 4) if not ON_GPU else (2, 130, 301 + even, 16)
    kernel, ref = _make_scan_inputs(dict(cpu=(batch, d_inner, seqlen, d_state), gpu=(batch, d_inner, seqlen, d_state)),
                                    dtype)
    width = 2 + 2 * d_state  # an x_proj row: dt_rank 2, then B, then C
    for name in ("B", "C"):
        values = ref[name].detach()
        if layout == "time-contiguous":
            t = values.contiguous()
        elif layout == "state-contiguous":
            t = values.transpose(1, 2).contiguous().transpose(1, 2)
        else:  # B from column 2 (dt_rank 2) or 1 (an odd offset), C after it
            rows = torch.zeros(batch, seqlen, width, device=DEVICE)
            first = (2 if layout == "x_proj-slice" else 1) + (d_state if name == "C" else 0)
            rows[..., first:first + d_state] = values.transpose(1, 2)
            t = rows.to(dtype)[..., first:first + d_state].transpose(1, 2)
        kernel[name] = t.to(dtype).detach().requires_grad_()
    bf16 = dtype == torch.bfloat16
    *_, pairs, time_vectors, tiled = triton_scan_seq._bc_reads(kernel["B"], kernel["C"], lanes=1, T=8)
    assert time_vectors == (layout == "time-contiguous")
    assert tiled == (time_vectors and not untiled)
    # The tile copy is aligned and padded to whole tiles: words of two steps at any length.
    pairs_expected = (even or tiled) if time_vectors else layout in ("state-contiguous", "x_proj-slice")
    assert pairs == (bf16 and pairs_expected)
    out = selective_scan(**kernel, delta_softplus=True, backend="triton")
    out_ref = selective_scan_ref(**ref, delta_softplus=True)
    assert _rel_err(out, out_ref) < TOL[dtype], _rel_err(out, out_ref)
    grads = torch.autograd.grad(out.float().square().sum(), [kernel["B"], kernel["C"]])
    grads_ref = torch.autograd.grad(out_ref.square().sum(), [ref["B"], ref["C"]])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert _rel_err(g, g_ref) < TOL[dtype], _rel_err(g, g_ref)


def test_triton_scan_without_grad_and_noncontiguous_u():
    """No gradient wanted: no checkpoints are stored; u and delta as strided views."""
    torch.manual_seed(2)
    batch, d_inner, seqlen, d_state = (2, 6, 50, 8) if not ON_GPU else (2, 192, 1500, 16)
    g = dict(device=DEVICE)
    u = torch.randn(batch, seqlen, d_inner, **g).transpose(1, 2)
    delta = torch.randn(batch, seqlen, 2 * d_inner, **g)[..., :d_inner].transpose(1, 2)
    A = -torch.rand(d_inner, d_state, **g) - 0.2
    B, C = torch.randn(2, batch, d_state, seqlen, **g)
    with torch.no_grad():
        out = selective_scan(u, delta, A, B, C, delta_softplus=True, backend="triton")
    out_ref = selective_scan_ref(u, delta, A, B, C, delta_softplus=True)
    assert _rel_err(out, out_ref) < TOL[torch.float32]


@pytest.mark.parametrize("return_final_state", [False, True])
def test_triton_scan_inference_call(return_final_state, monkeypatch):
    """Without gradients the forward runs without an autograd node, and skips the final state's copy
    when it is not asked for: the same outputs as the differentiable call, segments included."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    monkeypatch.setattr(triton_scan_seq, "MIN_TILES_PER_SEG", 2)
    monkeypatch.setattr(triton_scan_seq, "WARPS_PER_SM", 64)
    torch.manual_seed(12)
    case = dict(cpu=(1, 3, 77, 4), gpu=(1, 64, 1501, 16), D=True, z=True, bias=True, h0=True)
    kernel, _ = _make_scan_inputs(case, torch.float32)
    trained = selective_scan(**kernel, delta_softplus=True, return_final_state=True, backend="triton")
    with torch.no_grad():
        inferred = selective_scan(
            **kernel, delta_softplus=True, return_final_state=return_final_state, backend="triton"
        )
    if return_final_state:
        assert inferred[1].grad_fn is None and torch.equal(inferred[1], trained[1].detach())
        inferred = inferred[0]
    assert inferred.grad_fn is None and torch.equal(inferred, trained[0].detach())


@pytest.mark.parametrize("case", SCAN_CASES[1:4])
def test_torch_scan_matches_reference(case):
    torch.manual_seed(3)
    _check_scan("torch", case, torch.float32)


def test_triton_scan_compiles_fullgraph():
    """The custom op traces under torch.compile(fullgraph=True), forward and backward."""
    torch.manual_seed(4)
    case = dict(cpu=(1, 3, 9, 4), gpu=(2, 64, 100, 16), D=True, z=True, bias=True)
    kernel, ref = _make_scan_inputs(case, torch.float32)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, True, initial_state, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out = compiled(**kernel)
    out.sum().backward()
    out_ref = selective_scan_ref(**ref, delta_softplus=True)
    out_ref.sum().backward()
    assert _rel_err(out, out_ref) < TOL[torch.float32]
    for name, t in kernel.items():
        if t is not None:
            assert _rel_err(t.grad, ref[name].grad) < TOL[torch.float32], name


def _forward_op_args(shapes, seed):
    """fp32 leaves with every optional input, and the argument tuple of the forward custom op."""
    torch.manual_seed(seed)
    k, _ = _make_scan_inputs(dict(**shapes, D=True, z=True, bias=True, h0=True), torch.float32)
    args = (k["u"], k["delta"], k["A"], k["B"], k["C"], k["D"], k["z"], k["delta_bias"])
    args += (True, k["initial_state"], True, None)  # delta_softplus, initial_state, save_states, seq_idx
    return k, args


def test_triton_scan_opcheck(monkeypatch):
    """torch.library.opcheck: fake tensor, schema and autograd registration of the forward op."""
    from hf_mamba.kernels.selective_scan import triton_scan

    k, args = _forward_op_args(dict(cpu=(1, 3, 5, 4), gpu=(2, 32, 70, 16)), seed=5)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(triton_scan.selective_scan_fwd_op, args, test_utils=checks)
    # A channels-last u (what the model passes) gives a channels-last output, in both forwards.
    u_cl = k["u"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    for forward in ("seq", "chunk"):
        monkeypatch.setattr(triton_scan, "FORWARD", forward)
        torch.library.opcheck(triton_scan.selective_scan_fwd_op, (u_cl, *args[1:]), test_utils=checks)
        assert triton_scan.selective_scan_fwd_op(u_cl, *args[1:])[0].transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backward", ["seq", "chunk"])
def test_triton_scan_backward_op_outputs_do_not_alias(backward, monkeypatch):
    """The backward op's outputs are distinct tensors (custom ops may not return aliases): the
    sequential backward sums dA, dD and dΔ bias into one buffer, and the op copies them apart."""
    from hf_mamba.kernels.selective_scan import triton_scan

    monkeypatch.setattr(triton_scan, "BACKWARD", backward)
    k, args = _forward_op_args(dict(cpu=(1, 3, 5, 4), gpu=(2, 32, 70, 16)), seed=7)
    out, final, chunk_states = triton_scan.selective_scan_fwd_op(*args)
    u, delta, A, B, C, D, z, delta_bias = (t.detach() for t in args[:8])
    bwd_args = (u, delta, A, B, C, D, z, delta_bias, True, chunk_states, torch.randn_like(out), None, None)
    torch.library.opcheck(triton_scan.selective_scan_bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))
    grads = [t for t in triton_scan.selective_scan_bwd_op(*bwd_args) if t.numel()]
    assert len({t.untyped_storage().data_ptr() for t in grads}) == len(grads)


def test_triton_scan_custom_op_equals_eager_function():
    """Eager mode runs an autograd.Function; torch.compile traces the custom ops: same outputs and gradients."""
    from hf_mamba.kernels.selective_scan import triton_scan

    _, args = _forward_op_args(dict(cpu=(2, 3, 21, 4), gpu=(2, 32, 300, 16)), seed=6)
    leaves = [t for t in args if isinstance(t, torch.Tensor)]
    B, C = args[3], args[4]
    results = []
    for fn in (triton_scan.selective_scan_fwd_op, triton_scan._SelectiveScanEager.apply):
        out, final = fn(*args)[:2]
        grads = torch.autograd.grad((out * out.detach().sin()).sum() + final.sum(), leaves)
        results.append((out, final, *grads))
    names = ["out", "final_state"] + ["B" if t is B else "C" if t is C else "other" for t in leaves]
    for name, op_value, eager_value in zip(names, *results, strict=True):
        # dB, dC sum over channels with atomics, in an order that varies between runs on a GPU.
        tolerance = dict(rtol=1e-5, atol=1e-5) if name in ("B", "C") and ON_GPU else dict(rtol=0, atol=0)
        torch.testing.assert_close(op_value, eager_value, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


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
    assert _rel_err(y, y_ref) < TOL[dtype]
    assert _rel_err(state, state_ref) < TOL[torch.float32]


def _document_ids(batch, seqlen, n_docs, seed):
    """(batch, seqlen) int32 ids of packed documents with random boundaries (one row a single document)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.zeros(seqlen, dtype=torch.int32)]
    for _ in range(batch - 1):
        starts = torch.randperm(seqlen - 1, generator=gen)[: n_docs - 1] + 1
        row = torch.zeros(seqlen, dtype=torch.int32)
        row[starts] = 1
        rows.append(torch.cumsum(row, 0, dtype=torch.int32) + 5)  # ids need not start at 0
    return torch.stack(rows).to(DEVICE)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("forward", ["seq", "chunk"])
def test_triton_scan_seq_idx(forward, dtype, monkeypatch, nan_fill_empty):
    """seq_idx resets the state at document boundaries, forward and backward (across chunks too), in
    the chunk kernels both ways and in the per-channel ones."""
    from hf_mamba.kernels.selective_scan import triton_scan

    monkeypatch.setattr(triton_scan, "FORWARD", forward)
    monkeypatch.setattr(triton_scan, "BACKWARD", forward)
    monkeypatch.setattr(triton_scan, "MAX_CHUNK", 16)
    torch.manual_seed(10)
    case = dict(cpu=(3, 5, 45, 6), gpu=(3, 100, 750, 16), D=True, z=True, bias=True, h0=True)
    batch, _, seqlen, _ = case["gpu" if ON_GPU else "cpu"]
    _check_scan("triton", case, dtype, seq_idx=_document_ids(batch, seqlen, 4, seed=0))


RAGGED = dict(cpu=(2, 5, 37, 4), gpu=(2, 130, 301, 16))  # partial tiles, an odd length


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,prefetch",
    [
        pytest.param(RAGGED, True, id="ragged-prefetch"),
        pytest.param(RAGGED, False, id="ragged-no-prefetch"),
        pytest.param(dict(cpu=(2, 5, 38, 4), gpu=(2, 130, 302, 16)), None, id="even"),  # bf16: pairs of steps
        pytest.param(dict(cpu=(1, 32, 32, 4), gpu=(2, 128, 512, 16)), None, id="whole-tiles"),  # no masks
    ],
)
def test_triton_scan_time_contiguous_BC(shape, prefetch, dtype, monkeypatch, nan_fill_empty):
    """B, C with unit time stride (read as one vector per state and tile), with every input: cut into
    segments, and with document resets (which keep one segment); with and without prefetching (None:
    the dtype's default)."""
    from hf_mamba.kernels.selective_scan import triton_scan_seq

    monkeypatch.setattr(triton_scan_seq, "PREFETCH", prefetch)
    monkeypatch.setattr(triton_scan_seq, "MIN_TILES_PER_SEG", 2)
    monkeypatch.setattr(triton_scan_seq, "WARPS_PER_SM", 64)
    torch.manual_seed(14)
    case = dict(shape, D=True, z=True, bias=True, h0=True)
    _check_scan("triton", case, dtype, transposed_BC=False)
    batch, _, seqlen, _ = case["gpu" if ON_GPU else "cpu"]
    _check_scan("triton", case, dtype, transposed_BC=False, seq_idx=_document_ids(batch, seqlen, 3, seed=1))


def test_reference_seq_idx_equals_separate_documents():
    torch.manual_seed(11)
    d_inner, d_state, lengths = 4, 3, (5, 1, 9)
    seqlen = sum(lengths)
    u, delta, z = torch.randn(3, 1, d_inner, seqlen)
    B, C = torch.randn(2, 1, d_state, seqlen)
    A = -torch.rand(d_inner, d_state) - 0.1
    h0 = torch.randn(1, d_inner, d_state)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = selective_scan_ref(u, delta, A, B, C, z=z, delta_softplus=True, initial_state=h0, seq_idx=seq_idx)
    parts, start = [], 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        parts.append(selective_scan_ref(
            u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl], z=z[..., sl], delta_softplus=True,
            initial_state=h0 if i == 0 else None,
        ))
        start += n
    torch.testing.assert_close(packed, torch.cat(parts, dim=-1))
    # The torch backend has no chunked path for seq_idx and gives the reference's result.
    torch.testing.assert_close(
        selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, initial_state=h0, seq_idx=seq_idx,
                       backend="torch"),
        packed,
    )


def test_scan_rejects_bad_seq_idx():
    u = torch.randn(2, 3, 5)
    A = -torch.rand(3, 4)
    B = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        selective_scan(u, u, A, B, B, seq_idx=torch.zeros(2, 4, dtype=torch.int32), backend="reference")
    with pytest.raises(ValueError, match="integer document ids"):
        selective_scan(u, u, A, B, B, seq_idx=torch.zeros(2, 5), backend="reference")
