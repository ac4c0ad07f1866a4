"""Backward selective scan, recurrent form: one channel per thread, generated for each d_state (as the
forward, `recurrent_fwd`), and its host side.

Glossary as in `triton_scan`: a_t = exp(Δ_t A), h_t = a_t h_{t-1} + Δ_t u_t B_t, y_t = C_t . h_t.
The adjoint g_t = dL/dh_t = dy_t C_t + x_t with the carry x_t = a_{t+1} g_{t+1} runs backwards in time.

Every thread owns one channel and all its d_state states, as in `recurrent_fwd`, so the sums over
states (dΔ, du, y) need no shuffles. The work per state update is then a few FMAs and one exp2:
- The forward stored h every CKPT steps. For each of those chunks, last to first, the kernel reruns
  the chunk forward from its checkpoint and keeps h at the start of every T-step tile in a small
  scratch buffer (phase F; one chunk per program, so mostly in L2), then walks the tiles backwards
  (phase R): it recomputes the tile's states and a_t in registers, one state at a time, and runs
  the adjoint back over the tile.
- dB and dC are sums over channels, that is over the lanes of a warp. On CUDA each warp sums its
  2T values per state and tile (dC_t, dB_t) with a reduce-scatter over shuffles (`_lane_sum`,
  about one shuffle per value; a tree per value takes five), and each lane adds one sum to global
  memory with an atomic. The interpreter sums with tl.sum.
- Short batches cut the sequence into segments, as the forward does. The adjoint entering a segment
  from its right is linear in the carry: x_out = Q + P x_in per state, with P = prod a_t over the
  segment and Q the segment's own part (pass 1, ADJOINT_ONLY, a forward walk: p *= a_t,
  Q += p dy_t C_t; the first segment needs none). `chain.chain_adjoints` chains them from the last,
  and pass 2 runs every segment from its true carry. Document resets (seq_idx) are a_t = 0 and need
  nothing else.

H200, bf16, forward + backward at (8, 1536, 2048, 16): 1.55 ms against mamba_ssm's 2.19
(docs/kernels.md, "Measured"). With the states of phase F and pass 1 unrolled the kernel compiles slowly
(on the 2-core CI machine, for sm_90, 8 s for pass 2 and 3.5 s for pass 1, mostly in Triton's coalescing
pass, whose cost grows with memory ops times the kernel's size squared); a variant that loops over the
states one at a time compiles in 2.7 and 0.6 s and runs 4-8% slower, so it runs while the unrolled one
compiles in the background (`launch_once_compiled`, `RecurrentBwdTuning`).
"""

import functools
from dataclasses import dataclass

import torch

from .._launch import cdiv, launch_once_compiled, seq_idx_args, wide_index
from ..triton_utils import shfl_xor_code
from .chain import ChainTuning, chain_adjoints, segment_count
from .codegen import (
    HEADER,
    ZERO,
    bf16_pairs,
    decay_rate,
    first_tile,
    generated_kernel,
    keeps,
    load_states,
    pack,
    program_ids,
    store_states,
    time_vector,
    unpack,
)


@dataclass(frozen=True)
class RecurrentBwdTuning:
    """Launch choices of the recurrent backward; docs/kernels.md ("Backward") has their measurements.

    warps_per_sm, min_tiles_per_seg: below warps_per_sm one-warp programs per multiprocessor the
        sequence is cut into segments of whole checkpoint chunks, each at least min_tiles_per_seg
        tiles long.
    tile_steps: steps per tile on CUDA, at most 16 (the lane sums spread a tile's 2 T values of dB,
        dC over the 32 lanes).
    interpret_tile_steps: the same under the Triton interpreter (CPU tests), where 16-step tiles ran
        2-3x slower than 8 for no reason found; T changes only the unrolling.
    states_per_iter: how many states pass 1 and phase F (the chunk's forward rerun) update per iteration of
        their loops over the states (0, or one that does not divide d_state: all, unrolled, their values in
        registers across tiles); fewer make a smaller kernel, which compiles faster and runs slower.
    fallback_states_per_iter: the same for the variant that runs while the kernel compiles in a background
        thread (`launch_once_compiled`; on CUDA, where the fast launch path applies); 0: none, the first
        call waits for the kernel's compile.
    chain: the adjoint chain's block sizes.
    """

    warps_per_sm: int = 16
    min_tiles_per_seg: int = 16
    tile_steps: int = 16
    interpret_tile_steps: int = 8
    states_per_iter: int = 0
    fallback_states_per_iter: int = 1
    chain: ChainTuning = ChainTuning()


