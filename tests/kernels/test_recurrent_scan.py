"""The recurrent scan kernels (`recurrent_fwd`, `recurrent_bwd`) in each of their code paths: segments,
lanes per channel, the ways B and C are read, checkpoint chunks, document resets; outputs, final
state and every gradient against the fp32 reference. Launch choices come as tuning objects that
reach the paths at tiny CPU shapes."""

import pytest
import torch
from hf_mamba.kernels import selective_scan, selective_scan_ref
from hf_mamba.kernels.selective_scan import recurrent_fwd
from hf_mamba.kernels.selective_scan.chunk import ChunkTuning
from hf_mamba.kernels.selective_scan.recurrent_bwd import RecurrentBwdTuning
from hf_mamba.kernels.selective_scan.recurrent_fwd import RecurrentFwdTuning
from hf_mamba.kernels.selective_scan.triton_scan import ScanTuning
from scan_testing import DTYPES, FP32_BF16, ON_GPU, TOL, check_scan, document_ids, make_scan_inputs, rel_err

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Forward segments at the tiny CPU shapes: cut below 64 warps per multiprocessor, two tiles per segment.
FWD_SEGMENTS = RecurrentFwdTuning(min_tiles_per_seg=2, warps_per_sm=64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_segments(dtype, nan_fill_empty):
    """Short batches cut the sequence into segments scanned in parallel, then chained."""
    torch.manual_seed(7)
    case = dict(cpu=(1, 3, 77, 4), gpu=(1, 64, 1501, 16), D=True, z=True, bias=True, h0=True)
    check_scan("triton", case, dtype, tuning=ScanTuning(fwd=FWD_SEGMENTS))


@pytest.mark.parametrize(
    "dtype,tile",
    [pytest.param(torch.float32, 8, id="fp32"), pytest.param(torch.bfloat16, 8, id="bf16"),
     pytest.param(torch.bfloat16, 16, id="bf16-16-step-tiles")],
)
@pytest.mark.parametrize("documents", [pytest.param(False, id="plain"), pytest.param(True, id="seq_idx")])
def test_backward_segments(documents, dtype, tile, nan_fill_empty):
    """The recurrent backward cut into segments: pass 1 (each segment's adjoint as a linear map of
    its carry), the chain from the last segment, pass 2 from the true carries; document resets inside
    and across segments. Short checkpoint chunks (two or four tiles), a ragged end and masked
    channels; the interpreter's tiles (8 steps) and the GPU's (16)."""
    torch.manual_seed(15)
    tuning = ScanTuning(
        bwd=RecurrentBwdTuning(interpret_tile_steps=tile, min_tiles_per_seg=2, warps_per_sm=64),
        chunk=ChunkTuning(max_chunk=32),
    )
    case = dict(cpu=(1, 5, 75, 4), gpu=(1, 100, 1499, 16), D=True, z=True, bias=True, h0=True)
    batch, _, seqlen, _ = case["gpu" if ON_GPU else "cpu"]
    seq_idx = document_ids(batch, seqlen, 4, seed=2) if documents else None
    check_scan("triton", case, dtype, transposed_BC=False, seq_idx=seq_idx, tuning=tuning)


@pytest.mark.parametrize("states", [1, 2])
@pytest.mark.parametrize("dtype", FP32_BF16)
def test_backward_forward_phase_in_state_groups(dtype, states, nan_fill_empty):
    """Phase F of the backward (the chunk's forward rerun) looping over the states a group at a time,
    each state's h passing through the tile's scratch entry: segments, several checkpoint chunks, a
    ragged end, masked channels and document resets."""
    torch.manual_seed(16)
    tuning = ScanTuning(
        bwd=RecurrentBwdTuning(min_tiles_per_seg=2, warps_per_sm=64, states_per_iter=states),
        chunk=ChunkTuning(max_chunk=32),
    )
    case = dict(cpu=(1, 5, 75, 4), gpu=(1, 100, 1499, 16), D=True, z=True, bias=True, h0=True)
    batch, _, seqlen, _ = case["gpu" if ON_GPU else "cpu"]
    seq_idx = document_ids(batch, seqlen, 4, seed=3)
    check_scan("triton", case, dtype, transposed_BC=False, seq_idx=seq_idx, tuning=tuning)


@pytest.mark.parametrize("dtype", FP32_BF16)
def test_many_checkpoint_chunks(dtype, nan_fill_empty):
    """Short checkpoint chunks: the checkpoints, the adjoint carried back across chunks."""
    torch.manual_seed(9)
    case = dict(cpu=(2, 5, 37, 6), gpu=(2, 100, 499, 16), D=True, z=True, bias=True, h0=True)
    check_scan("triton", case, dtype, tuning=ScanTuning(chunk=ChunkTuning(max_chunk=16)))


@pytest.mark.parametrize("dtype", FP32_BF16)
def test_seq_idx(dtype, nan_fill_empty):
    """seq_idx resets the state at document boundaries, forward and backward, across checkpoint chunks."""
    torch.manual_seed(10)
    case = dict(cpu=(3, 5, 45, 6), gpu=(3, 100, 750, 16), D=True, z=True, bias=True, h0=True)
    batch, _, seqlen, _ = case["gpu" if ON_GPU else "cpu"]
    seq_idx = document_ids(batch, seqlen, 4, seed=0)
    check_scan("triton", case, dtype, seq_idx=seq_idx, tuning=ScanTuning(chunk=ChunkTuning(max_chunk=16)))


# The lanes kernel (`_fwd_source_lanes`): each of its paths once. d_inner 12 fills one block of 8
# channels and part of a second; odd lengths leave a ragged last tile.
LANE_CASES = [
    # d_state 16 spread over 4 lanes (the rule, made to fire at this size): bf16 words of two steps,
    # two steps finished per lane, document resets.
    pytest.param(torch.bfloat16, 16, dict(spread_warps_per_sm=0), True, 4, id="spread-4-lanes-bf16-seq_idx"),
    # 4 lanes for registers (a large d_state, here at most 4 states per lane): segments (pass 1 keeps
    # only states), fp32, one step finished per lane.
    pytest.param(torch.float32, 16, dict(states_per_lane=4, min_tiles_per_seg=2, warps_per_sm=64), False, 4,
                 id="4-lanes-segments-fp32"),
    # 2 lanes: one round of the reduce-scatter.
    pytest.param(torch.float32, 8, dict(states_per_lane=4), False, 2, id="2-lanes-fp32"),
]


@pytest.mark.parametrize("dtype,d_state,tuning,documents,lanes", LANE_CASES)
def test_lanes_per_channel(dtype, d_state, tuning, documents, lanes, monkeypatch, nan_fill_empty):
    """A channel's state spread over several lanes (Δ gathered and y reduce-scattered between them),
    against the reference, with the gradients through the checkpoints it stores."""
    built = []
    fwd_kernel = recurrent_fwd._fwd_kernel
    monkeypatch.setattr(recurrent_fwd, "_fwd_kernel", lambda *key: built.append(key) or fwd_kernel(*key))
    torch.manual_seed(11)
    batch = 2 if documents else 1
    shape = (batch, 12, 21, d_state) if not ON_GPU else (batch, 300, 1111, d_state)
    case = dict(cpu=shape, gpu=shape, D=True, z=True, bias=True, h0=True)
    seq_idx = document_ids(batch, shape[2], 3, seed=1) if documents else None
    check_scan("triton", case, dtype, transposed_BC=False, seq_idx=seq_idx,
               tuning=ScanTuning(fwd=RecurrentFwdTuning(**tuning)))
    assert built and all(key[2] == lanes for key in built)  # (d_state, T, lanes)


def test_lanes_per_channel_rule():
    """d_state 16 spreads over 4 lanes where that alone gives 4 one-warp programs per multiprocessor
    and u, Δ, z are time-contiguous (and only then skips segments); larger d_state always keeps at
    most 16 states per lane. Counted for an H200's 132 multiprocessors (the device here reports 4:
    spread_warps_per_sm scaled to match)."""
    sms = recurrent_fwd.sm_count(DEVICE)
    tuning = RecurrentFwdTuning(spread_warps_per_sm=4 * 132 // sms)

    def rule(*args):
        return recurrent_fwd._lanes_per_channel(*args, DEVICE, tuning)

    assert rule(8, 1536, 16, 8, True) == (4, True)  # 1536 programs of 8 channels >= 4 x 132
    assert rule(2, 1536, 16, 8, True) == (1, False)  # 384 programs
    assert rule(8, 1536, 16, 8, False) == (1, False)  # channels-last: one lane and segments
    assert rule(1, 2048, 16, 8, True) == (1, False)  # 256 programs: one lane and segments
    assert rule(1, 2048, 64, 8, True) == (4, False)  # 16 states per lane: for registers, not a spread
    assert rule(8, 1536, 16, 2, True) == (1, False)  # 4 lanes must divide the tile's steps


RAGGED = dict(cpu=(2, 5, 37, 4), gpu=(2, 130, 301, 16))  # partial tiles, an odd length


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(RAGGED, id="ragged"),
        pytest.param(dict(cpu=(2, 5, 38, 4), gpu=(2, 130, 302, 16)), id="even"),  # bf16: pairs of steps
        pytest.param(dict(cpu=(1, 32, 32, 4), gpu=(2, 128, 512, 16)), id="whole-tiles"),  # no masks
    ],
)
def test_time_contiguous_BC(shape, dtype, nan_fill_empty):
    """B, C with unit time stride (copied tile by tile, read as one vector per state and tile), with
    every input: cut into segments, and with document resets (which keep one segment)."""
    torch.manual_seed(14)
    case = dict(shape, D=True, z=True, bias=True, h0=True)
    tuning = ScanTuning(fwd=FWD_SEGMENTS)
    check_scan("triton", case, dtype, transposed_BC=False, tuning=tuning)
    batch, _, seqlen, _ = case["gpu" if ON_GPU else "cpu"]
    check_scan("triton", case, dtype, transposed_BC=False, seq_idx=document_ids(batch, seqlen, 3, seed=1),
               tuning=tuning)


