"""The Mamba mixer's decode step between in_proj and out_proj in two Triton launches.

    u = SiLU(conv(window)),  (dt, B, C) = x_proj(u),  Δ = softplus(dt_proj(dt) + bias),
    h <- exp(Δ A) h + Δ u B,  y = (C . h + D u) SiLU(z),   with (x, z) = xz = in_proj(hidden).

Why: a decode step on a CUDA graph is bound by its launches, not by its bytes (130M at batch 1 reads
0.26 GB of weights, 80 us at HBM speed, against a step of several hundred microseconds). The modules take
four to six launches here (conv update, x_proj, dt_proj, state update; cuBLAS's split-K reductions; Falcon
Mamba's norms); these kernels take two:

1. `_conv_x_proj_kernel`, one program per (ROWS batch rows, block of channels, block of PROJ_BLOCK_J x_proj
   outputs): computes its channels' u from the conv window (the state as it will be after this step, read
   only) and multiplies them by its tile of x_proj's weight, writing one partial sum of those outputs per
   row and block of channels. x_proj reduces over all channels, so the sum waits for the second launch. A
   program per tile, rather than a loop over the outputs, spreads the weight's reads over the GPU: Falcon
   Mamba 7B's x_proj (288 x 8192) is 576 tiles, where a program per block of channels would be 64 programs
   for 132 multiprocessors, each waiting on nine loads in turn. The conv is recomputed per tile (four
   products a channel), which is why no program of this kernel can shift the state: the others still read it.
2. `_ssm_step_kernel`, one program per (batch row, SUB_BLOCKS blocks of channels): adds up the partial sums
   (every program does, they are a few hundred numbers), applies Falcon Mamba's norms where asked, computes
   its blocks of Δ from dt_proj's weight, updates its blocks of the state in place, writes y and shifts x
   into its channels' conv state. Its time is a chain of round trips to memory, so every load is issued
   before the first reduction and the conv state's store (behind a barrier) comes last: at the 1.4B shape
   and batch 1 that took it from 6.7 to 3.4 us a call on an H100.

At batch 1, ROWS = SUB_BLOCKS = 1. A larger batch has programs to spare, and every program re-reading its
weight tile (first kernel) or all the partial sums (second) once per row is then what the step waits on:
`step_grouping` lets up to 8 rows share a program of the first kernel and up to 4 blocks of channels one of
the second while each launch keeps 512 programs.

Everything after the conv is fp32 arithmetic (x_proj's and dt_proj's outputs are not rounded to the
weights' dtype in between, as the modules' matmuls round them): the result is the modules' up to that
rounding, and the fp32 reference's up to summation order. No host synchronisation and fixed launch
parameters per shape, so the step can be captured in a CUDA graph.
"""

import torch
import triton
import triton.language as tl

from ._launch import cdiv, device_guard, launch, next_power_of_2
from .causal_conv1d.triton_conv_update import conv_of_window, conv_window, store_conv_window
from .checks import check_out_dtype, check_shapes, check_tensors
from .triton_utils import log2_rate, softplus

PROJ_BLOCK_J = 32  # x_proj outputs per program of the first kernel (dt_rank + 2 d_state of them)
SSM_BLOCK_D = 32  # channels per program of the second kernel (as the state update's, for d_state 16)
SUM_ROWS = 32  # partial sums the second kernel reads per load


# A batch of several rows has programs to spare: up to MAX_ROWS rows share a program of the first kernel (one
# load of its weight tile), up to MAX_SUB_BLOCKS blocks of channels a program of the second (one read of the
# partial sums, the second kernel's main traffic), as long as each launch keeps MIN_PROGRAMS programs.
MIN_PROGRAMS = 512
MAX_ROWS = 8
MAX_SUB_BLOCKS = 4


def step_grouping(batch, d_inner, n_blocks, n_tiles):
    """(batch rows per program of the first kernel, blocks of SSM_BLOCK_D channels per program of the second):
    the largest powers of two up to MAX_ROWS and MAX_SUB_BLOCKS that leave each launch MIN_PROGRAMS programs."""
    rows = 1
    while 2 * rows <= min(MAX_ROWS, batch) and cdiv(batch, 2 * rows) * n_blocks * n_tiles >= MIN_PROGRAMS:
        rows *= 2
    sub_blocks, n_channel_blocks = 1, cdiv(d_inner, SSM_BLOCK_D)
    while sub_blocks < MAX_SUB_BLOCKS and batch * cdiv(n_channel_blocks, 2 * sub_blocks) >= MIN_PROGRAMS:
        sub_blocks *= 2
    return rows, sub_blocks