def _lane_sum(lines, indent, names):
    """Emit the sum over a warp's 32 lanes of each [BLOCK_D] value in `names` (a power of two <= 32).

    A reduce-scatter: in each round a lane keeps half of its values and sends the other half to the
    lane whose id differs in one bit, adding what it receives. After log2(len) rounds each lane
    holds one value summed over a group of lanes; butterflies finish the sum. Each lane ends with
    the full sum of one value in `lane_v` (lanes that differ only in the butterflies' bits hold the
    same one). Returns the expression of that value's index from the lane id (its halving bits).
    Channels past d_inner must hold zeros: their lanes take part in every round."""
    vals, offset, index_terms = list(names), 16, []
    r = 0
    while len(vals) > 1:
        half = len(vals) // 2
        lines.append(f"{indent}up = (lane & {offset}) != 0")
        new = []
        for i in range(half):
            lo, hi = vals[i], vals[half + i]
            received = shfl_xor_code(f"tl.where(up, {lo}, {hi})", offset)
            lines.append(f"{indent}r{r}_{i} = tl.where(up, {hi}, {lo}) + {received}")
            new.append(f"r{r}_{i}")
        index_terms.append(f"((lane >> {offset.bit_length() - 1}) & 1) * {half}")
        vals, offset, r = new, offset // 2, r + 1
    lines.append(f"{indent}lane_v = {vals[0]}")
    while offset >= 1:
        lines.append(f"{indent}lane_v += {shfl_xor_code('lane_v', offset)}")
        offset //= 2
    return " + ".join(index_terms) if index_terms else "0"


def _load(lines, indent, raw, ptr, s, tile_o, mask):
    offsets = f"i_b * {s}_b + o_d[:, None] * {s}_d + {tile_o}[None, :] * {s}_l"
    lines.append(f"{indent}{raw} = tl.load({ptr} + {offsets}, mask={mask}, other={ZERO})")


def _tile_prologue(lines, indent, T, loads):
    """Emit the offsets, masks and loads of tile i_c, and Δ after bias and softplus (zero past the end)."""
    lines.append(f"{indent}o_tt = i_c * {T} + o_t")
    lines.append(f"{indent}m_dt = None if EVEN_TILES else m_d[:, None] & (o_tt < seqlen)[None, :]")
    lines.append(f"{indent}m_t1 = None if EVEN_TILES else (o_tt < seqlen)[None, :]")
    lines.append(f"{indent}o_w = i_c * {T // 2} + tl.arange(0, {T // 2})[None, :]")
    lines.append(f"{indent}m_w1 = None if EVEN_TILES else o_w < seqlen // 2  # even seqlen with BC_PAIRS")
    tensors = {
        "u": ("raw_u", "p_u", "s_u"), "dt": ("raw_dt", "p_delta", "s_dt"),
        "do": ("raw_do", "p_dout", "s_do"), "z": ("raw_z", "p_z", "s_z"),
    }
    for name in loads:
        raw, ptr, s = tensors[name]
        if name == "z":
            lines.append(f"{indent}if HAS_Z:")
            _load(lines, indent + "    ", raw, ptr, s, "o_tt", "m_dt")
        else:
            _load(lines, indent, raw, ptr, s, "o_tt", "m_dt")
    lines.append(f"{indent}b_dtr = raw_dt.to(tl.float32)")
    lines.append(f"{indent}if HAS_DELTA_BIAS:")
    lines.append(f"{indent}    b_dtr = b_dtr + b_db[:, None]")
    lines.append(f"{indent}b_dt = b_dtr")
    lines.append(f"{indent}if DELTA_SOFTPLUS:  # Δ recomputed: the two-instruction form on CUDA (`softplus_coarse`)")
    lines.append(f"{indent}    if FAST_MATH:")
    lines.append(f"{indent}        b_dt = softplus_coarse(b_dtr)")
    lines.append(f"{indent}    else:")
    lines.append(f"{indent}        b_dt = softplus(b_dtr, False)")
    lines.append(f"{indent}if not EVEN_TILES:  # steps past the end: a = 1, Δ u B = 0, h unchanged")
    lines.append(f"{indent}    b_dt = tl.where(m_dt, b_dt, 0.0)")
    unpack("b_dt", [f"dt_{t}" for t in range(T)], lines, indent, "sdt")


def _dy(lines, indent, T):
    """Emit dL/dy before the gate, dy = dout SiLU(z), split per step."""
    lines.append(f"{indent}b_do = raw_do.to(tl.float32)")
    lines.append(f"{indent}if HAS_Z:")
    lines.append(f"{indent}    b_z = raw_z.to(tl.float32)")
    lines.append(f"{indent}    b_sig = sigmoid(b_z, FAST_MATH)")
    lines.append(f"{indent}    b_dy = b_do * b_z * b_sig")
    lines.append(f"{indent}else:")
    lines.append(f"{indent}    b_dy = b_do")
    unpack("b_dy", [f"dy_{t}" for t in range(T)], lines, indent, "sdy")