@pytest.mark.parametrize("dtype", FP32_BF16)
@pytest.mark.parametrize(
    "layout", ["time-contiguous", "time-contiguous-two-dtypes", "state-contiguous", "x_proj-slice", "odd-offset"]
)
def test_BC_layouts(layout, dtype, nan_fill_empty):
    """B and C in every layout the forward meets: time-contiguous (copied tile by tile; bf16 as words
    of two steps), time-contiguous in two dtypes (read as passed, one vector per state and tile),
    state-contiguous views and slices of an x_proj-like output (bf16: words of two states), and a
    slice at an odd element offset, which cannot be read in pairs."""
    torch.manual_seed(13)
    batch, d_inner, seqlen, d_state = (2, 5, 19, 4) if not ON_GPU else (2, 130, 301, 16)
    kernel, ref = make_scan_inputs(dict(cpu=(batch, d_inner, seqlen, d_state), gpu=(batch, d_inner, seqlen, d_state)),
                                   dtype)
    width = 2 + 2 * d_state  # an x_proj row: dt_rank 2, then B, then C
    for name in ("B", "C"):
        values = ref[name].detach()
        t_dtype = dtype
        if layout.endswith("two-dtypes") and name == "C":  # C in another dtype, which the reference sees too
            t_dtype = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
            values = values.to(t_dtype).float()
            ref[name] = values.clone().requires_grad_()
        if layout.startswith("time-contiguous"):
            t = values.contiguous()
        elif layout == "state-contiguous":
            t = values.transpose(1, 2).contiguous().transpose(1, 2)
        else:  # B from column 2 (dt_rank 2) or 1 (an odd offset), C after it
            rows = torch.zeros(batch, seqlen, width, device=DEVICE)
            first = (2 if layout == "x_proj-slice" else 1) + (d_state if name == "C" else 0)
            rows[..., first:first + d_state] = values.transpose(1, 2)
            t = rows.to(dtype)[..., first:first + d_state].transpose(1, 2)
        kernel[name] = t.to(t_dtype).detach().requires_grad_()
    bf16 = dtype == torch.bfloat16
    B, C = kernel["B"], kernel["C"]
    pairs, time_vectors, tiled = recurrent_fwd._bc_reads(
        1, B.dtype, C.dtype, B.stride(), C.stride(), B.shape, B.data_ptr() % 4 == 0 and C.data_ptr() % 4 == 0
    )
    assert time_vectors == layout.startswith("time-contiguous")
    assert tiled == (layout == "time-contiguous")
    # The tile copy is aligned and padded to whole tiles: words of two steps at any length.
    assert pairs == (bf16 and layout in ("time-contiguous", "state-contiguous", "x_proj-slice"))
    out = selective_scan(**kernel, delta_softplus=True, backend="triton")
    out_ref = selective_scan_ref(**ref, delta_softplus=True)
    assert rel_err(out, out_ref) < TOL[dtype], rel_err(out, out_ref)
    grads = torch.autograd.grad(out.float().square().sum(), [kernel["B"], kernel["C"]])
    grads_ref = torch.autograd.grad(out_ref.square().sum(), [ref["B"], ref["C"]])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < max(TOL[dtype], TOL[g.dtype]), rel_err(g, g_ref)  # dC rounds to C's dtype
