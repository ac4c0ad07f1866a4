"""Selective scan, chunk form: the fallback kernels for a d_state too large for the recurrent ones
(registers), forward above d_state 64 and backward above 16 (`triton_scan` dispatches).

Glossary as in `triton_scan`: a_t = exp(Δ_t A), b_t = Δ_t u_t B_t, h_t = a_t h_{t-1} + b_t.

The layout of mamba_ssm's CUDA kernels: one program per (batch, block_d channels), walking the
sequence in chunks of CHUNK time steps spread over the program's threads, about steps_per_thread
consecutive steps per thread. Inside a chunk the kernel loops over the d_state states; for each it
runs the linear recurrence along time as `tl.associative_scan` on (a, b) pairs, mostly a sequential
in-thread scan with one shuffle pass per chunk. Sums over states (y, and in the backward dΔ and du)
are plain in-register accumulations across the loop. The forward stores h entering every chunk; the
backward walks the chunks in reverse, recomputes each state's h over the chunk from that checkpoint,
and runs the adjoint g_t = dy_t C_t + a_{t+1} g_{t+1} as a reverse scan. dB and dC are sums over
d_inner: each program adds its share with atomics, as mamba_ssm does.

u, delta, z, B, C and dout are read along time, so the launchers make them time-contiguous first.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._launch import cdiv, launch, next_power_of_2, seq_idx_args
from ..triton_utils import add_pair, linear_combine, softplus


@dataclass(frozen=True)
class ChunkTuning:
    """block_d channels x up to max_chunk steps (a power of two) per program, spread over up to
    max_warps warps with about steps_per_thread steps per thread. One warp per channel and 128-step
    chunks had the fastest forward + backward of 9 configs on H100 (docs/kernels.md, "Chunk kernels"):
    no cross-warp barriers in the scans and reductions, and many small programs per multiprocessor.
    The chunk is also the checkpoint interval of every forward and backward."""

    max_chunk: int = 128
    steps_per_thread: int = 4
    max_warps: int = 1
    block_d: int = 1


@triton.jit
def _keep_state(p_si, o_t, seqlen, s_si_l):
    # 1.0 where step t continues the document of step t - 1 (or is past the end), else 0.0.
    m_t = o_t < seqlen
    b_si = tl.load(p_si + o_t * s_si_l, mask=m_t, other=0)
    b_si_prev = tl.load(p_si + (o_t - 1) * s_si_l, mask=m_t & (o_t > 0), other=0)
    return tl.where((b_si == b_si_prev) | (o_t == 0) | (o_t >= seqlen), 1.0, 0.0)


@triton.jit
def _column(b_tile, o_n, n):
    # Column n of a (BLOCK_D, BLOCK_N) tile, as a (BLOCK_D,) vector.
    return tl.sum(tl.where((o_n == n)[None, :], b_tile, 0.0), axis=1)


@triton.jit
def _program_setup(
    p_D, p_delta_bias, d_inner, d_state,
    HAS_D: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    # What both kernels start with: the batch i_b, channels o_d (mask m_d), states o_n, a chunk's steps
    # o_c, the (channel, state) mask m_dn, the channels' D and Δ bias (0.0 where absent: unused), and
    # the offsets of the program's states in a contiguous (batch, d_inner, d_state) tensor.
    i_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x d_inner x seqlen may pass 2^31
    i_d = tl.program_id(1)
    o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, CHUNK)
    m_d = o_d < d_inner
    m_dn = m_d[:, None] & (o_n < d_state)[None, :]
    b_D = 0.0
    if HAS_D:
        b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_db = 0.0
    if HAS_DELTA_BIAS:
        b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    p_state = (i_b * d_inner + o_d[:, None]) * d_state + o_n[None, :]
    return i_b, o_d, o_n, o_c, m_d, m_dn, b_D, b_db, p_state


@triton.jit
def _chunk_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_delta_bias, p_h0,
    p_out, p_hT, p_hc,
    seqlen, d_inner, d_state, n_chunks, n_ckpt,
    s_A_d, s_A_n,
    p_seq_idx, s_si_b, s_si_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, SAVE_CHUNK_STATES: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    # u, delta, z, out: contiguous (batch, d_inner, seqlen); B, C: contiguous (batch, d_state, seqlen).
    # Checkpoints: the state entering every chunk, for the backward (which walks the same chunks).
    i_b, o_d, o_n, o_c, m_d, m_dn, b_D, b_db, p_state = _program_setup(
        p_D, p_delta_bias, d_inner, d_state, HAS_D, HAS_DELTA_BIAS, BLOCK_D, BLOCK_N, CHUNK
    )
    if USE_INITIAL_STATE:
        b_h = tl.load(p_h0 + p_state, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    p_row = (i_b * d_inner + o_d[:, None]) * seqlen  # start of each channel's row
    p_bc = i_b * d_state * seqlen  # start of this batch's B and C

    for i_c in range(n_chunks):
        if SAVE_CHUNK_STATES:
            # (batch, d_inner, n_ckpt, d_state): the state entering chunk i_c, for the backward.
            p_hc_c = (i_b * d_inner + o_d[:, None]) * n_ckpt * d_state + i_c * d_state
            tl.store(p_hc + p_hc_c + o_n[None, :], b_h, mask=m_dn)
        o_t = i_c * CHUNK + o_c
        m_t = o_t < seqlen
        m_dt = m_d[:, None] & m_t[None, :]
        p_dt = p_row + o_t[None, :]  # (BLOCK_D, CHUNK)
        b_u = tl.load(p_u + p_dt, mask=m_dt, other=0.0).to(tl.float32)
        b_dt = tl.load(p_delta + p_dt, mask=m_dt, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dt = b_dt + b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = softplus(b_dt, False)
        # Steps past the end get Δ = 0: a = 1, b = 0, so they leave h unchanged.
        b_dt = tl.where(m_dt, b_dt, 0.0)
        b_dtu = b_dt * b_u
        if HAS_SEQ_IDX:  # a document starts where seq_idx changes: no decay from the previous state
            b_keep = _keep_state(p_seq_idx + i_b * s_si_b, o_t, seqlen, s_si_l)[None, :]
        b_y = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        for n in range(d_state):
            # A pre-scaled by log2(e): exp(ΔA) = exp2(Δ A log2 e).
            b_A2 = tl.load(p_A + o_d * s_A_d + n * s_A_n, mask=m_d, other=0.0).to(tl.float32) * 1.4426950408889634
            b_B = tl.load(p_B + p_bc + n * seqlen + o_t, mask=m_t, other=0.0).to(tl.float32)  # (CHUNK,)
            b_C = tl.load(p_C + p_bc + n * seqlen + o_t, mask=m_t, other=0.0).to(tl.float32)
            b_a = tl.exp2(b_dt * b_A2[:, None])  # (BLOCK_D, CHUNK)
            if HAS_SEQ_IDX:
                b_a = b_a * b_keep
            b_b = b_dtu * b_B[None, :]
            b_aa, b_bb = tl.associative_scan((b_a, b_b), 1, linear_combine)
            b_hs = b_aa * _column(b_h, o_n, n)[:, None] + b_bb  # (BLOCK_D, CHUNK): h_t of state n
            b_y += b_hs * b_C[None, :]
            b_h_end = tl.sum(tl.where((o_c == CHUNK - 1)[None, :], b_hs, 0.0), axis=1)
            b_h = tl.where((o_n == n)[None, :], b_h_end[:, None], b_h)
        if HAS_D:
            b_y += b_u * b_D[:, None]
        if HAS_Z:
            b_z = tl.load(p_z + p_dt, mask=m_dt, other=0.0).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        tl.store(p_out + p_dt, b_y.to(p_out.dtype.element_ty), mask=m_dt)
    tl.store(p_hT + p_state, b_h, mask=m_dn)


@triton.jit
def _chunk_bwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_delta_bias, p_hc, p_dout, p_dhT,
    p_du, p_ddelta, p_dA, p_dB, p_dC, p_dD, p_dz, p_ddelta_bias, p_dh0, p_y,
    seqlen, d_inner, d_state, n_chunks,
    s_A_d, s_A_n,
    p_seq_idx, s_si_b, s_si_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, STORE_Y: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    # Same layouts as the forward; du, ddelta, dz contiguous like u; dB, dC (batch, d_state, seqlen) fp32.
    # STORE_Y: also write the forward's output y (recomputed here anyway for dz), so a caller that
    # needs y in its backward (out_proj's weight gradient) does not have to keep it from the forward.
    i_b, o_d, o_n, o_c, m_d, m_dn, b_D, b_db, p_state = _program_setup(
        p_D, p_delta_bias, d_inner, d_state, HAS_D, HAS_DELTA_BIAS, BLOCK_D, BLOCK_N, CHUNK
    )
    if HAS_D:
        b_dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DELTA_BIAS:
        b_ddb = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    # b_x: dL/dh at the end of the current chunk through the recurrence (a_{t+1} g_{t+1}).
    if HAS_DHT:
        b_x = tl.load(p_dhT + p_state, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_x = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    p_row = (i_b * d_inner + o_d[:, None]) * seqlen
    p_bc = i_b * d_state * seqlen

    for i_rev in range(n_chunks):
        i_c = n_chunks - 1 - i_rev
        o_t = i_c * CHUNK + o_c
        m_t = o_t < seqlen
        m_dt = m_d[:, None] & m_t[None, :]
        # a_{t+1} = 1 past the end and at the chunk's last step (the carry b_x covers it).
        m_dt1 = m_d[:, None] & ((o_t + 1) < seqlen)[None, :] & (o_c < CHUNK - 1)[None, :]
        p_dt = p_row + o_t[None, :]  # (BLOCK_D, CHUNK)
        b_u = tl.load(p_u + p_dt, mask=m_dt, other=0.0).to(tl.float32)
        b_dt_raw = tl.load(p_delta + p_dt, mask=m_dt, other=0.0).to(tl.float32)
        b_dt1 = tl.load(p_delta + p_dt + 1, mask=m_dt1, other=0.0).to(tl.float32)  # Δ_{t+1}, for a_{t+1}
        if HAS_DELTA_BIAS:
            b_dt_raw = b_dt_raw + b_db[:, None]
            b_dt1 = b_dt1 + b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = softplus(b_dt_raw, False)
            b_dt1 = softplus(b_dt1, False)
        else:
            b_dt = b_dt_raw
        b_dt = tl.where(m_dt, b_dt, 0.0)
        b_dt1 = tl.where(m_dt1, b_dt1, 0.0)
        b_dtu = b_dt * b_u
        b_do = tl.load(p_dout + p_dt, mask=m_dt, other=0.0).to(tl.float32)
        if HAS_Z:
            b_z = tl.load(p_z + p_dt, mask=m_dt, other=0.0).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
            b_dy = b_do * b_z * b_sig
        else:
            b_dy = b_do
        if HAS_SEQ_IDX:
            b_keep = _keep_state(p_seq_idx + i_b * s_si_b, o_t, seqlen, s_si_l)[None, :]
            # a_{t+1} is 0 where step t + 1 starts a new document.
            b_keep1 = _keep_state(p_seq_idx + i_b * s_si_b, o_t + 1, seqlen, s_si_l)[None, :]
        b_y = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # recomputed for dz
        b_ddt = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # dL/dΔ through the states
        b_gB = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)  # sum_n g_t B_t
        for n in range(d_state):
            b_A = tl.load(p_A + o_d * s_A_d + n * s_A_n, mask=m_d, other=0.0).to(tl.float32)
            b_A2 = b_A * 1.4426950408889634
            b_B = tl.load(p_B + p_bc + n * seqlen + o_t, mask=m_t, other=0.0).to(tl.float32)  # (CHUNK,)
            b_C = tl.load(p_C + p_bc + n * seqlen + o_t, mask=m_t, other=0.0).to(tl.float32)
            # Recompute state n over the chunk from the checkpoint.
            p_hc_n = (i_b * d_inner + o_d) * n_chunks * d_state + i_c * d_state + n
            b_h0 = tl.load(p_hc + p_hc_n, mask=m_d, other=0.0)  # (BLOCK_D,)
            b_a = tl.exp2(b_dt * b_A2[:, None])  # (BLOCK_D, CHUNK)
            if HAS_SEQ_IDX:
                b_a = b_a * b_keep
            b_b = b_dtu * b_B[None, :]
            b_aa, b_bb = tl.associative_scan((b_a, b_b), 1, linear_combine)
            b_hs = b_aa * b_h0[:, None] + b_bb
            if HAS_Z or STORE_Y:
                b_y += b_hs * b_C[None, :]
            b_dC = tl.sum(b_dy * b_hs, axis=0)  # (CHUNK,): this block's share of the sum over d_inner
            tl.atomic_add(p_dC + p_bc + n * seqlen + o_t, b_dC, mask=m_t, sem="relaxed")

            # Adjoint: g_t = dy_t C_t + a_{t+1} g_{t+1}, a reverse scan, plus the carry from later chunks.
            b_a1 = tl.exp2(b_dt1 * b_A2[:, None])
            if HAS_SEQ_IDX:
                b_a1 = b_a1 * b_keep1
            b_ga, b_gb = tl.associative_scan((b_a1, b_dy * b_C[None, :]), 1, linear_combine, reverse=True)
            b_g = b_gb + b_ga * _column(b_x, o_n, n)[:, None]  # (BLOCK_D, CHUNK)
            # a_t h_{t-1} = h_t - b_t, so g_t * d(a_t h_{t-1}) / d(Δ_t A) needs no division.
            b_gah = b_g * (b_hs - b_b)
            # One reduction for both: the carry a_0 g_0 into the previous chunk, and this chunk's dA.
            b_x_n, b_dA_n = tl.reduce(
                (tl.where((o_c == 0)[None, :], b_a * b_g, 0.0), b_gah * b_dt), 1, add_pair
            )  # (BLOCK_D,) each
            b_x = tl.where((o_n == n)[None, :], b_x_n[:, None], b_x)
            b_dA = tl.where((o_n == n)[None, :], b_dA + b_dA_n[:, None], b_dA)
            b_ddt += b_gah * b_A[:, None]
            b_gB += b_g * b_B[None, :]
            b_dB = tl.sum(b_g * b_dtu, axis=0)
            tl.atomic_add(p_dB + p_bc + n * seqlen + o_t, b_dB, mask=m_t, sem="relaxed")

        if (HAS_Z or STORE_Y) and HAS_D:
            b_y += b_u * b_D[:, None]
        if HAS_Z:
            b_dz = b_do * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(p_dz + p_dt, b_dz.to(p_dz.dtype.element_ty), mask=m_dt)
        if STORE_Y:
            if HAS_Z:
                b_y = b_y * b_z * b_sig
            tl.store(p_y + p_dt, b_y.to(p_y.dtype.element_ty), mask=m_dt)
        b_ddt += b_gB * b_u
        b_du = b_gB * b_dt
        if HAS_D:
            b_du += b_dy * b_D[:, None]
            b_dD += tl.sum(b_dy * b_u, axis=1)
        if DELTA_SOFTPLUS:
            b_ddt = b_ddt * tl.sigmoid(b_dt_raw)
        b_ddt = tl.where(m_dt, b_ddt, 0.0)
        if HAS_DELTA_BIAS:
            b_ddb += tl.sum(b_ddt, axis=1)
        tl.store(p_du + p_dt, b_du.to(p_du.dtype.element_ty), mask=m_dt)
        tl.store(p_ddelta + p_dt, b_ddt.to(p_ddelta.dtype.element_ty), mask=m_dt)

    tl.store(p_dh0 + p_state, b_x, mask=m_dn)
    # Per-batch partial sums of the channel-wise gradients; the host sums over batch.
    tl.store(p_dA + p_state, b_dA, mask=m_dn)
    if HAS_D:
        tl.store(p_dD + i_b * d_inner + o_d, b_dD, mask=m_d)
    if HAS_DELTA_BIAS:
        tl.store(p_ddelta_bias + i_b * d_inner + o_d, b_ddb, mask=m_d)


def chunk_config(seqlen, tuning=ChunkTuning()):
    """(block_d, chunk, num_warps): a fixed heuristic, no autotuning. The chunk is also the checkpoint
    interval, so the forward and the backward must agree on it."""
    chunk = min(tuning.max_chunk, max(16, next_power_of_2(max(seqlen, 1))))
    num_warps = max(1, min(tuning.max_warps, tuning.block_d * chunk // (32 * tuning.steps_per_thread)))
    return tuning.block_d, chunk, num_warps


def _time_contiguous(t):
    # The chunk kernels read every (batch, row) along time: make the last dimension dense.
    return t if t is None or t.is_contiguous() else t.contiguous()


def scan_fwd_chunk(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, seq_idx, A_is_log=False,
    tuning=ChunkTuning(), out_dtype=None,
):
    """(out, final_state) of the chunk forward; fills chunk_states (batch, d_inner, n_chunks, d_state)
    with the state entering every chunk where it is not empty. With A_is_log, A holds A_log."""
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    if A_is_log:
        A = -torch.exp(A)
    # (batch, d_inner, seqlen) in u's layout, whichever forward runs (as the fake op says); u's dtype or out_dtype
    out = torch.empty_like(u, dtype=out_dtype)
    out_rows = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    u, delta, B, C, z = (_time_contiguous(t) for t in (u, delta, B, C, z))
    final_state = u.new_empty(batch, d_inner, d_state, dtype=torch.float32)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    block_d, chunk, num_warps = chunk_config(seqlen, tuning)
    n_chunks = cdiv(seqlen, chunk)
    launch(
        _chunk_fwd_kernel, (batch, cdiv(d_inner, block_d)),
        u, delta, A, B, C, D, z, delta_bias, initial_state,
        out_rows, final_state, chunk_states,
        seqlen, d_inner, d_state, n_chunks, n_chunks,
        *A.stride(), *seq_idx_args(seq_idx),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, USE_INITIAL_STATE=initial_state is not None,
        SAVE_CHUNK_STATES=chunk_states.numel() > 0, HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_D=block_d, BLOCK_N=next_power_of_2(d_state), CHUNK=chunk, num_warps=num_warps,
    )
    if out_rows is not out:  # the kernel writes time-contiguous rows
        out.copy_(out_rows)
    return out, final_state


def scan_bwd_chunk(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx,
    y_out=None, dBC_out=None, dz_out=None, A_is_log=False, tuning=ChunkTuning(),
):
    """The gradients from the chunk forward's checkpoints, in `triton_scan.ScanGrads`' order; y_out,
    dBC_out, dz_out and A_is_log as `triton_scan.scan_bwd` takes them."""
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    if A_is_log:
        A = -torch.exp(A)
    block_d, chunk, num_warps = chunk_config(seqlen, tuning)
    n_chunks = cdiv(seqlen, chunk)
    u, delta, B, C, z, dout = (_time_contiguous(t) for t in (u, delta, B, C, z, dout))
    f32 = dict(dtype=torch.float32, device=u.device)
    # du, ddelta, dz in their inputs' dtypes: the kernel rounds once when it stores (no cast kernels).
    du = torch.empty(batch, d_inner, seqlen, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(batch, d_inner, seqlen, dtype=delta.dtype, device=u.device)
    dz = torch.empty(batch, d_inner, seqlen, dtype=z.dtype, device=u.device) if z is not None else None
    dA = torch.empty(batch, d_inner, d_state, **f32)  # per-batch partials
    dB = torch.zeros(batch, d_state, seqlen, **f32)  # atomics accumulate here
    dC = torch.zeros(batch, d_state, seqlen, **f32)
    dD = torch.empty(batch, d_inner, **f32) if D is not None else None
    ddelta_bias = torch.empty(batch, d_inner, **f32) if delta_bias is not None else None
    dh0 = torch.empty(batch, d_inner, d_state, **f32)
    if dfinal_state is not None:
        dfinal_state = dfinal_state.contiguous()
    # the kernel writes rows
    y_rows = y_out if y_out is None or y_out.is_contiguous() else torch.empty_like(du, dtype=y_out.dtype)
    launch(
        _chunk_bwd_kernel, (batch, cdiv(d_inner, block_d)),
        u, delta, A, B, C, D, z, delta_bias, chunk_states, dout, dfinal_state,
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0, y_rows,
        seqlen, d_inner, d_state, n_chunks,
        *A.stride(), *seq_idx_args(seq_idx),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, HAS_DHT=dfinal_state is not None, HAS_SEQ_IDX=seq_idx is not None,
        STORE_Y=y_out is not None,
        BLOCK_D=block_d, BLOCK_N=next_power_of_2(d_state), CHUNK=chunk, num_warps=num_warps,
    )
    if y_rows is not y_out:
        y_out.copy_(y_rows)
    empty = torch.empty(0, device=u.device)
    if dBC_out is not None:
        dBC_out[:, :, 0].copy_(dB.transpose(1, 2))
        dBC_out[:, :, 1].copy_(dC.transpose(1, 2))
        dB = dC = empty
    if dz_out is not None:
        dz_out.copy_(dz)
        dz = None
    return (
        du,
        ddelta,
        (dA.sum(0) * A if A_is_log else dA.sum(0)).to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD.sum(0).to(D.dtype) if D is not None else empty,
        dz if dz is not None else empty,
        ddelta_bias.sum(0).to(delta_bias.dtype) if delta_bias is not None else empty,
        dh0,
    )


__all__ = ["ChunkTuning", "chunk_config", "scan_bwd_chunk", "scan_fwd_chunk"]
