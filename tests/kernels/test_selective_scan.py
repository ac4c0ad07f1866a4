"""Selective scan through its public entry and the Triton dispatch (`triton_scan`): every backend against
the exact fp32 sequential reference, the custom ops torch.compile traces, inference calls.

The kernels' own variants are tested beside them: test_recurrent_scan.py, test_chunk.py, test_chain.py.
"""

import pytest
import torch
from hf_mamba.kernels import selective_scan, selective_scan_ref
from hf_mamba.kernels.selective_scan.recurrent_fwd import RecurrentFwdTuning
from hf_mamba.kernels.selective_scan.triton_scan import ScanTuning
from scan_testing import DTYPES, FP32_BF16, ON_GPU, TOL, check_scan, make_scan_inputs, rel_err, triton_scan

DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# (batch, d_inner, seqlen, d_state) on CPU (interpreter) and on the GPU.
SCAN_CASES = [
    pytest.param(dict(cpu=(2, 3, 1, 4), gpu=(2, 96, 1, 16), D=True, z=True, bias=True, h0=True), id="L1-all"),
    pytest.param(dict(cpu=(2, 5, 7, 4), gpu=(2, 200, 7, 16)), id="L7-plain"),
    pytest.param(dict(cpu=(1, 7, 63, 8), gpu=(2, 333, 511, 16), D=True, z=True), id="L63-d7-Dz"),
    pytest.param(dict(cpu=(1, 5, 129, 16), gpu=(2, 160, 1025, 16), D=True, z=True, bias=True, h0=True),
                 id="L129-d5-all"),
    pytest.param(dict(cpu=(2, 6, 40, 5), gpu=(3, 100, 389, 13), bias=True, h0=True), id="L40-N5-bias-h0"),
    pytest.param(dict(cpu=(1, 4, 33, 32), gpu=(1, 64, 500, 64), D=True, bias=True), id="L33-N32"),
]
# Segments at the tiny CPU shapes: cut below 64 warps per multiprocessor, two tiles per segment.
SEGMENTS = ScanTuning(fwd=RecurrentFwdTuning(min_tiles_per_seg=2, warps_per_sm=64))


# Every case in every dtype; on CPU the long one in fp32 and bf16 only (fp16 is in the other cases, and under
# the interpreter each run of it takes several seconds).
SCAN_CASE_DTYPES = [
    pytest.param(case.values[0], dtype.values[0], id=f"{case.id}-{dtype.id}")
    for case in SCAN_CASES
    for dtype in DTYPES
    if ON_GPU or not (case.id.startswith("L129") and dtype.id == "fp16")
]


@pytest.mark.parametrize("case, dtype", SCAN_CASE_DTYPES)
def test_triton_scan_matches_reference(case, dtype, nan_fill_empty):
    torch.manual_seed(0)
    check_scan("triton", case, dtype)


@pytest.mark.parametrize("dtype", FP32_BF16)
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


@pytest.mark.parametrize(
    "softplus,transposed_BC",
    [pytest.param(False, False, id="no-softplus-contiguousBC"), pytest.param(True, False, id="contiguousBC")],
)
def test_triton_scan_variants(softplus, transposed_BC, nan_fill_empty):
    torch.manual_seed(1)
    case = dict(cpu=(2, 5, 21, 4), gpu=(2, 130, 301, 16), D=True, z=True, bias=True, h0=True)
    check_scan("triton", case, torch.float32, softplus, transposed_BC)


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
    assert rel_err(out, out_ref) < TOL[torch.float32]


@pytest.mark.parametrize("return_final_state", [False, True])
def test_triton_scan_inference_call(return_final_state):
    """Without gradients the forward runs without an autograd node, and skips the final state's copy
    when it is not asked for: the same outputs as the differentiable call, segments included."""
    torch.manual_seed(12)
    case = dict(cpu=(1, 3, 77, 4), gpu=(1, 64, 1501, 16), D=True, z=True, bias=True, h0=True)
    kernel, _ = make_scan_inputs(case, torch.float32)
    trained = triton_scan(kernel, tuning=SEGMENTS)
    with torch.no_grad():
        inferred = triton_scan(kernel, return_final_state=return_final_state, tuning=SEGMENTS)
    if return_final_state:
        assert inferred[1].grad_fn is None and torch.equal(inferred[1], trained[1].detach())
        inferred = inferred[0]
    assert inferred.grad_fn is None and torch.equal(inferred, trained[0].detach())


