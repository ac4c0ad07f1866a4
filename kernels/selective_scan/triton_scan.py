"""Selective scan in Triton: forward and backward kernels, registered as torch.library custom ops.

Glossary (paper notation, Gu & Dao 2023, Algorithm 2):
    u      input x_t                                (batch, d_inner, seqlen)
    delta  step size Δ_t, before bias / softplus    (batch, d_inner, seqlen)
    A      diagonal state matrix (negative)         (d_inner, d_state)
    B, C   input / output projections               (batch, d_state, seqlen)
    D      skip, z the SiLU gate, h the state       (d_inner,), like u, (batch, d_inner, d_state)
    a_t    Ā_t = exp(Δ_t A)    b_t = Δ_t u_t B_t    h_t = a_t h_{t-1} + b_t    y_t = C_t . h_t

The forward for d_state <= SEQ_MAX_D_STATE runs the faster sequential kernel of `triton_scan_seq`
(one thread per channel); the tile kernels below are its fallback and the backward.

Tile design: one program per (batch, block of BLOCK_D channels). It walks the sequence in chunks of
CHUNK steps, holding h (BLOCK_D x d_state) in fp32 registers. Inside a chunk the recurrence is a
linear scan, done with `tl.associative_scan` on [BLOCK_D, d_state, CHUNK] tiles of (a, b); the
state entering the chunk is added afterwards (h_t = (prod a) h_in + scanned b). exp(ΔA) is
computed as exp2(Δ (A log2 e)): the special-function unit's native instruction.

The forward optionally stores h at every chunk start, (batch, d_inner, n_chunks, d_state) fp32,
which is CHUNK times smaller than all states. The backward walks the chunks in reverse, recomputes
the chunk's states from that checkpoint, and runs the adjoint recurrence g_t = dy_t C_t + a_{t+1} g_{t+1}
as a reverse associative scan. dB and dC (summed over d_inner) are accumulated with atomics.
"""


import torch
import triton
import triton.language as tl

from .triton_scan_seq import scan_fwd_seq

# Up to this d_state the forward runs the sequential per-channel kernel of `triton_scan_seq`
# (state in registers, d_state fp32 values per thread); above it, the tile-scan kernel below.
SEQ_MAX_D_STATE = 64