def _decays(lines, indent, T, rate):
    """Emit e_t = exp(Δ_t A_n) for the tile's steps from `rate` (A_n log2(e)), 0 where a document
    starts (seq_idx)."""
    for t in range(T):
        lines.append(f"{indent}e_{t} = tl.exp2(dt_{t} * {rate}) * keep_{t}")


def _load_decay_rates(L, I, N, tag):
    """a_n, state n's A pre-scaled by log2(e), four states to a load (`load_states`)."""
    convert = lambda t: f"log2_rate({t}.to(tl.float32), A_LOG)"  # noqa: E731
    load_states(L, I, [f"a_{n}" for n in range(N)], "p_A_d", "s_A_n", "BLOCK_D", tag, convert=convert)


def _state_loop(L, I, N, G):
    """Emit a loop over the N states, G per iteration; returns its body's indent and the code of each of
    an iteration's states' index."""
    L.append(f"{I}for i_g in range(0, {N // G}):")
    return I + "    ", [f"(i_g * {G} + {j})" for j in range(G)]


def _adjoint_pass(L, I, T, N, G):
    """Pass 1 of a segmented backward: per state P = prod a_t and Q = sum_t (prod_{s<=t} a_s) dy_t C_t.

    G states per iteration of a loop over the states, as in phase F (`_forward_phase`): with G < N each
    state's P and Q live in their place in the output between tiles."""
    ns = range(N)
    L.append(f"{I}p_pq = p_PQ + (i_b * n_seg + i_s) * {2 * N} * d_inner + o_d  # (batch, n_seg, 2, N, d_inner)")
    if G < N:
        L.append(f"{I}for i_n in range(0, {N}):")
        L.append(f"{I}    tl.store(p_pq + i_n * d_inner, tl.full([BLOCK_D], 1.0, tl.float32), mask=m_d)")
        L.append(f"{I}    tl.store(p_pq + ({N} + i_n) * d_inner, tl.zeros([BLOCK_D], dtype=tl.float32), mask=m_d)")
    else:
        _load_decay_rates(L, I, N, "ap")
        for n in ns:
            L.append(f"{I}p_{n} = tl.full([BLOCK_D], 1.0, tl.float32)")
            L.append(f"{I}q_{n} = tl.zeros([BLOCK_D], dtype=tl.float32)")
    L.append(f"{I}for i_c in range(tile_start, tile_end):")
    J = I + "    "
    _tile_prologue(L, J, T, ("dt", "do", "z"))
    _dy(L, J, T)
    keeps(L, J, T)
    if G < N:
        K, states = _state_loop(L, J, N, G)
        for n in states:
            L.append(f"{K}a_g = {decay_rate(n)}")
            L.append(f"{K}p_g = tl.load(p_pq + {n} * d_inner, mask=m_d, other=0.0)")
            L.append(f"{K}q_g = tl.load(p_pq + ({N} + {n}) * d_inner, mask=m_d, other=0.0)")
            time_vector(L, K, f"p_C_b + {n} * s_C_n", "ct", T)
            _decays(L, K, T, "a_g")
            for t in range(T):
                L.append(f"{K}p_g = p_g * e_{t}")
                L.append(f"{K}q_g += p_g * (dy_{t} * ct_{t})")
            L.append(f"{K}tl.store(p_pq + {n} * d_inner, p_g, mask=m_d)")
            L.append(f"{K}tl.store(p_pq + ({N} + {n}) * d_inner, q_g, mask=m_d)")
        return
    for n in ns:
        time_vector(L, J, f"p_C_b + {n} * s_C_n", "ct", T)
        _decays(L, J, T, f"a_{n}")
        for t in range(T):
            L.append(f"{J}p_{n} = p_{n} * e_{t}")
            L.append(f"{J}q_{n} += p_{n} * (dy_{t} * ct_{t})")
    store_states(L, I, [f"p_{n}" for n in ns], "p_pq", "d_inner", "BLOCK_D", "pp")
    store_states(L, I, [f"q_{n}" for n in ns], f"(p_pq + {N} * d_inner)", "d_inner", "BLOCK_D", "pq")


