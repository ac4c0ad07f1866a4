"""Selective scan in Triton: forward and backward kernels, registered as torch.library custom ops.

Glossary (paper notation, Gu & Dao 2023, Algorithm 2):
    u      input x_t                                (batch, d_inner, seqlen)
    delta  step size Δ_t, before bias / softplus    (batch, d_inner, seqlen)
    A      diagonal state matrix (negative)         (d_inner, d_state)
    B, C   input / output projections               (batch, d_state, seqlen)
    D      skip, z the SiLU gate, h the state       (d_inner,), like u, (batch, d_inner, d_state)
    a_t    Ā_t = exp(Δ_t A)    b_t = Δ_t u_t B_t    h_t = a_t h_{t-1} + b_t    y_t = C_t . h_t

Chunk design (the layout of mamba_ssm's CUDA kernels): one program per (batch, BLOCK_D channels),
walking the sequence in chunks of CHUNK time steps spread over the program's threads, about 8
consecutive steps per thread. Inside a chunk the kernel loops over the d_state states; for each it
runs the linear recurrence along time as `tl.associative_scan` on (a, b) pairs, which is mostly a
sequential in-thread scan with one shuffle/shared-memory pass per chunk. Sums over states (y, and
in the backward dΔ and du) are then plain in-register accumulations across the loop. exp(ΔA) is
computed as exp2(Δ (A log2 e)): the special-function unit's native instruction.

The forward for small d_state can instead run the sequential per-channel kernel of `triton_scan_seq`
(see `_use_seq_forward`), and the backward up to d_state 16 runs the per-channel kernel of
`triton_scan_bwd` (`_use_seq_backward`), from the same checkpoints; the chunk backward below serves
larger d_state. Either forward stores h at every start of a backward chunk, (batch,
d_inner, n_chunks, d_state) fp32, CHUNK times smaller than all states (the chunk forward may walk
longer chunks, FWD_MAX_CHUNK, and stores the checkpoints inside them). The backward walks the chunks in reverse,
recomputes each state's h over the chunk from that checkpoint, and runs the adjoint recurrence
g_t = dy_t C_t + a_{t+1} g_{t+1} as a reverse scan. dB and dC are sums over d_inner: each program
adds its share with atomics, as mamba_ssm does.

u, delta, z, B, C and dout are read along time, so the wrappers make them time-contiguous first
(the model already passes them that way).
"""


import torch
import triton
import triton.language as tl

from .._launch import cdiv, device_guard, launch, next_power_of_2, seq_idx_args
from .triton_scan_bwd import scan_bwd_seq
from .triton_scan_seq import scan_fwd_seq

# Up to this d_state the sequential per-channel forward of `triton_scan_seq` may be used (state in
# registers, d_state fp32 values per thread); above it, always the chunk forward below.
SEQ_MAX_D_STATE = 64
# Which forward to run for d_state <= SEQ_MAX_D_STATE: "seq", "chunk", or None (measured choice).
FORWARD = None
# Up to this d_state the backward runs the per-channel kernel of `triton_scan_bwd` (all states of a
# channel in one thread's registers); above it the chunk backward below. With 16-step tiles the
# per-channel backward beat the chunk backward in fp32 too (H200, forward + backward 2.21 / 5.71 /
# 3.07 ms against 2.78 / 7.25 / 4.21 on the three benchmark shapes, kernels/NOTES.md session 11).
# BACKWARD: "seq", "chunk" or None (by d_state).
SEQ_BWD_MAX_D_STATE = 16
BACKWARD = None
# Chunk kernels: BLOCK_D channels x up to MAX_CHUNK steps (a power of two) per program, spread
# over up to MAX_WARPS warps with about STEPS_PER_THREAD steps per thread. One warp per channel and
# 128-step chunks had the fastest forward+backward of 9 configs on H100 at (8, 1536, 2048, 16) and
# (4, 1536, 1024, 16), bf16 (`scripts/benchmark_kernels.py --sweep`, kernels/NOTES.md): no
# cross-warp barriers in the scans and reductions, and many small programs per multiprocessor.
MAX_CHUNK = 128
STEPS_PER_THREAD = 4
MAX_WARPS = 1
BLOCK_D = 1
# The chunk forward may walk longer chunks than the backward (a multiple of its chunk, which stays
# the checkpoint interval): mamba_ssm's forward uses 2048-step chunks, 16 steps per thread, 4 warps.
# Not timed yet on the GPU; the defaults keep the forward's chunk equal to the backward's.
FWD_MAX_CHUNK = 128
FWD_STEPS_PER_THREAD = 4
FWD_MAX_WARPS = 1