def conv_block(d_inner):
    """Channels per program of the first kernel: 64 (the 130M shape's 1536 channels make 24 blocks), more
    for wider models, so that the second kernel reads the blocks' partial sums in few loads of SUM_ROWS rows
    (1.4B: 32 blocks of 128, one load; Falcon Mamba 7B: 64 of 128, two)."""
    return min(128, max(64, next_power_of_2(cdiv(d_inner, SUM_ROWS))))


@triton.jit
def _conv_x_proj_kernel(
    p_xz, p_conv_state, p_conv_w, p_conv_bias, p_x_proj_w, p_u, p_partial,
    batch, d_inner, d_conv, n_proj,
    s_xz_b, s_xz_d,
    s_st_b, s_st_d, s_st_k,
    s_cw_d, s_cw_k,
    s_pw_j, s_pw_d,
    s_u_b,
    s_part_b, s_part_blk,
    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
    ROWS: tl.constexpr,
):
    i_rows = tl.program_id(0)
    i_d = tl.program_id(1)
    i_j = tl.program_id(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_j = o_j < n_proj
    # The weight's tile first: its load is the long one, and nothing it needs waits on the conv. ROWS batch
    # rows share it.
    b_pw = tl.load(
        p_x_proj_w + o_j[:, None] * s_pw_j + o_d[None, :] * s_pw_d,
        mask=m_j[:, None] & (o_d < d_inner)[None, :], other=0.0,
    ).to(tl.float32)  # (BLOCK_J, BLOCK_D)
    for r in tl.static_range(ROWS):
        i_b = (i_rows * ROWS + r).to(tl.int64)
        in_batch = i_b < batch
        m_d = o_d < tl.where(in_batch, d_inner, 0)  # nothing past the last row
        b_win = conv_window(  # x is xz's first half
            p_xz + i_b * s_xz_b, s_xz_d, p_conv_state + i_b * s_st_b, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K
        )
        b_u = conv_of_window(b_win, p_conv_w, s_cw_d, s_cw_k, p_conv_bias, o_d, m_d, d_conv, HAS_BIAS, BLOCK_K)
        b_u = b_u * tl.sigmoid(b_u)
        # u rounded to xz's dtype, as the modules' conv output is: x_proj and the state update read it so.
        b_u = b_u.to(p_u.dtype.element_ty)
        if i_j == 0:
            tl.store(p_u + i_b * s_u_b + o_d, b_u, mask=m_d)
        b_u = b_u.to(tl.float32)
        p_part = p_partial + i_b * s_part_b + i_d * s_part_blk
        tl.store(p_part + o_j, tl.sum(b_pw * b_u[None, :], axis=1), mask=o_j < tl.where(in_batch, n_proj, 0))


@triton.jit
def _partial_tile(p_part, s_part_blk, n_blocks, start, length, BLOCK: tl.constexpr, SUM_ROWS: tl.constexpr,
                  SUM_LOADS: tl.constexpr):
    """The first kernel's partial sums of x_proj's outputs [start, start + length), added up over its blocks to
    (SUM_ROWS, BLOCK) fp32 (zero past length): SUM_ROWS blocks' rows per load, SUM_LOADS loads, no reduction, so
    that nothing waits on them until `_summed` reduces the tile."""
    o = tl.arange(0, BLOCK)
    o_i = tl.arange(0, SUM_ROWS)
    tile = tl.zeros((SUM_ROWS, BLOCK), dtype=tl.float32)
    for i in tl.static_range(SUM_LOADS):
        rows = i * SUM_ROWS + o_i
        tile += tl.load(p_part + rows[:, None] * s_part_blk + start + o[None, :],
                        mask=(rows < n_blocks)[:, None] & (o < length)[None, :], other=0.0)
    return tile


@triton.jit
def _summed(tile, length, NORM: tl.constexpr, eps):
    """x_proj's outputs from their `_partial_tile`, optionally RMS-normed (Falcon Mamba's weight-free norm)."""
    acc = tl.sum(tile, axis=0)
    if NORM:
        acc = acc * tl.rsqrt(tl.sum(acc * acc, axis=0) / length + eps)
    return acc


@triton.jit
def _ssm_step_kernel(
    p_partial, p_u, p_xz, p_conv_state, p_dt_w, p_dt_bias, p_A_log, p_D, p_state, p_y,
    d_inner, d_state, dt_rank, n_blocks, d_conv, eps,
    s_part_b, s_part_blk,
    s_u_b,
    s_xz_b, s_xz_d,
    s_st_b, s_st_d, s_st_k,
    s_dw_d, s_dw_r,
    s_A_d, s_A_n,
    s_h_b, s_h_d, s_h_n,
    s_y_b,
    NORM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SUM_ROWS: tl.constexpr,
    SUM_LOADS: tl.constexpr, BLOCK_K: tl.constexpr, SUB_BLOCKS: tl.constexpr,
):
    # A chain of dependent round trips to memory is what this kernel's time is made of at batch 1: every load
    # is issued before the first reduction (a reduction across warps synchronises them, waiting for the loads
    # in flight), and the conv state's shift, which needs a barrier between its load and its store, comes last.
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_n = tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R)
    m_n = o_n < d_state
    # x_proj's outputs, summed once for the SUB_BLOCKS blocks of channels below: the sums are the same for all.
    p_part = p_partial + i_b * s_part_b
    p_xz_b, p_st = p_xz + i_b * s_xz_b, p_conv_state + i_b * s_st_b  # this row's xz and conv state
    t_dt = _partial_tile(p_part, s_part_blk, n_blocks, 0, dt_rank, BLOCK_R, SUM_ROWS, SUM_LOADS)
    t_B = _partial_tile(p_part, s_part_blk, n_blocks, dt_rank, d_state, BLOCK_N, SUM_ROWS, SUM_LOADS)
    t_C = _partial_tile(p_part, s_part_blk, n_blocks, dt_rank + d_state, d_state, BLOCK_N, SUM_ROWS, SUM_LOADS)
    for i_sub in tl.static_range(SUB_BLOCKS):
        o_d = (i_d * SUB_BLOCKS + i_sub) * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < d_inner
        m_dn = m_d[:, None] & m_n[None, :]
        p_h = p_state + i_b * s_h_b + o_d[:, None] * s_h_d + o_n[None, :] * s_h_n
        b_dw = tl.load(
            p_dt_w + o_d[:, None] * s_dw_d + o_r[None, :] * s_dw_r, mask=m_d[:, None] & (o_r < dt_rank)[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_D, BLOCK_R)
        b_dt_bias = tl.load(p_dt_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_u = tl.load(p_u + i_b * s_u_b + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_A_log = tl.load(p_A_log + o_d[:, None] * s_A_d + o_n[None, :] * s_A_n, mask=m_dn, other=0.0).to(tl.float32)
        b_h = tl.load(p_h, mask=m_dn, other=0.0).to(tl.float32)
        b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_z = tl.load(p_xz_b + (d_inner + o_d) * s_xz_d, mask=m_d, other=0.0).to(tl.float32)
        b_win = conv_window(p_xz_b, s_xz_d, p_st, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K)
        if i_sub == 0:
            b_dt_in = _summed(t_dt, dt_rank, NORM, eps)
            b_B = _summed(t_B, d_state, NORM, eps)
            b_C = _summed(t_C, d_state, NORM, eps)
        b_dt = softplus(tl.sum(b_dw * b_dt_in[None, :], axis=1) + b_dt_bias, False)
        b_h = tl.exp2(b_dt[:, None] * log2_rate(b_A_log, True)) * b_h + (b_dt * b_u)[:, None] * b_B[None, :]
        tl.store(p_h, b_h.to(p_state.dtype.element_ty), mask=m_dn)
        b_y = (tl.sum(b_h * b_C[None, :], axis=1) + b_u * b_D) * b_z * tl.sigmoid(b_z)
        tl.store(p_y + i_b * s_y_b + o_d, b_y.to(p_y.dtype.element_ty), mask=m_d)
        # The first kernel has read the conv state (every tile of x_proj did): x shifts in now.
        store_conv_window(b_win, p_st, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K)


def _check_step_args(xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D,
                     ssm_state):
    """ValueError naming the first argument of the wrong kind or shape; (batch, d_inner, d_conv, d_state,
    dt_rank) otherwise. The kernels index by these sizes: a mismatch would read out of bounds."""
    check_tensors(
        xz=xz, conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias, x_proj_weight=x_proj_weight,
        dt_proj_weight=dt_proj_weight, dt_proj_bias=dt_proj_bias, A_log=A_log, D=D, ssm_state=ssm_state,
    )
    if xz.dim() != 2 or xz.shape[1] == 0 or xz.shape[1] % 2:
        raise ValueError(f"xz must have shape (batch, 2 * d_inner) with d_inner > 0, got {tuple(xz.shape)}")
    for name, t in (("conv_weight", conv_weight), ("A_log", A_log), ("dt_proj_weight", dt_proj_weight)):
        if t.dim() != 2 or t.shape[1] == 0:
            raise ValueError(f"{name} must be 2-d with a non-empty second dimension, got shape {tuple(t.shape)}")
    batch, d_inner = xz.shape[0], xz.shape[1] // 2
    d_conv, d_state, dt_rank = conv_weight.shape[1], A_log.shape[1], dt_proj_weight.shape[1]
    check_shapes(
        ("conv_state", conv_state, (batch, d_inner, d_conv)),
        ("conv_weight", conv_weight, (d_inner, d_conv)),
        ("conv_bias", conv_bias, (d_inner,)),
        ("x_proj_weight", x_proj_weight, (dt_rank + 2 * d_state, d_inner)),
        ("dt_proj_weight", dt_proj_weight, (d_inner, dt_rank)),
        ("dt_proj_bias", dt_proj_bias, (d_inner,)),
        ("A_log", A_log, (d_inner, d_state)),
        ("D", D, (d_inner,)),
        ("ssm_state", ssm_state, (batch, d_inner, d_state)),
    )
    return batch, d_inner, d_conv, d_state, dt_rank


def mamba_step_triton(
    xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, ssm_state,
    mixer_rms_eps=None, out_dtype=None,
):
    """One decode step of the mixer after in_proj, on the Triton kernels; SiLU activation.

    Args:
        xz: (batch, 2 * d_inner), in_proj's output (x, then the gate z).
        conv_state: (batch, d_inner, d_conv), the last inputs of the conv, updated in place.
        conv_weight: (d_inner, d_conv); conv_bias: (d_inner,) or None.
        x_proj_weight: (dt_rank + 2 * d_state, d_inner); dt_proj_weight: (d_inner, dt_rank);
        dt_proj_bias, D: (d_inner,); A_log: (d_inner, d_state), A = -exp(A_log).
        ssm_state: (batch, d_inner, d_state), updated in place.
        mixer_rms_eps: Falcon Mamba's weight-free RMS norms on dt (before dt_proj), B and C; None for Mamba.
        out_dtype: y's dtype, by default xz's (fp32 for fp16 inputs: `hf_mamba.kernels.fp16_range`).

    Returns:
        y (batch, d_inner), gated: out_proj's input.
    """
    batch, d_inner, d_conv, d_state, dt_rank = _check_step_args(
        xz, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, ssm_state
    )
    check_out_dtype(out_dtype)
    n_proj = x_proj_weight.shape[0]
    block_d = conv_block(d_inner)
    n_blocks = cdiv(d_inner, block_d)
    u = torch.empty(batch, d_inner, dtype=xz.dtype, device=xz.device)
    y = torch.empty(batch, d_inner, dtype=out_dtype or xz.dtype, device=xz.device)
    if batch == 0:
        return y  # nothing to step (a grid of no programs is not launched)
    partial = torch.empty(batch, n_blocks, n_proj, dtype=torch.float32, device=xz.device)
    n_tiles = cdiv(n_proj, PROJ_BLOCK_J)
    rows, sub_blocks = step_grouping(batch, d_inner, n_blocks, n_tiles)
    with device_guard(xz):
        launch(
            _conv_x_proj_kernel, (cdiv(batch, rows), n_blocks, n_tiles),
            xz, conv_state, conv_weight, conv_bias, x_proj_weight, u, partial,
            batch, d_inner, d_conv, n_proj,
            *xz.stride(), *conv_state.stride(), *conv_weight.stride(), *x_proj_weight.stride(),
            u.stride(0), *partial.stride()[:2],
            HAS_BIAS=conv_bias is not None, BLOCK_D=block_d, BLOCK_K=next_power_of_2(d_conv),
            BLOCK_J=PROJ_BLOCK_J, ROWS=rows, num_warps=4,
        )
        launch(
            _ssm_step_kernel, (batch, cdiv(d_inner, SSM_BLOCK_D * sub_blocks)),
            partial, u, xz, conv_state, dt_proj_weight, dt_proj_bias, A_log, D, ssm_state, y,
            d_inner, d_state, dt_rank, n_blocks, d_conv, float(mixer_rms_eps or 0.0),
            *partial.stride()[:2], u.stride(0), *xz.stride(), *conv_state.stride(), *dt_proj_weight.stride(),
            *A_log.stride(), *ssm_state.stride(), y.stride(0),
            NORM=mixer_rms_eps is not None, BLOCK_D=SSM_BLOCK_D, BLOCK_N=next_power_of_2(d_state),
            BLOCK_R=next_power_of_2(dt_rank), SUM_ROWS=min(SUM_ROWS, next_power_of_2(n_blocks)),
            SUM_LOADS=cdiv(n_blocks, SUM_ROWS),
            BLOCK_K=next_power_of_2(d_conv), SUB_BLOCKS=sub_blocks, num_warps=4,
        )
    return y


__all__ = ["mamba_step_triton"]