def _forward_phase(L, I, T, N, G):
    """Phase F: h from the chunk's checkpoint to its last tile, storing h at each tile's start.

    G states per iteration of a loop over the states (G = N: all unrolled, h in registers across tiles;
    G < N: each state's h goes through the tile's scratch entry, which phase R reads anyway, and the kernel
    is a fraction of the size, so it compiles faster)."""
    ns = range(N)
    L.append(f"{I}p_hc_c = p_hc + ((i_b * d_inner + o_d) * n_ckpt + i_k) * {N}")
    if G < N:
        load_states(L, I, [f"h_{n}" for n in ns], "p_hc_c", "1", "BLOCK_D", "hc", convert=lambda t: t)
        L.append(f"{I}p_scr_t = p_scr_p")
        store_states(L, I, [f"h_{n}" for n in ns], "p_scr_t", "BLOCK_D", "BLOCK_D", "scr0", mask=None)
        L.append(f"{I}for i_c in range(k_first, k_last):")
        J = I + "    "
        _tile_prologue(L, J, T, ("u", "dt"))
        L.append(f"{J}b_dtu = b_dt * raw_u.to(tl.float32)")
        unpack("b_dtu", [f"dtu_{t}" for t in range(T)], L, J, "sdtu")
        keeps(L, J, T)
        L.append(f"{J}p_scr_t = p_scr_p + (i_c - k_first) * {N} * BLOCK_D")
        K, states = _state_loop(L, J, N, G)
        for j, n in enumerate(states):
            L.append(f"{K}a_g{j} = {decay_rate(n)}")
            L.append(f"{K}h_g{j} = tl.load(p_scr_t + {n} * BLOCK_D)")
            time_vector(L, K, f"p_B_b + {n} * s_B_n", f"bt{j}", T)
            for t in range(T):
                L.append(f"{K}h_g{j} = tl.exp2(dt_{t} * a_g{j}) * keep_{t} * h_g{j} + dtu_{t} * bt{j}_{t}")
            L.append(f"{K}tl.store(p_scr_t + {N} * BLOCK_D + {n} * BLOCK_D, h_g{j})")
        return
    _load_decay_rates(L, I, N, "af")  # here, not live through phase R
    load_states(L, I, [f"h_{n}" for n in ns], "p_hc_c", "1", "BLOCK_D", "hc", convert=lambda t: t)
    L.append(f"{I}for i_c in range(k_first, k_last):")
    J = I + "    "
    L.append(f"{J}p_scr_t = p_scr_p + (i_c - k_first) * {N} * BLOCK_D")
    store_states(L, J, [f"h_{n}" for n in ns], "p_scr_t", "BLOCK_D", "BLOCK_D", "scr", mask=None)
    _tile_prologue(L, J, T, ("u", "dt"))
    L.append(f"{J}b_dtu = b_dt * raw_u.to(tl.float32)")
    unpack("b_dtu", [f"dtu_{t}" for t in range(T)], L, J, "sdtu")
    keeps(L, J, T)
    for n in ns:
        time_vector(L, J, f"p_B_b + {n} * s_B_n", "bt", T)
        for t in range(T):
            L.append(f"{J}h_{n} = tl.exp2(dt_{t} * a_{n}) * keep_{t} * h_{n} + dtu_{t} * bt_{t}")
    L.append(f"{I}p_scr_t = p_scr_p + (k_last - k_first) * {N} * BLOCK_D")
    store_states(L, I, [f"h_{n}" for n in ns], "p_scr_t", "BLOCK_D", "BLOCK_D", "scrl", mask=None)