@triton.jit
def _linear_combine(a_l, b_l, a_r, b_r):
    # Composition of h -> a_l h + b_l followed by h -> a_r h + b_r.
    return a_l * a_r, b_l * a_r + b_r


@triton.jit
def _add_pair(a_l, b_l, a_r, b_r):
    return a_l + a_r, b_l + b_r


@triton.jit
def _softplus(x):
    # log(1 + e^x), linear above 20 like torch.nn.functional.softplus.
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


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
def _chunk_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_delta_bias, p_h0,
    p_out, p_hT, p_hc,
    seqlen, d_inner, d_state, n_chunks, n_ckpt,
    s_A_d, s_A_n,
    p_seq_idx, s_si_b, s_si_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, SAVE_CHUNK_STATES: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, CKPT: tl.constexpr,
):
    # u, delta, z, out: contiguous (batch, d_inner, seqlen); B, C: contiguous (batch, d_state, seqlen).
    # Checkpoints every CKPT steps (the backward's chunk; CKPT divides CHUNK): the state entering a
    # chunk, and inside a longer chunk the scanned state after every CKPT-th step.
    i_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x d_inner x seqlen may pass 2^31
    i_d = tl.program_id(1)
    o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, CHUNK)
    m_d = o_d < d_inner
    m_dn = m_d[:, None] & (o_n < d_state)[None, :]
    if HAS_D:
        b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    p_state = (i_b * d_inner + o_d[:, None]) * d_state + o_n[None, :]  # contiguous (batch, d_inner, d_state)
    if USE_INITIAL_STATE:
        b_h = tl.load(p_h0 + p_state, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    p_row = (i_b * d_inner + o_d[:, None]) * seqlen  # start of each channel's row
    p_bc = i_b * d_state * seqlen  # start of this batch's B and C

    for i_c in range(n_chunks):
        if SAVE_CHUNK_STATES:
            # (batch, d_inner, n_ckpt, d_state): the state entering chunk i_c, for the backward.
            p_hc_c = (i_b * d_inner + o_d[:, None]) * n_ckpt * d_state + i_c * (CHUNK // CKPT) * d_state
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
            b_dt = _softplus(b_dt)
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
            b_aa, b_bb = tl.associative_scan((b_a, b_b), 1, _linear_combine)
            b_hs = b_aa * _column(b_h, o_n, n)[:, None] + b_bb  # (BLOCK_D, CHUNK): h_t of state n
            if SAVE_CHUNK_STATES and CHUNK > CKPT:
                # h after step t enters checkpoint (t + 1) / CKPT when that is a checkpoint inside this chunk.
                m_ck = ((o_c + 1) % CKPT == 0) & (o_c < CHUNK - 1) & (o_t + 1 < seqlen)
                p_ck = (i_b * d_inner + o_d[:, None]) * n_ckpt * d_state + ((o_t + 1) // CKPT)[None, :] * d_state
                tl.store(p_hc + p_ck + n, b_hs, mask=m_d[:, None] & m_ck[None, :])
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
    i_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x d_inner x seqlen may pass 2^31
    i_d = tl.program_id(1)
    o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, CHUNK)
    m_d = o_d < d_inner
    m_dn = m_d[:, None] & (o_n < d_state)[None, :]
    if HAS_D:
        b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_ddb = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    p_state = (i_b * d_inner + o_d[:, None]) * d_state + o_n[None, :]
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
            b_dt = _softplus(b_dt_raw)
            b_dt1 = _softplus(b_dt1)
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
            b_aa, b_bb = tl.associative_scan((b_a, b_b), 1, _linear_combine)
            b_hs = b_aa * b_h0[:, None] + b_bb
            if HAS_Z or STORE_Y:
                b_y += b_hs * b_C[None, :]
            b_dC = tl.sum(b_dy * b_hs, axis=0)  # (CHUNK,): this block's share of the sum over d_inner
            tl.atomic_add(p_dC + p_bc + n * seqlen + o_t, b_dC, mask=m_t, sem="relaxed")

            # Adjoint: g_t = dy_t C_t + a_{t+1} g_{t+1}, a reverse scan, plus the carry from later chunks.
            b_a1 = tl.exp2(b_dt1 * b_A2[:, None])
            if HAS_SEQ_IDX:
                b_a1 = b_a1 * b_keep1
            b_ga, b_gb = tl.associative_scan((b_a1, b_dy * b_C[None, :]), 1, _linear_combine, reverse=True)
            b_g = b_gb + b_ga * _column(b_x, o_n, n)[:, None]  # (BLOCK_D, CHUNK)
            # a_t h_{t-1} = h_t - b_t, so g_t * d(a_t h_{t-1}) / d(Δ_t A) needs no division.
            b_gah = b_g * (b_hs - b_b)
            # One reduction for both: the carry a_0 g_0 into the previous chunk, and this chunk's dA.
            b_x_n, b_dA_n = tl.reduce(
                (tl.where((o_c == 0)[None, :], b_a * b_g, 0.0), b_gah * b_dt), 1, _add_pair
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


def _chunk_config(seqlen):
    """(BLOCK_D, CHUNK, num_warps): a fixed heuristic, no autotuning. CHUNK is also the checkpoint interval."""
    chunk = min(MAX_CHUNK, max(16, next_power_of_2(max(seqlen, 1))))
    num_warps = max(1, min(MAX_WARPS, BLOCK_D * chunk // (32 * STEPS_PER_THREAD)))
    return BLOCK_D, chunk, num_warps


def _fwd_chunk_config(seqlen, ckpt):
    """(BLOCK_D, CHUNK, num_warps) of the chunk forward: CHUNK a multiple of the checkpoint interval."""
    chunk = max(ckpt, min(FWD_MAX_CHUNK, max(16, next_power_of_2(max(seqlen, 1)))))
    num_warps = max(1, min(FWD_MAX_WARPS, BLOCK_D * chunk // (32 * FWD_STEPS_PER_THREAD)))
    return BLOCK_D, chunk, num_warps


def _chunk_len(seqlen):
    # The forward's checkpoints and the backward must use the same chunk length.
    return _chunk_config(seqlen)[1]


def _use_seq_forward(batch, d_inner, seqlen, d_state):
    if d_state > SEQ_MAX_D_STATE:
        return False
    if FORWARD is not None:
        return FORWARD == "seq"
    return True


def _use_seq_backward(d_state):
    if BACKWARD is not None:
        return BACKWARD == "seq"
    return d_state <= SEQ_BWD_MAX_D_STATE


def _time_contiguous(t):
    # The chunk kernels read every (batch, row) along time: make the last dimension dense.
    return t if t is None or t.is_contiguous() else t.contiguous()


def _empty():
    return torch.empty(0)


def _scan_fwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx, need_final_state=True,
    A_is_log=False,
):
    """(out, final_state, chunk_states); final_state may be None without need_final_state. With
    A_is_log, A holds A_log (A = -exp(A_log)): the sequential kernels compute A themselves."""
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    chunk = _chunk_len(seqlen)  # the backward's chunk: the checkpoint interval
    n_ckpt = cdiv(seqlen, chunk)
    if save_states:
        chunk_states = u.new_empty(batch, d_inner, n_ckpt, d_state, dtype=torch.float32)
    else:
        chunk_states = u.new_empty(0, dtype=torch.float32)
    if _use_seq_forward(batch, d_inner, seqlen, d_state):
        out, final_state = scan_fwd_seq(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, chunk, seq_idx,
            need_final_state, A_is_log,
        )
        return out, final_state, chunk_states
    if A_is_log:
        A = -torch.exp(A)
    out = torch.empty_like(u)  # (batch, d_inner, seqlen) in u's layout, whichever forward runs (as the fake op says)
    out_rows = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    u, delta, B, C, z = (_time_contiguous(t) for t in (u, delta, B, C, z))
    final_state = u.new_empty(batch, d_inner, d_state, dtype=torch.float32)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    block_d, fwd_chunk, num_warps = _fwd_chunk_config(seqlen, chunk)
    grid = (batch, cdiv(d_inner, block_d))
    launch(
        _chunk_fwd_kernel, grid,
        u, delta, A, B, C, D, z, delta_bias, initial_state,
        out_rows, final_state, chunk_states,
        seqlen, d_inner, d_state, cdiv(seqlen, fwd_chunk), n_ckpt,
        *A.stride(), *seq_idx_args(seq_idx),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, USE_INITIAL_STATE=initial_state is not None,
        SAVE_CHUNK_STATES=save_states, HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_D=block_d, BLOCK_N=next_power_of_2(d_state), CHUNK=fwd_chunk, CKPT=chunk, num_warps=num_warps,
    )
    if out_rows is not out:  # the kernel writes time-contiguous rows
        out.copy_(out_rows)
    return out, final_state, chunk_states


def _scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx, y_out=None,
    need_dinitial=True, dBC_out=None, dz_out=None, A_is_log=False,
):
    """The scan's gradients; y_out, laid out as torch.empty_like(u), also receives the forward's output.
    Without need_dinitial the initial state's gradient may come back empty. With dBC_out (batch,
    seqlen, 2, d_state) dB and dC are written there instead and come back empty, and likewise dz
    with dz_out (batch, d_inner, seqlen). Outputs may share storage (see `_distinct`). With A_is_log,
    A holds A_log (A = -exp(A_log)) and the gradient returned is A_log's."""
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    if _use_seq_backward(d_state):
        return scan_bwd_seq(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, _chunk_len(seqlen), dout,
            dfinal_state, seq_idx, y_out, need_dinitial, dBC_out, dz_out, A_is_log,
        )
    if A_is_log:
        A = -torch.exp(A)
    block_d, chunk, num_warps = _chunk_config(seqlen)
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
    y_rows = y_out if y_out is None or y_out.is_contiguous() else torch.empty_like(du)  # the kernel writes rows
    grid = (batch, cdiv(d_inner, block_d))
    launch(
        _chunk_bwd_kernel, grid,
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
    if dBC_out is not None:
        dBC_out[:, :, 0].copy_(dB.transpose(1, 2))
        dBC_out[:, :, 1].copy_(dC.transpose(1, 2))
        dB = dC = _empty().to(u.device)
    if dz_out is not None:
        dz_out.copy_(dz)
        dz = None
    return (
        du,
        ddelta,
        (dA.sum(0) * A if A_is_log else dA.sum(0)).to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD.sum(0).to(D.dtype) if D is not None else _empty().to(u.device),
        dz if dz is not None else _empty().to(u.device),
        ddelta_bias.sum(0).to(delta_bias.dtype) if delta_bias is not None else _empty().to(u.device),
        dh0,
    )


@torch.library.custom_op("hf_mamba::selective_scan_fwd", mutates_args=())
def selective_scan_fwd_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    save_states: bool,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, final_state, chunk_states); chunk_states is empty unless save_states."""
    with device_guard(u):
        return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx)


@selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    n_chunks = cdiv(seqlen, _chunk_len(seqlen))
    out = torch.empty_like(u)
    final_state = u.new_empty(batch, d_inner, d_state, dtype=torch.float32)
    shape = (batch, d_inner, n_chunks, d_state) if save_states else (0,)
    return out, final_state, u.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("hf_mamba::selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk_states: torch.Tensor,
    dout: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); absent inputs get empty tensors."""
    with device_guard(u):
        return _distinct(_scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx
        ))


def _distinct(tensors):
    """The tensors as a custom op must return them: none aliasing another and none at an offset into
    its storage (the fake kernel's fresh tensors). The backward returns views into one buffer for the
    small gradients; those are copied out."""
    seen = set()
    out = []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out.append(t.clone() if ptr in seen or t.storage_offset() else t)
        seen.add(ptr)
    return tuple(out)


@selective_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    empty = u.new_empty(0)
    if _use_seq_backward(d_state):  # du, ddelta, dz in u's layout
        du, ddelta = torch.empty_like(u), torch.empty_like(u, dtype=delta.dtype)
        dz = torch.empty_like(u, dtype=z.dtype) if z is not None else empty
    else:
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
        dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else empty
    return (
        du,
        ddelta,
        torch.empty_like(A, memory_format=torch.contiguous_format),
        torch.empty_like(B, memory_format=torch.contiguous_format),
        torch.empty_like(C, memory_format=torch.contiguous_format),
        torch.empty_like(D) if D is not None else empty,
        dz,
        torch.empty_like(delta_bias) if delta_bias is not None else empty,
        u.new_empty(batch, d_inner, d_state, dtype=torch.float32),
    )


def _input_grads(ctx, grads):
    """The scan's gradients in the order of the forward op's inputs."""
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = grads
    return (
        du, ddelta, dA, dB, dC,
        dD if ctx.has_D else None,
        dz if ctx.has_z else None,
        ddelta_bias if ctx.has_delta_bias else None,
        None,  # delta_softplus: a flag
        dinitial_state if ctx.has_initial_state else None,
        None,  # save_states: a flag
        None,  # seq_idx: integer document ids
    )


def _save(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, seq_idx):
    ctx.delta_softplus = delta_softplus
    ctx.has_D, ctx.has_z, ctx.has_delta_bias = D is not None, z is not None, delta_bias is not None
    ctx.has_initial_state = initial_state is not None
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states, seq_idx)


def _saved_for_backward(ctx):
    saved = ctx.saved_tensors
    if saved[8].numel() == 0 and saved[0].shape[-1] > 0:
        raise RuntimeError("selective_scan backward needs the forward to run with save_states=True")
    return saved


def _backward(ctx, dout, dfinal_state, dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, chunk_states, seq_idx = _saved_for_backward(ctx)
    grads = selective_scan_bwd_op(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, chunk_states, dout, dfinal_state,
        seq_idx,
    )
    return _input_grads(ctx, grads)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx = inputs
    _save(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, output[2], seq_idx)


selective_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _SelectiveScanEager(torch.autograd.Function):
    """The same kernels as the custom ops, without the dispatcher in eager mode.

    Calling a torch.library custom op with autograd costs about 0.2 ms of CPU per forward +
    backward (measured on this project's 2-core CPU machine), several times a plain autograd.Function;
    a 24-layer model pays it per layer and step, and small models' training steps are CPU-bound.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx):
        with device_guard(u):
            out, final_state, chunk_states = _scan_fwd(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx
            )
        _save(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, seq_idx)
        ctx.set_materialize_grads(False)
        return out, final_state

    @staticmethod
    def backward(ctx, dout, dfinal_state):
        u, delta, A, B, C, D, z, delta_bias, chunk_states, seq_idx = _saved_for_backward(ctx)
        dout = torch.zeros_like(u) if dout is None else dout  # _scan_bwd makes it time-contiguous
        with device_guard(u):
            grads = _scan_bwd(
                u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, chunk_states, dout, dfinal_state, seq_idx
            )
        return _input_grads(ctx, grads)


def selective_scan_triton(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, seq_idx=None
):
    """Triton selective scan; same semantics as `hf_mamba.kernels.selective_scan` (backend="triton")."""
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, save_states, seq_idx)
    if torch.compiler.is_compiling():
        out, final_state, _ = selective_scan_fwd_op(*args)  # the op torch.compile / export trace through
    elif not save_states:  # nothing to differentiate: the autograd Function's apply would only cost host time
        with device_guard(u):
            out, final_state, _ = _scan_fwd(*args, need_final_state=return_final_state)
    else:
        out, final_state = _SelectiveScanEager.apply(*args)
    return (out, final_state) if return_final_state else out


__all__ = ["selective_scan_triton"]