def test_triton_scan_compiles_fullgraph():
    """The custom op traces under torch.compile(fullgraph=True), forward and backward."""
    torch.manual_seed(4)
    case = dict(cpu=(1, 3, 9, 4), gpu=(2, 64, 100, 16), D=True, z=True, bias=True)
    kernel, ref = make_scan_inputs(case, torch.float32)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, True, initial_state, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    out = compiled(**kernel)
    out.sum().backward()
    out_ref = selective_scan_ref(**ref, delta_softplus=True)
    out_ref.sum().backward()
    assert rel_err(out, out_ref) < TOL[torch.float32]
    for name, t in kernel.items():
        if t is not None:
            assert rel_err(t.grad, ref[name].grad) < TOL[torch.float32], name


def _forward_op_args(shapes, seed):
    """fp32 leaves with every optional input, and the argument tuple of the forward custom op."""
    torch.manual_seed(seed)
    k, _ = make_scan_inputs(dict(**shapes, D=True, z=True, bias=True, h0=True), torch.float32)
    args = (k["u"], k["delta"], k["A"], k["B"], k["C"], k["D"], k["z"], k["delta_bias"])
    args += (True, k["initial_state"], True, None)  # delta_softplus, initial_state, save_states, seq_idx
    return k, args


@pytest.mark.parametrize("d_state", [pytest.param(4, id="recurrent"), pytest.param(65, id="chunk")])
def test_triton_scan_opcheck(d_state):
    """torch.library.opcheck: fake tensor, schema and autograd registration of the forward op, whose
    forward is the recurrent kernel up to d_state 64 and the chunk kernel above."""
    from hf_mamba.kernels.selective_scan import triton_scan

    k, args = _forward_op_args(dict(cpu=(1, 3, 5, d_state), gpu=(2, 32, 70, d_state)), seed=5)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(triton_scan.selective_scan_fwd_op, args, test_utils=checks)
    # A channels-last u (what the model passes) gives a channels-last output.
    u_cl = k["u"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    torch.library.opcheck(triton_scan.selective_scan_fwd_op, (u_cl, *args[1:]), test_utils=checks)
    assert triton_scan.selective_scan_fwd_op(u_cl, *args[1:])[0].transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("d_state", [pytest.param(4, id="recurrent"), pytest.param(20, id="chunk")])
def test_triton_scan_backward_op_outputs_do_not_alias(d_state):
    """The backward op's outputs are distinct tensors (custom ops may not return aliases): the
    recurrent backward sums dA, dD and dΔ bias into one buffer, and the op copies them apart. The
    backward is the recurrent kernel up to d_state 16 and the chunk kernel above."""
    from hf_mamba.kernels.selective_scan import triton_scan

    k, args = _forward_op_args(dict(cpu=(1, 3, 5, d_state), gpu=(2, 32, 70, d_state)), seed=7)
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
    eager = lambda *a: triton_scan._SelectiveScanEager.apply(*a, None, triton_scan.DEFAULT_TUNING)  # noqa: E731
    for fn in (triton_scan.selective_scan_fwd_op, eager):
        out, final = fn(*args)[:2]
        grads = torch.autograd.grad((out * out.detach().sin()).sum() + final.sum(), leaves)
        results.append((out, final, *grads))
    names = ["out", "final_state"] + ["B" if t is B else "C" if t is C else "other" for t in leaves]
    for name, op_value, eager_value in zip(names, *results, strict=True):
        # dB, dC sum over channels with atomics, in an order that varies between runs on a GPU.
        tolerance = dict(rtol=1e-5, atol=1e-5) if name in ("B", "C") and ON_GPU else dict(rtol=0, atol=0)
        torch.testing.assert_close(op_value, eager_value, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


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


def test_wide_index_is_chosen_where_time_offsets_pass_int32():
    """A 2^20-token forward of the 130M shape reads xz (time stride 2 d_inner = 3072): 3.2e9 > 2^31."""
    from hf_mamba.kernels._launch import wide_index

    def x_of_xz(seqlen):  # x as the model's conv reads it from in_proj's output; meta: strides, no memory
        return torch.empty_strided((1, 1536, seqlen), (3072 * seqlen, 1, 3072), device="meta")

    assert wide_index(2**20, x_of_xz(2**20), None)
    assert not wide_index(2**19, x_of_xz(2**19))
    assert not wide_index(2**20, torch.empty(1, 1536, 2**20, device="meta"))  # time-contiguous


@pytest.mark.parametrize("dtype", FP32_BF16)
def test_wide_index_kernels_match_reference(dtype, monkeypatch, nan_fill_empty):
    """The scan's and the conv's 64-bit time-index variants (WIDE_INDEX, chosen only past 2^31) forced on
    small shapes: the same outputs and gradients as the reference."""
    from hf_mamba.kernels import causal_conv1d
    from hf_mamba.kernels.causal_conv1d import triton_conv
    from hf_mamba.kernels.selective_scan import recurrent_bwd, recurrent_fwd

    for module in (recurrent_fwd, recurrent_bwd, triton_conv):
        monkeypatch.setattr(module, "wide_index", lambda *args: True)
    torch.manual_seed(2)
    check_scan("triton", dict(cpu=(2, 6, 40, 5), gpu=(2, 130, 301, 16), D=True, z=True, bias=True, h0=True), dtype)
    x = torch.randn(2, 40, 6, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()  # channels-last
    weight = torch.randn(6, 4, device=DEVICE, dtype=dtype, requires_grad=True)
    outs = [causal_conv1d(x, weight, activation="silu", backend=b) for b in ("triton", "torch")]
    grads = [torch.autograd.grad(out.float().pow(2).sum(), (x, weight)) for out in outs]
    assert rel_err(outs[0], outs[1]) < TOL[dtype]
    for g, g_ref in zip(grads[0], grads[1], strict=True):
        assert rel_err(g, g_ref) < TOL[dtype]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_scan_takes_A_log(backend, grad):
    """A_is_log: A holds A_log. The outputs, final state and gradients are those of A = -exp(A_log) passed as A
    (without gradients the Triton kernels compute A themselves; with them, and on PyTorch, it is computed first)."""
    torch.manual_seed(5)
    batch, d_inner, seqlen, d_state = 2, 6, 40, 4
    u, delta, z = (torch.randn(batch, d_inner, seqlen, device=DEVICE) for _ in range(3))
    B, C = (torch.randn(batch, d_state, seqlen, device=DEVICE) for _ in range(2))
    A_log = torch.log(torch.arange(1, d_state + 1, device=DEVICE, dtype=torch.float32)).repeat(d_inner, 1)
    A_log = (A_log + 0.1 * torch.randn_like(A_log)).requires_grad_(grad)
    kw = dict(D=torch.randn(d_inner, device=DEVICE), z=z, delta_bias=torch.randn(d_inner, device=DEVICE),
              delta_softplus=True, return_final_state=True, backend=backend)
    with torch.set_grad_enabled(grad):
        y, state = selective_scan(u, delta, A_log, B, C, A_is_log=True, **kw)
        y_ref, state_ref = selective_scan(u, delta, -torch.exp(A_log), B, C, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
    if grad:
        dy = torch.randn_like(y)
        (g,) = torch.autograd.grad(y, A_log, dy)
        (g_ref,) = torch.autograd.grad(y_ref, A_log, dy)
        torch.testing.assert_close(g, g_ref)


def test_triton_entry_rejects_A_log_with_gradients():
    from hf_mamba.kernels.selective_scan.triton_scan import selective_scan_triton

    u = torch.randn(1, 2, 8, device=DEVICE, requires_grad=True)
    B = torch.randn(1, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="A_is_log is for calls without gradients"):
        selective_scan_triton(u, u.detach(), torch.zeros(2, 3, device=DEVICE), B, B, None, None, None, True, None,
                              False, A_is_log=True)