def _reverse_phase(L, I, T, N):
    """Phase R: the chunk's tiles last to first; per state, recompute h and a, then run the adjoint back.

    The states run in a loop, one per iteration: all d_state states unrolled took over a minute to
    compile (mostly in Triton's coalescing pass) and spilled at 255 registers, and two or four per
    iteration ran no faster (docs/kernels.md, "Backward"). Their
    carries x and dA stay in small per-thread buffers between tiles (coalesced: (batch, n_seg,
    d_state, d_inner))."""
    L.append(f"{I}for i_r in range(0, k_last - k_first + 1):")
    J = I + "    "
    L.append(f"{J}i_c = k_last - i_r")
    _tile_prologue(L, J, T, ("u", "dt", "do", "z"))
    L.append(f"{J}b_u = raw_u.to(tl.float32)")
    L.append(f"{J}b_dtu = b_dt * b_u")
    unpack("b_dtu", [f"dtu_{t}" for t in range(T)], L, J, "sdtu")
    _dy(L, J, T)
    keeps(L, J, T)
    L.append(f"{J}p_scr_t = p_scr_p + (i_c - k_first) * {N} * BLOCK_D")
    L.append(f"{J}p_dBC_t = p_dBC + i_b * s_dBC_b + i_c * {T}")
    for t in range(T):  # sums over states: g B (for du, dΔ), h C (y, for dz), g a h A log2(e) (dΔ)
        L.append(f"{J}gb_{t} = tl.zeros([BLOCK_D], dtype=tl.float32)")
        L.append(f"{J}y_{t} = tl.zeros([BLOCK_D], dtype=tl.float32)")
        L.append(f"{J}gda_{t} = tl.zeros([BLOCK_D], dtype=tl.float32)")
    L.append(f"{J}for i_n in range(0, {N}):")
    K = J + "    "
    n = "i_n"
    L.append(f"{K}a_n = {decay_rate(n)}")
    L.append(f"{K}hh_m1 = tl.load(p_scr_t + {n} * BLOCK_D)  # h before the tile")
    L.append(f"{K}x = tl.load(p_x_d + {n} * d_inner, mask=m_d, other=0.0)")
    L.append(f"{K}dA_n = tl.load(p_dA_d + {n} * d_inner, mask=m_d, other=0.0)")
    time_vector(L, K, f"p_B_b + {n} * s_B_n", "bt", T)
    time_vector(L, K, f"p_C_b + {n} * s_C_n", "ct", T)
    _decays(L, K, T, "a_n")
    for t in range(T):
        prev = "hh_m1" if t == 0 else f"hh_{t - 1}"
        L.append(f"{K}hh_{t} = e_{t} * {prev} + dtu_{t} * bt_{t}")
    for t in reversed(range(T)):
        prev = "hh_m1" if t == 0 else f"hh_{t - 1}"
        L.append(f"{K}g = dy_{t} * ct_{t} + x")
        L.append(f"{K}dc_{t} = dy_{t} * hh_{t}")
        L.append(f"{K}db_{t} = g * dtu_{t}")
        L.append(f"{K}gb_{t} += g * bt_{t}")
        L.append(f"{K}y_{t} += hh_{t} * ct_{t}")
        L.append(f"{K}x = e_{t} * g")
        L.append(f"{K}gah = x * {prev}  # g_t d(a_t h_(t-1)) / d(Δ_t A_n)")
        L.append(f"{K}gda_{t} += gah * a_n")
        L.append(f"{K}dA_n += gah * dt_{t}")
    L.append(f"{K}tl.store(p_x_d + {n} * d_inner, x, mask=m_d)")
    L.append(f"{K}tl.store(p_dA_d + {n} * d_inner, dA_n, mask=m_d)")
    # dB_t and dC_t of state n, summed over this warp's channels, added to global memory.
    L.append(f"{K}if LANE_SUM:")
    idx = _lane_sum(L, K + "    ", [f"db_{t}" for t in range(T)] + [f"dc_{t}" for t in range(T)])
    L.append(f"{K}    lane_k = {idx}")
    L.append(f"{K}    t_k = i_c * {T} + lane_k % {T}")
    L.append(f"{K}    p_k = p_dBC_t + (lane_k // {T}) * s_dBC_bc + {n} * s_dBC_n + lane_k % {T}")
    L.append(f"{K}    tl.atomic_add(p_k, lane_v, mask=lane_owner & (t_k < seqlen), sem='relaxed')")
    L.append(f"{K}else:")
    dc = pack([f"dc_{t}" for t in range(T)], L, K + "    ", "pdc")
    db = pack([f"db_{t}" for t in range(T)], L, K + "    ", "pdb")
    L.append(f"{K}    m_t = o_tt < seqlen")
    L.append(f"{K}    p_n = p_dBC_t + {n} * s_dBC_n + o_t")
    L.append(f"{K}    tl.atomic_add(p_n, tl.sum({db}, axis=0), mask=m_t, sem='relaxed')")
    L.append(f"{K}    tl.atomic_add(p_n + s_dBC_bc, tl.sum({dc}, axis=0), mask=m_t, sem='relaxed')")
    b_gb = pack([f"gb_{t}" for t in range(T)], L, J, "pgb")
    b_y = pack([f"y_{t}" for t in range(T)], L, J, "py")
    b_gda = pack([f"gda_{t}" for t in range(T)], L, J, "pgda")
    L.append(f"{J}b_gb = {b_gb}  # sum_n g B_n")
    L.append(f"{J}b_y = {b_y}  # y before the gate and the D skip")
    L.append(f"{J}b_ddt = {b_gda} * 0.6931471805599453 + b_gb * b_u  # gda counted A log2(e)")
    L.append(f"{J}b_du = b_gb * b_dt")
    L.append(f"{J}if HAS_D:")
    L.append(f"{J}    b_y += b_u * b_D[:, None]")
    L.append(f"{J}    b_du += b_dy * b_D[:, None]")
    L.append(f"{J}    b_dD += tl.sum(b_dy * b_u, axis=1)")
    L.append(f"{J}if DELTA_SOFTPLUS:")
    L.append(f"{J}    b_ddt = b_ddt * sigmoid(b_dtr, FAST_MATH)")
    L.append(f"{J}if not EVEN_TILES:")
    L.append(f"{J}    b_ddt = tl.where(m_dt, b_ddt, 0.0)")
    L.append(f"{J}if HAS_DELTA_BIAS:")
    L.append(f"{J}    b_ddb += tl.sum(b_ddt, axis=1)")
    L.append(f"{J}p_o = i_b * s_o_b + o_d[:, None] * s_o_d + o_tt[None, :] * s_o_l")
    L.append(f"{J}tl.store(p_du + p_o, b_du.to(p_du.dtype.element_ty), mask=m_dt)")
    L.append(f"{J}tl.store(p_ddelta + p_o, b_ddt.to(p_ddelta.dtype.element_ty), mask=m_dt)")
    L.append(f"{J}if HAS_Z:")
    L.append(f"{J}    b_dz = b_do * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))")
    L.append(f"{J}    p_dz_o = i_b * s_dz_b + o_d[:, None] * s_dz_d + o_tt[None, :] * s_dz_l  # any layout")
    L.append(f"{J}    tl.store(p_dz + p_dz_o, b_dz.to(p_dz.dtype.element_ty), mask=m_dt)")
    L.append(f"{J}if STORE_Y:")
    L.append(f"{J}    if HAS_Z:")
    L.append(f"{J}        b_y = b_y * b_z * b_sig")
    L.append(f"{J}    tl.store(p_y + p_o, b_y.to(p_y.dtype.element_ty), mask=m_dt)")