@triton.jit
def _linear_combine(a_l, b_l, a_r, b_r):
    # Composition of h -> a_l h + b_l followed by h -> a_r h + b_r.
    return a_l * a_r, b_l * a_r + b_r


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
def _selective_scan_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_delta_bias, p_h0,
    p_out, p_hT, p_hc,
    seqlen, d_inner, d_state, n_chunks,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_o_b, s_o_d, s_o_l,
    p_seq_idx, s_si_b, s_si_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, SAVE_CHUNK_STATES: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x d_inner x seqlen may pass 2^31
    i_d = tl.program_id(1)
    o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, CHUNK)
    m_d = o_d < d_inner
    m_n = o_n < d_state
    m_dn = m_d[:, None] & m_n[None, :]

    # A pre-scaled by log2(e): exp(ΔA) = exp2(Δ A log2 e).
    b_A2 = tl.load(p_A + o_d[:, None] * s_A_d + o_n[None, :] * s_A_n, mask=m_dn, other=0.0).to(tl.float32)
    b_A2 *= 1.4426950408889634
    if HAS_D:
        b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    p_state = i_b * d_inner * d_state + o_d[:, None] * d_state + o_n[None, :]  # contiguous (batch, d_inner, d_state)
    if USE_INITIAL_STATE:
        b_h = tl.load(p_h0 + p_state, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

    for i_c in range(n_chunks):
        if SAVE_CHUNK_STATES:
            # (batch, d_inner, n_chunks, d_state): the state entering chunk i_c, for the backward.
            p_hc_c = (i_b * d_inner + o_d[:, None]) * n_chunks * d_state + i_c * d_state + o_n[None, :]
            tl.store(p_hc + p_hc_c, b_h, mask=m_dn)
        o_t = i_c * CHUNK + o_c
        m_t = o_t < seqlen
        m_dt = m_d[:, None] & m_t[None, :]
        m_nt = m_n[:, None] & m_t[None, :]
        b_u = tl.load(
            p_u + i_b * s_u_b + o_d[:, None] * s_u_d + o_t[None, :] * s_u_l, mask=m_dt, other=0.0
        ).to(tl.float32)
        b_dt = tl.load(
            p_delta + i_b * s_dt_b + o_d[:, None] * s_dt_d + o_t[None, :] * s_dt_l, mask=m_dt, other=0.0
        ).to(tl.float32)
        b_B = tl.load(
            p_B + i_b * s_B_b + o_n[:, None] * s_B_n + o_t[None, :] * s_B_l, mask=m_nt, other=0.0
        ).to(tl.float32)
        b_C = tl.load(
            p_C + i_b * s_C_b + o_n[:, None] * s_C_n + o_t[None, :] * s_C_l, mask=m_nt, other=0.0
        ).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dt = b_dt + b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = _softplus(b_dt)
        # Steps past the end get Δ = 0: a = 1, b = 0, so they leave h unchanged.
        b_dt = tl.where(m_dt, b_dt, 0.0)  # (BLOCK_D, CHUNK)
        b_a = tl.exp2(b_dt[:, None, :] * b_A2[:, :, None])  # (BLOCK_D, BLOCK_N, CHUNK)
        if HAS_SEQ_IDX:  # a document starts where seq_idx changes: no decay from the previous state
            b_a = b_a * _keep_state(p_seq_idx + i_b * s_si_b, o_t, seqlen, s_si_l)[None, None, :]
        b_b = (b_dt * b_u)[:, None, :] * b_B[None, :, :]  # (BLOCK_D, BLOCK_N, CHUNK)
        b_aa, b_bb = tl.associative_scan((b_a, b_b), 2, _linear_combine)
        b_hs = b_aa * b_h[:, :, None] + b_bb  # (BLOCK_D, BLOCK_N, CHUNK): h_t for the chunk
        b_y = tl.sum(b_hs * b_C[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
        b_h = tl.sum(tl.where((o_c == CHUNK - 1)[None, None, :], b_hs, 0.0), axis=2)  # (BLOCK_D, BLOCK_N)
        if HAS_D:
            b_y += b_u * b_D[:, None]
        if HAS_Z:
            b_z = tl.load(
                p_z + i_b * s_z_b + o_d[:, None] * s_z_d + o_t[None, :] * s_z_l, mask=m_dt, other=0.0
            ).to(tl.float32)
            b_y = b_y * b_z * tl.sigmoid(b_z)
        p_od = p_out + i_b * s_o_b + o_d[:, None] * s_o_d + o_t[None, :] * s_o_l
        tl.store(p_od, b_y.to(p_out.dtype.element_ty), mask=m_dt)
    tl.store(p_hT + p_state, b_h, mask=m_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_delta_bias, p_hc, p_dout, p_dhT,
    p_du, p_ddelta, p_dA, p_dB, p_dC, p_dD, p_dz, p_ddelta_bias, p_dh0,
    seqlen, d_inner, d_state, n_chunks,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_z_b, s_z_d, s_z_l,
    s_do_b, s_do_d, s_do_l,
    p_seq_idx, s_si_b, s_si_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x d_inner x seqlen may pass 2^31
    i_d = tl.program_id(1)
    o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, CHUNK)
    m_d = o_d < d_inner
    m_n = o_n < d_state
    m_dn = m_d[:, None] & m_n[None, :]

    b_A = tl.load(p_A + o_d[:, None] * s_A_d + o_n[None, :] * s_A_n, mask=m_dn, other=0.0).to(tl.float32)
    b_A2 = b_A * 1.4426950408889634
    if HAS_D:
        b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DELTA_BIAS:
        b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_ddb = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    p_state = i_b * d_inner * d_state + o_d[:, None] * d_state + o_n[None, :]
    # b_x: dL/dh at the end of the current chunk through the recurrence (a_{t+1} g_{t+1}).
    if HAS_DHT:
        b_x = tl.load(p_dhT + p_state, mask=m_dn, other=0.0).to(tl.float32)
    else:
        b_x = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

    for i_rev in range(n_chunks):
        i_c = n_chunks - 1 - i_rev
        o_t = i_c * CHUNK + o_c
        m_t = o_t < seqlen
        m_t1 = (o_t + 1) < seqlen
        m_dt = m_d[:, None] & m_t[None, :]
        m_dt1 = m_d[:, None] & m_t1[None, :]
        m_nt = m_n[:, None] & m_t[None, :]
        p_ud = i_b * s_u_b + o_d[:, None] * s_u_d + o_t[None, :] * s_u_l
        p_dtd = i_b * s_dt_b + o_d[:, None] * s_dt_d + o_t[None, :] * s_dt_l
        p_grad = i_b * d_inner * seqlen + o_d[:, None] * seqlen + o_t[None, :]  # contiguous du, ddelta, dz
        b_u = tl.load(p_u + p_ud, mask=m_dt, other=0.0).to(tl.float32)
        b_dt_raw = tl.load(p_delta + p_dtd, mask=m_dt, other=0.0).to(tl.float32)
        # Δ at t + 1 for the adjoint recurrence, which needs a_{t+1} at step t.
        b_dt1 = tl.load(p_delta + p_dtd + s_dt_l, mask=m_dt1, other=0.0).to(tl.float32)
        b_B = tl.load(
            p_B + i_b * s_B_b + o_n[:, None] * s_B_n + o_t[None, :] * s_B_l, mask=m_nt, other=0.0
        ).to(tl.float32)
        b_C = tl.load(
            p_C + i_b * s_C_b + o_n[:, None] * s_C_n + o_t[None, :] * s_C_l, mask=m_nt, other=0.0
        ).to(tl.float32)
        b_do = tl.load(
            p_dout + i_b * s_do_b + o_d[:, None] * s_do_d + o_t[None, :] * s_do_l, mask=m_dt, other=0.0
        ).to(tl.float32)
        if HAS_DELTA_BIAS:
            b_dt_raw = b_dt_raw + b_db[:, None]
            b_dt1 = b_dt1 + b_db[:, None]
        if DELTA_SOFTPLUS:
            b_dt = _softplus(b_dt_raw)
            b_dt1 = _softplus(b_dt1)
        else:
            b_dt = b_dt_raw
        b_dt = tl.where(m_dt, b_dt, 0.0)
        # a_{t+1} = 1 past the end of the sequence and at the chunk's last step (the carry b_x covers it).
        b_dt1 = tl.where(m_dt1 & (o_c < CHUNK - 1)[None, :], b_dt1, 0.0)

        # Recompute the chunk's states from the checkpoint.
        p_hc_c = i_b * d_inner * n_chunks * d_state + o_d[:, None] * n_chunks * d_state + i_c * d_state + o_n[None, :]
        b_h0 = tl.load(p_hc + p_hc_c, mask=m_dn, other=0.0)
        b_a = tl.exp2(b_dt[:, None, :] * b_A2[:, :, None])  # (BLOCK_D, BLOCK_N, CHUNK)
        if HAS_SEQ_IDX:
            b_a = b_a * _keep_state(p_seq_idx + i_b * s_si_b, o_t, seqlen, s_si_l)[None, None, :]
        b_dtu = b_dt * b_u  # (BLOCK_D, CHUNK)
        b_b = b_dtu[:, None, :] * b_B[None, :, :]  # (BLOCK_D, BLOCK_N, CHUNK)
        b_aa, b_bb = tl.associative_scan((b_a, b_b), 2, _linear_combine)
        b_hs = b_aa * b_h0[:, :, None] + b_bb  # (BLOCK_D, BLOCK_N, CHUNK)

        # Output gate and skip.
        if HAS_Z:
            p_zd = i_b * s_z_b + o_d[:, None] * s_z_d + o_t[None, :] * s_z_l
            b_z = tl.load(p_z + p_zd, mask=m_dt, other=0.0).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
            b_y = tl.sum(b_hs * b_C[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
            if HAS_D:
                b_y += b_u * b_D[:, None]
            b_dz = b_do * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(p_dz + p_grad, b_dz, mask=m_dt)
            b_dy = b_do * b_z * b_sig
        else:
            b_dy = b_do
        if HAS_D:
            b_dD += tl.sum(b_dy * b_u, axis=1)

        # Adjoint: g_t = dy_t C_t + a_{t+1} g_{t+1}, as a reverse scan, plus the carry from later chunks.
        b_a1 = tl.exp2(b_dt1[:, None, :] * b_A2[:, :, None])  # (BLOCK_D, BLOCK_N, CHUNK)
        if HAS_SEQ_IDX:  # a_{t+1} is 0 where step t + 1 starts a new document
            b_a1 = b_a1 * _keep_state(p_seq_idx + i_b * s_si_b, o_t + 1, seqlen, s_si_l)[None, None, :]
        b_dyC = b_dy[:, None, :] * b_C[None, :, :]
        b_ga, b_gb = tl.associative_scan((b_a1, b_dyC), 2, _linear_combine, reverse=True)
        b_g = b_gb + b_ga * b_x[:, :, None]  # (BLOCK_D, BLOCK_N, CHUNK)
        b_x = tl.sum(tl.where((o_c == 0)[None, None, :], b_a * b_g, 0.0), axis=2)

        # a_t h_{t-1} = h_t - b_t, so g_t * d(a_t h_{t-1}) / d(Δ_t A) needs no division.
        b_gah = b_g * (b_hs - b_b)  # (BLOCK_D, BLOCK_N, CHUNK)
        b_dA += tl.sum(b_gah * b_dt[:, None, :], axis=2)
        b_gB = tl.sum(b_g * b_B[None, :, :], axis=1)  # (BLOCK_D, CHUNK)
        b_ddt = tl.sum(b_gah * b_A[:, :, None], axis=1) + b_gB * b_u
        b_du = b_gB * b_dt
        if HAS_D:
            b_du += b_dy * b_D[:, None]
        if DELTA_SOFTPLUS:
            b_ddt = b_ddt * tl.sigmoid(b_dt_raw)
        b_ddt = tl.where(m_dt, b_ddt, 0.0)
        if HAS_DELTA_BIAS:
            b_ddb += tl.sum(b_ddt, axis=1)
        tl.store(p_du + p_grad, b_du, mask=m_dt)
        tl.store(p_ddelta + p_grad, b_ddt, mask=m_dt)

        # dB, dC are sums over d_inner: reduce the block, then one atomic per (n, t) per block.
        b_dB = tl.sum(b_g * b_dtu[:, None, :], axis=0)  # (BLOCK_N, CHUNK)
        b_dC = tl.sum(b_hs * b_dy[:, None, :], axis=0)  # (BLOCK_N, CHUNK)
        p_bc = i_b * d_state * seqlen + o_n[:, None] * seqlen + o_t[None, :]  # contiguous (batch, d_state, seqlen)
        tl.atomic_add(p_dB + p_bc, b_dB, mask=m_nt, sem="relaxed")
        tl.atomic_add(p_dC + p_bc, b_dC, mask=m_nt, sem="relaxed")

    tl.store(p_dh0 + p_state, b_x, mask=m_dn)
    # Per-batch partial sums of the channel-wise gradients; the host sums over batch.
    tl.store(p_dA + p_state, b_dA, mask=m_dn)
    if HAS_D:
        tl.store(p_dD + i_b * d_inner + o_d, b_dD, mask=m_d)
    if HAS_DELTA_BIAS:
        tl.store(p_ddelta_bias + i_b * d_inner + o_d, b_ddb, mask=m_d)


def _fwd_config(d_state, seqlen):
    """(BLOCK_D, BLOCK_N, CHUNK, num_warps): a fixed heuristic, no autotuning."""
    block_n = triton.next_power_of_2(d_state)
    chunk = 32 if block_n <= 16 else 16
    block_d = max(1, 2048 // (block_n * chunk))
    return block_d, block_n, chunk, 4


def _bwd_config(d_state, seqlen):
    # One channel per program and 2 warps: the best of the configs timed on H100 (NOTES.md).
    block_n = triton.next_power_of_2(d_state)
    chunk = 32 if block_n <= 16 else 16
    return 1, block_n, chunk, 2


def _chunk_len(d_state, seqlen):
    # The forward's checkpoints and the backward must use the same chunk length.
    return _fwd_config(d_state, seqlen)[2]


def _seq_idx_args(seq_idx):
    return (seq_idx, *seq_idx.stride()) if seq_idx is not None else (None, 0, 0)


def _empty():
    return torch.empty(0)


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    block_d, block_n, chunk, num_warps = _fwd_config(d_state, seqlen)
    n_chunks = triton.cdiv(seqlen, chunk)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)  # (batch, d_inner, seqlen)
    final_state = u.new_empty(batch, d_inner, d_state, dtype=torch.float32)
    if save_states:
        chunk_states = u.new_empty(batch, d_inner, n_chunks, d_state, dtype=torch.float32)
    else:
        chunk_states = u.new_empty(0, dtype=torch.float32)
    if d_state <= SEQ_MAX_D_STATE:
        out, final_state = scan_fwd_seq(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, chunk, seq_idx
        )
        return out, final_state, chunk_states
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    z_ = z if z is not None else u
    grid = (batch, triton.cdiv(d_inner, block_d))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, initial_state,
        out, final_state, chunk_states,
        seqlen, d_inner, d_state, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *z_.stride(), *out.stride(),
        *_seq_idx_args(seq_idx),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, USE_INITIAL_STATE=initial_state is not None,
        SAVE_CHUNK_STATES=save_states, HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, num_warps=num_warps,
    )
    return out, final_state, chunk_states


def _scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    block_d, block_n, _, num_warps = _bwd_config(d_state, seqlen)
    chunk = _chunk_len(d_state, seqlen)
    n_chunks = triton.cdiv(seqlen, chunk)
    f32 = dict(dtype=torch.float32, device=u.device)
    du = torch.empty(batch, d_inner, seqlen, **f32)
    ddelta = torch.empty(batch, d_inner, seqlen, **f32)
    dz = torch.empty(batch, d_inner, seqlen, **f32) if z is not None else None
    dA = torch.empty(batch, d_inner, d_state, **f32)  # per-batch partials
    dB = torch.zeros(batch, d_state, seqlen, **f32)  # atomics accumulate here
    dC = torch.zeros(batch, d_state, seqlen, **f32)
    dD = torch.empty(batch, d_inner, **f32) if D is not None else None
    ddelta_bias = torch.empty(batch, d_inner, **f32) if delta_bias is not None else None
    dh0 = torch.empty(batch, d_inner, d_state, **f32)
    if dfinal_state is not None:
        dfinal_state = dfinal_state.contiguous()
    z_ = z if z is not None else u
    grid = (batch, triton.cdiv(d_inner, block_d))
    _selective_scan_bwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, chunk_states, dout, dfinal_state,
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0,
        seqlen, d_inner, d_state, n_chunks,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *z_.stride(), *dout.stride(),
        *_seq_idx_args(seq_idx),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, HAS_DHT=dfinal_state is not None, HAS_SEQ_IDX=seq_idx is not None,
        BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk, num_warps=num_warps,
    )
    return (
        du.to(u.dtype),
        ddelta.to(delta.dtype),
        dA.sum(0).to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD.sum(0).to(D.dtype) if D is not None else _empty().to(u.device),
        dz.to(z.dtype) if z is not None else _empty().to(u.device),
        ddelta_bias.sum(0).to(delta_bias.dtype) if delta_bias is not None else _empty().to(u.device),
        dh0,
    )


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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
    with _device_guard(u):
        return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx)


@selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    n_chunks = triton.cdiv(seqlen, _chunk_len(d_state, seqlen))
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
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
    with _device_guard(u):
        return _scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx
        )


@selective_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    empty = u.new_empty(0)
    return (
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(delta, memory_format=torch.contiguous_format),
        torch.empty_like(A, memory_format=torch.contiguous_format),
        torch.empty_like(B, memory_format=torch.contiguous_format),
        torch.empty_like(C, memory_format=torch.contiguous_format),
        torch.empty_like(D) if D is not None else empty,
        torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else empty,
        torch.empty_like(delta_bias) if delta_bias is not None else empty,
        u.new_empty(batch, d_inner, d_state, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx = inputs
    ctx.delta_softplus = delta_softplus
    ctx.has_initial_state = initial_state is not None
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2], seq_idx)


def _backward(ctx, dout, dfinal_state, dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, chunk_states, seq_idx = ctx.saved_tensors
    if chunk_states.numel() == 0 and u.shape[-1] > 0:
        raise RuntimeError("selective_scan backward needs the forward to run with save_states=True")
    grads = selective_scan_bwd_op(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, chunk_states, dout.contiguous(), dfinal_state,
        seq_idx,
    )
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = grads
    return (
        du, ddelta, dA, dB, dC,
        dD if D is not None else None,
        dz if z is not None else None,
        ddelta_bias if delta_bias is not None else None,
        None,  # delta_softplus: a flag
        dinitial_state if ctx.has_initial_state else None,
        None,  # save_states: a flag
        None,  # seq_idx: integer document ids
    )


selective_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, seq_idx=None
):
    """Triton selective scan; same semantics as `hf_mamba.kernels.selective_scan` (backend="triton")."""
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, final_state, _ = selective_scan_fwd_op(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, save_states, seq_idx
    )
    return (out, final_state) if return_final_state else out


__all__ = ["selective_scan_triton"]