def _bwd_source(N, T, G):
    """Source of the backward kernel for d_state = N, T time steps per tile and G states per iteration of
    pass 1 and phase F."""
    L = []
    L.append("@triton.jit")
    L.append("def scan_bwd_kernel(")
    L.append("    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_delta_bias, p_hc, p_dout,")
    L.append("    p_du, p_ddelta, p_dz, p_y, p_dBC, p_dA, p_dsum, p_x, p_PQ, p_scr,")
    L.append("    seqlen, d_inner, n_ckpt, ckpts_per_seg,")
    L.append("    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_z_b, s_z_d, s_z_l, s_do_b, s_do_d, s_do_l,")
    L.append("    s_o_b, s_o_d, s_o_l, s_dz_b, s_dz_d, s_dz_l, s_A_d, s_A_n, s_B_b, s_B_n, s_C_b, s_C_n,")
    L.append("    s_dBC_bc, s_dBC_b, s_dBC_n,")
    L.append("    p_seq_idx, s_si_b, s_si_l,")
    L.append("    HAS_SEQ_IDX: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,")
    L.append("    HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,")
    L.append("    ADJOINT_ONLY: tl.constexpr, STORE_Y: tl.constexpr, CKPT: tl.constexpr, BLOCK_D: tl.constexpr,")
    L.append("    BC_PAIRS: tl.constexpr, FAST_MATH: tl.constexpr, EVEN_TILES: tl.constexpr,")
    L.append("    LANE_SUM: tl.constexpr, A_LOG: tl.constexpr, WIDE_INDEX: tl.constexpr,")
    L.append("):")
    I = "    "
    program_ids(L, I, T)
    L.append(f"{I}n_seg = tl.num_programs(2)")
    L.append(f"{I}if ADJOINT_ONLY:  # launched for segments 1 ..: no segment left of segment 0 needs its P, Q")
    L.append(f"{I}    n_seg += 1")
    L.append(f"{I}    i_s += 1")
    L.append(f"{I}p_A_d = p_A + o_d * s_A_d")
    L.append(f"{I}if HAS_D:")
    L.append(f"{I}    b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}    b_dD = tl.zeros([BLOCK_D], dtype=tl.float32)")
    L.append(f"{I}if HAS_DELTA_BIAS:")
    L.append(f"{I}    b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}    b_ddb = tl.zeros([BLOCK_D], dtype=tl.float32)")
    L.append(f"{I}p_B_b = p_B + i_b * s_B_b")
    L.append(f"{I}p_C_b = p_C + i_b * s_C_b")
    L.append(f"{I}n_tiles = tl.cdiv(seqlen, T)")
    first_tile(L, I, "k_start", "i_s * ckpts_per_seg")  # this segment's checkpoint chunks
    L.append(f"{I}k_end = tl.minimum(k_start + ckpts_per_seg, n_ckpt)")
    L.append(f"{I}tile_start = k_start * (CKPT // T)")
    L.append(f"{I}tile_end = tl.minimum(k_end * (CKPT // T), n_tiles)")
    L.append(f"{I}if ADJOINT_ONLY:")
    _adjoint_pass(L, I + "    ", T, N, G)
    L.append(f"{I}else:")
    J = I + "    "
    L.append(f"{J}if LANE_SUM:")
    L.append(f"{J}    lane = lane_id(o_d.to(tl.int32))")
    # The lanes left holding one sum each after `_lane_sum` of 2T values (others hold copies).
    L.append(f"{J}    lane_owner = (lane & {32 // (2 * T) - 1}) == 0")
    # p_x_d: x, the adjoint carried in from the right (a_(t+1) g_(t+1) after the segment's last step),
    # and the segment's dA sums, (batch, n_seg, d_state, d_inner): the host fills x, zeros dA.
    L.append(f"{J}p_x_d = p_x + (i_b * n_seg + i_s) * {N} * d_inner + o_d")
    L.append(f"{J}p_dA_d = p_dA + (i_b * n_seg + i_s) * {N} * d_inner + o_d")
    L.append(f"{J}i_prog = (i_b * tl.num_programs(1) + i_d) * n_seg + i_s")
    L.append(f"{J}p_scr_p = p_scr + i_prog * ((CKPT // T) * {N} * BLOCK_D) + tl.arange(0, BLOCK_D)")
    L.append(f"{J}for i_kr in range(0, k_end - k_start):")
    K = J + "    "
    L.append(f"{K}i_k = k_end - 1 - i_kr")
    L.append(f"{K}k_first = i_k * (CKPT // T)")
    L.append(f"{K}k_last = tl.minimum(k_first + CKPT // T, n_tiles) - 1")
    _forward_phase(L, K, T, N, G)
    _reverse_phase(L, K, T, N)
    # This program's sums added into p_dsum (zeroed by the host): dA (d_inner, d_state), then dD
    # and dΔ bias (d_inner,) each. Atomics, as for dB and dC: no partial buffers, no sum kernels.
    L.append(f"{J}for n in range(0, {N}):")
    L.append(f"{J}    dA_n = tl.load(p_dA_d + n * d_inner, mask=m_d, other=0.0)")
    L.append(f"{J}    if A_LOG:  # the gradient of A_log: dA A, with A = -exp(A_log)")
    L.append(f"{J}        dA_n = dA_n * -tl.exp(tl.load(p_A_d + n * s_A_n, mask=m_d, other=0.0).to(tl.float32))")
    L.append(f"{J}    tl.atomic_add(p_dsum + o_d * {N} + n, dA_n, mask=m_d, sem='relaxed')")
    L.append(f"{J}if HAS_D:")
    L.append(f"{J}    tl.atomic_add(p_dsum + {N} * d_inner + o_d, b_dD, mask=m_d, sem='relaxed')")
    L.append(f"{J}if HAS_DELTA_BIAS:")
    L.append(f"{J}    tl.atomic_add(p_dsum + {N + 1} * d_inner + o_d, b_ddb, mask=m_d, sem='relaxed')")
    return HEADER + "\n".join(L) + "\n"


def _states_per_iter(G, N):
    """G states per iteration where it divides N, else all N (unrolled)."""
    return G if 0 < G < N and N % G == 0 else N


@functools.cache
def _bwd_kernel(N, T, G):
    return generated_kernel(_bwd_source(N, T, G), f"scan_bwd_N{N}_T{T}_G{G}", "scan_bwd_kernel")


def scan_bwd_recurrent(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, ckpt_len, dout, dfinal_state, seq_idx,
    y_out=None, need_dinitial=True, dBC_out=None, dz_out=None, A_is_log=False, tuning=RecurrentBwdTuning(),
):
    """The scan's gradients from the forward's checkpoints (every `ckpt_len` steps), in the order of
    `triton_scan.ScanGrads` (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); y_out, laid out as
    torch.empty_like(u) (the gradients' layout, whose strides the kernel writes it with), also
    receives the forward's output. dinitial_state is empty unless need_dinitial. With dBC_out (a
    (batch, seqlen, 2, d_state) tensor, any dtype and strides) dB and dC go there instead, and come
    back empty; likewise dz with dz_out ((batch, d_inner, seqlen), any strides). dA, dD and
    dΔ bias share one allocation (a custom op's caller must copy them apart). With A_is_log, A holds
    A_log (A = -exp(A_log)) and the gradient returned is A_log's.

    The host side runs once per layer and step, and training a small model is host-bound: every
    torch op here costs several microseconds, so buffers share allocations where they can."""
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    T = tuning.tile_steps if u.is_cuda else tuning.interpret_tile_steps
    num_warps = 1
    block_d = 32 * num_warps  # one channel per thread: the lane sums need it
    assert ckpt_len % T == 0 and 2 * T <= 32
    n_ckpt = chunk_states.shape[2]
    n_tiles = cdiv(seqlen, T)
    f32 = dict(dtype=torch.float32, device=u.device)
    B_dtype, C_dtype = B.dtype, C.dtype
    # (batch, d_state, seqlen) with unit time stride: read as vectors of a tile's steps. One copy for
    # both when neither is (the model's x_proj output).
    if B.stride(2) != 1 and C.stride(2) != 1 and B.dtype == C.dtype:
        B, C = torch.stack((B, C)).unbind(0)
    B, C = B.contiguous(), C.contiguous()
    pairs = bf16_pairs(B, axis=2) and bf16_pairs(C, axis=2)
    if pairs:
        B, C = B.view(torch.int32), C.view(torch.int32)  # words of two steps: strides count words
    du = torch.empty_like(u)
    ddelta = torch.empty_like(u, dtype=delta.dtype)
    dz = dz_out if dz_out is not None or z is None else torch.empty_like(u, dtype=z.dtype)
    assert y_out is None or y_out.stride() == du.stride(), "y_out must be laid out like torch.empty_like(u)"
    n_blocks = cdiv(d_inner, block_d)
    programs = batch * n_blocks
    n_seg = segment_count(  # whole chunks
        programs, tuning.warps_per_sm, u.device, n_tiles, tuning.min_tiles_per_seg, n_ckpt
    )
    ckpts_per_seg = cdiv(n_ckpt, n_seg)
    n_seg = cdiv(n_ckpt, ckpts_per_seg)
    # One zero fill for four buffers: dB, dC and the sums dA, dD, dΔ bias (atomics accumulate
    # there); per batch and segment the running dA sums and the adjoint carry x (in: from the right;
    # out: to the left).
    n_bc, n_carry, n_sum = 2 * batch * d_state * seqlen, batch * n_seg * d_state * d_inner, (d_state + 2) * d_inner
    zeros = torch.zeros(n_bc + n_sum + 2 * n_carry, **f32)
    dBC = zeros[:n_bc].view(2, batch, d_state, seqlen)
    dsum = zeros[n_bc : n_bc + n_sum]  # [dA (d_inner, d_state) | dD | dΔ bias]
    dA = zeros[n_bc + n_sum : n_bc + n_sum + n_carry].view(batch, n_seg, d_state, d_inner)
    x = zeros[n_bc + n_sum + n_carry :].view(batch, n_seg, d_state, d_inner)
    if dfinal_state is not None:
        x[:, -1] = dfinal_state.transpose(1, 2)
    scratch = torch.empty(programs * n_seg * (ckpt_len // T) * d_state * block_d, **f32)  # tile-start states
    A_c = A.contiguous()
    z_ = z if z is not None else u
    kernel = _bwd_kernel(d_state, T, _states_per_iter(tuning.states_per_iter, d_state))
    G = tuning.fallback_states_per_iter
    fallback = _bwd_kernel(d_state, T, _states_per_iter(G, d_state)) if G and u.is_cuda else kernel
    strides = (
        *u.stride(), *delta.stride(), *z_.stride(), *dout.stride(), *du.stride(),
        *(dz.stride() if dz is not None else (0, 0, 0)), *A_c.stride(),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), *dBC.stride()[:3],
    )
    flags = dict(
        HAS_SEQ_IDX=seq_idx is not None, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_DELTA_BIAS=delta_bias is not None, DELTA_SOFTPLUS=delta_softplus, CKPT=ckpt_len, BLOCK_D=block_d,
        BC_PAIRS=pairs, FAST_MATH=u.is_cuda, EVEN_TILES=seqlen % T == 0 and d_inner % block_d == 0,
        LANE_SUM=u.is_cuda, A_LOG=A_is_log, WIDE_INDEX=wide_index(seqlen, u, delta, z, dout, du, ddelta, dz, y_out),
        num_warps=num_warps,
    )

    def run_pass(PQ, segments, **pass_flags):
        launch_once_compiled(
            kernel, fallback, (batch, n_blocks, segments),
            u, delta, A_c, B, C, D, z, delta_bias, chunk_states, dout,
            du, ddelta, dz, y_out, dBC, dA, dsum, x, PQ, scratch,
            seqlen, d_inner, n_ckpt, ckpts_per_seg, *strides, *seq_idx_args(seq_idx),
            **pass_flags, **flags,
        )

    if n_seg > 1:  # pass 1, then the carries from the last segment to the first
        PQ = torch.empty(batch, n_seg, 2, d_state, d_inner, **f32)
        run_pass(PQ, n_seg - 1, ADJOINT_ONLY=True, STORE_Y=False)
        chain_adjoints(PQ, x, tuning.chain)
    run_pass(None, n_seg, ADJOINT_ONLY=False, STORE_Y=y_out is not None)
    empty = u.new_empty(0)
    if dBC_out is not None:  # dB, dC as (batch, seqlen, 2, d_state): one copy
        dBC_out.copy_(dBC.permute(1, 3, 0, 2))
        dB = dC = empty
    else:  # dB, dC share one allocation; in fp32 dC is copied out, as outputs of a custom op must not alias
        dB = dBC[0].to(B_dtype)
        dC = dBC[1].to(C_dtype) if C_dtype != torch.float32 else dBC[1].clone()
    return (
        du,
        ddelta,
        dsum[: d_state * d_inner].view(d_inner, d_state).to(A.dtype),
        dB,
        dC,
        dsum[d_state * d_inner : (d_state + 1) * d_inner].to(D.dtype) if D is not None else empty,
        dz if z is not None and dz_out is None else empty,
        dsum[(d_state + 1) * d_inner :].to(delta_bias.dtype) if delta_bias is not None else empty,
        x[:, 0].transpose(1, 2).contiguous() if need_dinitial else empty,  # dL/dh0: the first segment's carry out
    )


__all__ = ["RecurrentBwdTuning", "scan_bwd_recurrent"]
