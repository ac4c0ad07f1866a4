"""Forward selective scan, recurrent form: a sequential recurrence per channel, generated for each
d_state (`codegen`), and its host side (launch sizes, segments, how B and C are read).

Glossary as in `triton_scan`: h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t,  y_t = C_t . h_t.

Every thread holds one channel d and its whole state h[d, 0:d_state] in registers, so y_t needs no
shuffles and each step is d_state x (exp2, FMA, FMA) in one thread. Time is read in tiles of T steps,
[BLOCK_D, T] (one 16-byte vector per thread), split into per-step [BLOCK_D] vectors with tl.split,
which is free when the tile's T steps sit in one thread. The next tile's u, Δ, z are loaded while the
current one is scanned, and tiles wholly inside the tensors need no masks (EVEN_TILES). B and C are
the same for every channel, so every thread loads the same values (one broadcast from the cache):
- with unit time stride, one [1, T] vector per state and tile (`_tile_by_state`), bf16 as words of
  two steps, the tile then scanned state by state (a state's recurrence needs only itself). B and C
  are first copied tile by tile (`_tiled`), so that every state's row sits at a fixed offset from one
  pointer per tile (docs/kernels.md, "B and C");
- otherwise step by step (`_state_row`): per-step scalars, bf16 with unit d_state stride (the model's
  x_proj output) as words of two states.

Short batches do not fill the GPU with one program per 32 channels, so the sequence is then cut into
segments run in parallel: pass 1 scans each segment but the last from h = 0 (keeping only its end
state and sum of Δ), and the full pass runs every segment from its true incoming state, which each of
its programs first chains from pass 1's (h_in[s+1] = exp(A ΣΔ_s) h_in[s] + h_end[s],
`_fold_earlier_segments`): two launches, no chain between them. That nearly doubles the exps, so it is
used only where the GPU would otherwise be mostly idle (docs/kernels.md, "Segments").

A channel's states can also be spread over several lanes (`_fwd_source_lanes`): each lane keeps
d_state // lanes states, y_t is summed over the lanes and Δ shared between them by warp shuffles, and
each lane finishes a share of the steps. That multiplies the threads without a second pass, so it is
used where it fills the GPU alone (`_lanes_per_channel`), and for d_state above states_per_lane.

The forward also stores h every ckpt_len steps, (batch, d_inner, n_ckpt, d_state) fp32, for the
backward (`recurrent_bwd`, `chunk`).
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._launch import cdiv, launch, next_power_of_2, seq_idx_args, sm_count, wide_index
from ..triton_utils import time_index
from .chain import segment_count
from .codegen import (
    HEADER,
    ZERO,
    bf16_pair_layout,
    delta_prologue,
    first_tile,
    generated_kernel,
    keeps,
    load_states,
    pack,
    program_ids,
    reset_state,
    store_states,
    time_vector,
    unpack,
)


@dataclass(frozen=True)
class RecurrentFwdTuning:
    """Launch choices of the recurrent forward; docs/kernels.md ("Forward") has their measurements.

    warps_per_sm: below this many one-warp programs per multiprocessor the sequence is cut into
        segments (one warp per 32 channels is latency-bound: each step waits on its loads and exp2).
    min_tiles_per_seg: a segment keeps at least this many T-step tiles, to be worth its second pass.
    maxnreg: register cap per thread on CUDA (0: none). ptxas hoists a tile's B, C loads as far as it
        is free to, and the registers then limit the warps per multiprocessor.
    states_per_lane: states one thread holds at most (registers); a larger d_state is spread over
        2, 4, ... lanes per channel.
    spread_lanes, spread_warps_per_sm: d_state 16 is spread over spread_lanes lanes per channel where
        that alone gives spread_warps_per_sm one-warp programs per multiprocessor, and then needs no
        segments.
    fold_segments: earlier segments whose ΣΔ and end states a segment of the full pass loads at once, to
        chain them into its incoming state (`_fold_earlier_segments`): one wait for memory per that many.
    """

    warps_per_sm: int = 16
    min_tiles_per_seg: int = 16
    maxnreg: int = 168
    states_per_lane: int = 16
    spread_lanes: int = 4
    spread_warps_per_sm: int = 4
    fold_segments: int = 2


# The forward kernels' signature (one lane or several per channel: the launcher passes the same arguments).
_FWD_SIGNATURE = """@triton.jit
def scan_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_delta_bias, p_h0, p_out, p_hT, p_dtsum, p_hseg, p_hc,
    seqlen, d_inner, n_ckpt, chunks_per_seg,
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l, s_o_b, s_o_d, s_o_l,
    s_h0_b, s_h0_d, s_h0_s, s_hT_b, s_hT_d, s_hT_s, p_seq_idx, s_si_b, s_si_l,
    HAS_SEQ_IDX: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STATES_ONLY: tl.constexpr,
    SAVE_CHUNK_STATES: tl.constexpr, CKPT_EVERY: tl.constexpr, BLOCK_D: tl.constexpr,
    BC_PAIRS: tl.constexpr, BC_TIME_VECTORS: tl.constexpr, BC_TILED: tl.constexpr,
    FAST_MATH: tl.constexpr, EVEN_TILES: tl.constexpr, A_LOG: tl.constexpr, WIDE_INDEX: tl.constexpr,
):"""


def _state_row(lines, indent, row, stride, name, N, pairs):
    """One step's B_t or C_t (the same N values for every channel) as N fp32 expressions.

    pairs (BC_PAIRS: bf16, unit state stride, 4-byte aligned rows): emits N / 2 32-bit loads, each
    bringing two states, where bf16 -> fp32 is a shift or a mask of the word (half the load
    instructions, no conversions), and returns the names. Otherwise returns the scalar loads
    themselves, written into the expressions that use them, as the forward had them before pairs."""
    lines.append(f"{indent}p_{name} = {row}")
    if not pairs:
        return [f"tl.load(p_{name} + {n} * {stride}).to(tl.float32)" for n in range(N)]
    lines.append(f"{indent}p_words = p_{name}.to(tl.pointer_type(tl.int32))")
    for k in range(N // 2):
        lines.append(f"{indent}w_{k} = tl.load(p_words + {k})")
        lines.append(f"{indent}{name}_{2 * k} = (w_{k} << 16).to(tl.float32, bitcast=True)")
        lines.append(f"{indent}{name}_{2 * k + 1} = (w_{k} & -65536).to(tl.float32, bitcast=True)")
    return [f"{name}_{n}" for n in range(N)]


def _step(lines, indent, t, N, pairs):
    """Emit step t of a tile: the state update h_n = exp(Δ A_n) h_n + Δ u B_n, and y_t = C_t . h."""
    b = _state_row(lines, indent, "p_B_b + i_t * s_B_l", "s_B_n", "bt", N, pairs)
    for n in range(N):
        lines.append(f"{indent}h_{n} = tl.exp2(dt_{t} * a_{n}) * h_{n} + dtu_{t} * {b[n]}")
    lines.append(f"{indent}if not STATES_ONLY:")
    c = _state_row(lines, indent + "    ", "p_C_b + i_t * s_C_l", "s_C_n", "ct", N, pairs)
    lines.append(f"{indent}    y_{t} = " + " + ".join(f"h_{n} * {c[n]}" for n in range(N)))


def _tile_by_state(lines, indent, T, N):
    """Emit one tile's T steps state by state, for B and C with unit time stride (BC_TIME_VECTORS).

    Each state's T values of B (and C) arrive in one vector load of a [1, T] tile that every thread
    holds whole, where the step-by-step order needs T scalar loads per state. A state's recurrence
    over the tile needs only that state, so the order changes nothing else; y_t is summed over the
    states as they come."""
    if_states = f"{indent}if not STATES_ONLY:"
    keeps(lines, indent, T)
    lines.append(f"{indent}if BC_TILED:  # (batch, tile, B | C, state, step): every row at a fixed offset")
    J = indent + "    "
    lines.append(f"{J}s_row = {T // 2} if BC_PAIRS else {T}")
    lines.append(f"{J}p_bt = p_B_b + i_c * {2 * N} * s_row")
    lines.append(f"{J}p_ct, s_bn, s_cn = p_bt + {N} * s_row, s_row, s_row")
    lines.append(f"{J}o_w, m_w1 = tl.arange(0, {T // 2})[None, :], None")
    lines.append(f"{J}o_ts, m_t1 = o_t[None, :], None")
    lines.append(f"{indent}else:")
    lines.append(f"{J}p_bt, p_ct, s_bn, s_cn = p_B_b, p_C_b, s_B_n, s_C_n")
    lines.append(f"{J}o_w = i_c * {T // 2} + tl.arange(0, {T // 2})[None, :]")
    lines.append(f"{J}m_w1 = None if EVEN_TILES else o_w < seqlen // 2  # even seqlen with BC_PAIRS")
    lines.append(f"{J}o_ts, m_t1 = o_tt[None, :], None if EVEN_TILES else (o_tt < seqlen)[None, :]")
    at = dict(steps_at="o_ts, mask=m_t1", other="None if EVEN_TILES or BC_TILED else 0")
    for n in range(N):
        time_vector(lines, indent, f"p_bt + {n} * s_bn", "bt", T, **at)
        lines.append(if_states)
        time_vector(lines, indent + "    ", f"p_ct + {n} * s_cn", "ct", T, **at)
        for t in range(T):
            lines.append(f"{indent}if HAS_SEQ_IDX:")
            lines.append(f"{indent}    h_{n} = h_{n} * keep_{t}")
            lines.append(f"{indent}h_{n} = tl.exp2(dt_{t} * a_{n}) * h_{n} + dtu_{t} * bt_{t}")
            lines.append(if_states)
            y = f"h_{n} * ct_{t}" if n == 0 else f"y_{t} + h_{n} * ct_{t}"
            lines.append(f"{indent}    y_{t} = {y}")


def _load_tiles(lines, indent, suffix, tile, tag=""):
    """Emit the loads of tile `tile`'s u, Δ and z (z only where outputs are written), [BLOCK_D, T] as
    stored, into raw_u{suffix}, raw_dt{suffix}, raw_z{suffix}, with the tile's offsets and mask (named
    apart by tag: a mask of None must not become a loop-carried value). EVEN_TILES: every channel and
    step of every tile exists, so the loads need no masks (and no zero fills)."""
    o_tt, m = f"o_tt{suffix}{tag}", f"m_dt{suffix}{tag}"
    lines.append(f"{indent}{o_tt} = ({tile}) * T + o_t")
    lines.append(f"{indent}{m} = None if EVEN_TILES else m_d[:, None] & ({o_tt} < seqlen)[None, :]")
    tensors = (("raw_u", "p_u", "s_u"), ("raw_dt", "p_delta", "s_dt"), ("raw_z", "p_z", "s_z"))
    for raw, ptr, s in tensors:
        offsets = f"i_b * {s}_b + o_d[:, None] * {s}_d + {o_tt}[None, :] * {s}_l"
        load = f"{raw}{suffix} = tl.load({ptr} + {offsets}, mask={m}, other={ZERO})"
        if raw == "raw_z":
            lines.append(f"{indent}if HAS_Z and not STATES_ONLY:")
            lines.append(f"{indent}    {load}")
        else:
            lines.append(f"{indent}{load}")


def _prologue(L, I, n_states, rows, first_state=None):
    """Emit what both forward kernels set up before the loop over tiles: the decay rates a_k and states
    h_k of this thread's n_states states (from first_state on, in the lanes kernel), D, the Δ bias, the
    ΣΔ accumulator ([rows] vectors) and this batch's B pointer."""
    at = f" + {first_state} * s_A_n" if first_state else ""
    L.append(f"{I}p_A_d = p_A + o_d * s_A_d{at}")
    a = [f"a_{k}" for k in range(n_states)]  # A pre-scaled by log2(e): exp(ΔA) = exp2(Δ A log2 e)
    load_states(L, I, a, "p_A_d", "s_A_n", rows, "a", convert=lambda t: f"log2_rate({t}.to(tl.float32), A_LOG)")
    L.append(f"{I}if USE_INITIAL_STATE:")
    lane = f" + {first_state}" if first_state else ""
    L.append(f"{I}    p_h0_d = p_h0 + i_b * s_h0_b + o_d * s_h0_d + i_s * s_h0_s{lane}")
    load_states(L, I + "    ", [f"h_{k}" for k in range(n_states)], "p_h0_d", "1", rows, "h0")
    L.append(f"{I}else:")
    for k in range(n_states):
        L.append(f"{I}    h_{k} = tl.zeros([{rows}], dtype=tl.float32)")
    L.append(f"{I}if HAS_D:")
    L.append(f"{I}    b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}if HAS_DELTA_BIAS:")
    L.append(f"{I}    b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}b_dtsum = tl.zeros([{rows}], dtype=tl.float32)")
    L.append(f"{I}p_B_b = p_B + i_b * s_B_b")


def _fold_earlier_segments(L, I, n_states, N, rows, U, first_state=None):
    """Emit, in the full pass (not STATES_ONLY), the state entering segment i_s: from h (the initial state or
    zeros), every earlier segment k in turn, h = exp(A ΣΔ_k) h + h_end[k], from the ΣΔ and end states pass 1
    stored (none in a pass of one segment). U segments' loads are issued together before their updates, so
    the chain waits for memory once per U segments; past i_s the loads give ΣΔ = 0 and h_end = 0, which leave h
    as it is. Each segment's end states are one load: the compile time of these kernels grows with their
    memory operations (`codegen.load_states`). (n_states of the thread's states: the lane's, from first_state
    on, in the lanes kernel.)"""
    lane = f" + {first_state}" if first_state else ""
    P = next_power_of_2(n_states)
    o_k = f"tl.arange(0, {P})[None, :]"
    m_k = "" if P == n_states else f" & ({o_k} < {n_states})"
    L.append(f"{I}if not STATES_ONLY:")
    J = I + "    "
    K = J + "    "
    L.append(f"{J}n_prev = tl.num_programs(2) - 1  # pass 1's segments: (batch, d_inner, n_prev[, d_state])")
    L.append(f"{J}p_ds_d = p_dtsum + (i_b * d_inner + o_d) * n_prev")
    L.append(f"{J}p_hs_d = p_hseg + (i_b * d_inner + o_d) * (n_prev * {N}){lane}")
    L.append(f"{J}for k_s in range(0, i_s, {U}):")
    for j in range(U):
        L.append(f"{K}m_fold = o_d < tl.where(k_s + {j} < i_s, d_inner, 0)")
        L.append(f"{K}dts_{j} = tl.load(p_ds_d + k_s + {j}, mask=m_fold, other=0.0)")
        L.append(f"{K}hs_{j} = tl.load((p_hs_d + (k_s + {j}) * {N})[:, None] + {o_k}, "
                 f"mask=m_fold[:, None]{m_k}, other=0.0)")
    names = [f"e_{k}" for k in range(n_states)]
    for j in range(U):
        if P == 1:
            L.append(f"{K}e_0 = tl.reshape(hs_{j}, [{rows}])")
        else:
            unpack(f"hs_{j}", names + [f"pad_hs{i}" for i in range(P - n_states)], L, K, f"shs{j}", rows=rows)
        for k in range(n_states):
            L.append(f"{K}h_{k} = tl.exp2(dts_{j} * a_{k}) * h_{k} + e_{k}")


def _final_state_mask(L, I):
    """Emit m_hT, the mask of the end states' store: every segment's in pass 1 (STATES_ONLY), the last
    segment's in the full pass (the final state; the others' the next segment folds in itself)."""
    L.append(f"{I}if STATES_ONLY:")
    L.append(f"{I}    m_hT = m_d")
    L.append(f"{I}else:")
    L.append(f"{I}    m_hT = o_d < tl.where(i_s == tl.num_programs(2) - 1, d_inner, 0)")


def _fwd_source(N, T, U):
    """Source of the forward kernel for d_state = N and T time steps per tile (T a power of two >= 2), U earlier
    segments chained per step (`_fold_earlier_segments`)."""
    ns = range(N)
    L = []
    L.extend(_FWD_SIGNATURE.splitlines())
    I = "    "
    program_ids(L, I, T)
    _prologue(L, I, N, "BLOCK_D")
    _fold_earlier_segments(L, I, N, N, "BLOCK_D", U)
    L.append(f"{I}p_C_b = p_C + i_b * s_C_b")
    L.append(f"{I}n_tiles = tl.cdiv(seqlen, {T})")
    first_tile(L, I, "c_start", "i_s * chunks_per_seg")
    L.append(f"{I}c_end = tl.minimum(c_start + chunks_per_seg, n_tiles)")
    # The next tile's u, Δ, z are loaded while this one is scanned: their latency hides behind a tile of work.
    _load_tiles(L, I, "_n", "tl.minimum(c_start, n_tiles - 1)", tag="_first")
    L.append(f"{I}for i_c in range(c_start, c_end):")
    J = I * 2
    L.append(f"{J}o_tt = i_c * {T} + o_t")
    L.append(f"{J}m_dt = None if EVEN_TILES else m_d[:, None] & (o_tt < seqlen)[None, :]")
    L.append(f"{J}# This tile's u, Δ, z arrived during the last tile; ask for the next one's.")
    L.append(f"{J}raw_u, raw_dt = raw_u_n, raw_dt_n")
    L.append(f"{J}if HAS_Z and not STATES_ONLY:")
    L.append(f"{J}    raw_z = raw_z_n")
    _load_tiles(L, J, "_n", "tl.minimum(i_c + 1, n_tiles - 1)")
    L.append(f"{J}if SAVE_CHUNK_STATES:")
    L.append(f"{J}    if i_c % CKPT_EVERY == 0:")
    L.append(f"{J}        p_hc_d = p_hc + (i_b * d_inner + o_d) * (n_ckpt * {N}) + (i_c // CKPT_EVERY) * {N}")
    store_states(L, J + "        ", [f"h_{n}" for n in ns], "p_hc_d", "1", "BLOCK_D", "hc")
    L.append(f"{J}b_u = raw_u.to(tl.float32)")
    delta_prologue(L, J, "m_dt")
    L.append(f"{J}b_dtsum += tl.sum(b_dt, axis=1)")
    L.append(f"{J}b_dtu = b_dt * b_u")
    unpack("b_dt", [f"dt_{t}" for t in range(T)], L, J, "sdt")
    unpack("b_dtu", [f"dtu_{t}" for t in range(T)], L, J, "sdtu")
    L.append(f"{J}if BC_TIME_VECTORS:")
    _tile_by_state(L, J + I, T, N)
    L.append(f"{J}else:")
    for t in range(T):
        K = J + I
        # Clamp the step index: B, C past the end are never used (Δ = 0 there) but must be in bounds.
        L.append(f"{K}i_t = tl.minimum(i_c * {T} + {t}, seqlen - 1)")
        reset_state(L, K, t, T, [f"h_{n}" for n in ns])
        L.append(f"{K}if BC_PAIRS:")
        _step(L, K + I, t, N, pairs=True)
        L.append(f"{K}else:")
        _step(L, K + I, t, N, pairs=False)
    L.append(f"{J}if not STATES_ONLY:")
    K = J + I
    b_y = pack([f"y_{t}" for t in range(T)], L, K, "py")
    L.append(f"{K}b_y = {b_y}")
    L.append(f"{K}if HAS_D:")
    L.append(f"{K}    b_y += b_u * b_D[:, None]")
    L.append(f"{K}if HAS_Z:")
    L.append(f"{K}    b_y = b_y * silu(raw_z.to(tl.float32), FAST_MATH)")
    L.append(f"{K}p_od = p_out + i_b * s_o_b + o_d[:, None] * s_o_d + o_tt[None, :] * s_o_l")
    L.append(f"{K}tl.store(p_od, b_y.to(p_out.dtype.element_ty), mask=m_dt)")
    L.append(f"{I}p_hT_d = p_hT + i_b * s_hT_b + o_d * s_hT_d + i_s * s_hT_s")
    _final_state_mask(L, I)
    store_states(L, I, [f"h_{n}" for n in ns], "p_hT_d", "1", "BLOCK_D", "hT", mask="m_hT")
    L.append(f"{I}if STATES_ONLY:")
    L.append(f"{I}    tl.store(p_dtsum + (i_b * d_inner + o_d) * tl.num_programs(2) + i_s, b_dtsum, mask=m_d)")
    return HEADER + "\n".join(L) + "\n"


def _fwd_source_lanes(N, T, G, U):
    """Source of the forward kernel with G lanes per channel (G a power of two dividing N and T).

    A row of the program's tensors is one lane: lane group g of channel d (row = d G + g, so a
    channel's G lanes are neighbours in a warp). Lane g keeps states g N/G .. (g + 1) N/G - 1 and
    adds their share of every y_t; the G shares meet by a reduce-scatter (log2 G rounds of
    `tl.gather`, which Triton lowers to warp shuffles), after which lane g holds y for the tile's
    steps g T/G .. (g + 1) T/G - 1 and finishes them alone (D skip, gate, store). Likewise Δ:
    lane g loads and softplus-es only its T/G steps, and every lane gathers all T from its
    neighbours. So the per-step work (softplus, gate: special-function instructions, as the
    decays) is not repeated on every lane, and a channel's T x N decays are spread over G threads:
    G times the threads of one lane per channel, which at the benchmark shapes fills the GPU
    without cutting the sequence into segments (each segment costs a second pass of exps).
    B and C are always read from the tile copy (`_tiled`): one vector per state and tile.
    """
    K = N // G  # states per lane
    S = T // G  # steps a lane finishes per tile
    ks = range(K)
    L = []
    L.extend(_FWD_SIGNATURE.splitlines())
    I = "    "
    L.append(f"{I}# B, C come tile by tile (BC_TIME_VECTORS, BC_TILED).")
    L.append(f"{I}i_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x d_inner x seqlen > 2^31")
    L.append(f"{I}i_d = tl.program_id(1)")
    L.append(f"{I}i_s = tl.program_id(2)")
    L.append(f"{I}R: tl.constexpr = BLOCK_D * {G}  # rows: lanes")
    L.append(f"{I}o_r = tl.arange(0, R)")
    L.append(f"{I}o_t = tl.arange(0, {T})")
    L.append(f"{I}o_g = o_r % {G}  # lane group: states o_g * {K} .., steps o_g * {S} .. of each tile")
    L.append(f"{I}o_d = i_d.to(tl.int64) * BLOCK_D + o_r // {G}")
    L.append(f"{I}m_d = o_d < d_inner")
    L.append(f"{I}o_n = o_g * {K}")
    L.append(f"{I}o_s = o_g[:, None] * {S} + tl.arange(0, {S})[None, :]  # (R, S): the steps this lane finishes")
    for j in range(G):
        L.append(f"{I}src_{j} = o_r - o_g + {j}  # row of the channel's lane {j}")
    _prologue(L, I, K, "R", first_state="o_n")
    _fold_earlier_segments(L, I, K, N, "R", U, first_state="o_n")
    L.append(f"{I}s_row: tl.constexpr = {T // 2} if BC_PAIRS else {T}  # (batch, tile, B | C, state, step) rows")
    L.append(f"{I}o_w, m_w1 = tl.arange(0, s_row)[None, :], None")
    L.append(f"{I}n_tiles = tl.cdiv(seqlen, {T})")
    first_tile(L, I, "c_start", "i_s * chunks_per_seg")
    L.append(f"{I}c_end = tl.minimum(c_start + chunks_per_seg, n_tiles)")
    L.append(f"{I}for i_c in range(c_start, c_end):")
    J = I * 2
    L.append(f"{J}o_tt = i_c * {T} + o_t")
    L.append(f"{J}o_ts = i_c * {T} + o_s")
    L.append(f"{J}m_dt = None if EVEN_TILES else m_d[:, None] & (o_tt < seqlen)[None, :]")
    L.append(f"{J}m_ds = None if EVEN_TILES else m_d[:, None] & (o_ts < seqlen)")
    L.append(f"{J}if SAVE_CHUNK_STATES:")
    L.append(f"{J}    if i_c % CKPT_EVERY == 0:")
    L.append(f"{J}        p_hc_d = p_hc + (i_b * d_inner + o_d) * (n_ckpt * {N}) + (i_c // CKPT_EVERY) * {N} + o_n")
    store_states(L, J + "        ", [f"h_{k}" for k in ks], "p_hc_d", "1", "R", "hc")
    row = "i_b * s_{0}_b + o_d[:, None] * s_{0}_d"
    L.append(f"{J}raw_u = tl.load(p_u + {row.format('u')} + o_tt[None, :] * s_u_l, mask=m_dt, other={ZERO})")
    L.append(f"{J}raw_dt = tl.load(p_delta + {row.format('dt')} + o_ts * s_dt_l, mask=m_ds, other={ZERO})")
    delta_prologue(L, J, "m_ds", note="(R, S): this lane's steps")
    if S == 1:
        L.append(f"{J}dto_0 = tl.reshape(b_dt, [R])")
    else:
        unpack("b_dt", [f"dto_{s}" for s in range(S)], L, J, "sdt", rows="R")
    for t in range(T):  # Δ of step t from lane t // S of the channel
        L.append(f"{J}dt_{t} = tl.gather(dto_{t % S}, src_{t // S}, 0)")
    L.append(f"{J}if STATES_ONLY:")
    L.append(f"{J}    b_dtsum += " + " + ".join(f"dt_{t}" for t in range(T)))
    unpack("raw_u.to(tl.float32)", [f"u_{t}" for t in range(T)], L, J, "su", rows="R")
    for t in range(T):
        L.append(f"{J}dtu_{t} = dt_{t} * u_{t}")
    keeps(L, J, T)
    L.append(f"{J}p_bt = p_B_b + i_c * {2 * N} * s_row + o_n[:, None] * s_row  # (R, 1): the lane's first row")
    at = dict(steps_at="o_w", other="None", rows="R")  # whole tiles of the copy: no masks
    for k in ks:
        time_vector(L, J, f"p_bt + {k} * s_row", "bt", T, **at)
        L.append(f"{J}if not STATES_ONLY:")
        time_vector(L, J + I, f"p_bt + {N + k} * s_row", "ct", T, **at)
        for t in range(T):
            L.append(f"{J}if HAS_SEQ_IDX:")
            L.append(f"{J}    h_{k} = h_{k} * keep_{t}")
            L.append(f"{J}h_{k} = tl.exp2(dt_{t} * a_{k}) * h_{k} + dtu_{t} * bt_{t}")
            L.append(f"{J}if not STATES_ONLY:")
            y = f"h_{k} * ct_{t}" if k == 0 else f"y_{t} + h_{k} * ct_{t}"
            L.append(f"{J}    y_{t} = {y}")
    L.append(f"{J}if not STATES_ONLY:")
    K2 = J + I
    # Reduce-scatter: in the round of bit b, the lanes with bit b set keep the upper half of the
    # steps still shared and send the lower half to their partner (row ^ b), which keeps that.
    vals = [f"y_{t}" for t in range(T)]
    bit = G // 2
    while bit >= 1:
        half = len(vals) // 2
        L.append(f"{K2}up = (o_g & {bit}) != 0")
        new = []
        for i in range(half):
            lo, hi = vals[i], vals[half + i]
            L.append(f"{K2}keep = tl.where(up, {hi}, {lo})")
            L.append(f"{K2}send = tl.where(up, {lo}, {hi})")
            L.append(f"{K2}r{bit}_{i} = keep + tl.gather(send, o_r ^ {bit}, 0)")
            new.append(f"r{bit}_{i}")
        vals = new
        bit //= 2
    if S == 1:
        L.append(f"{K2}b_y = {vals[0]}[:, None]")
    else:
        L.append(f"{K2}b_y = {pack(vals, L, K2, 'py', rows='R')}  # (R, S): y of this lane's steps")
    L.append(f"{K2}if HAS_D:")
    L.append(f"{K2}    b_uo = tl.load(p_u + {row.format('u')} + o_ts * s_u_l, mask=m_ds, other={ZERO})")
    L.append(f"{K2}    b_y += b_uo.to(tl.float32) * b_D[:, None]")
    L.append(f"{K2}if HAS_Z:")
    L.append(f"{K2}    b_z = tl.load(p_z + {row.format('z')} + o_ts * s_z_l, mask=m_ds, other={ZERO})")
    L.append(f"{K2}    b_y = b_y * silu(b_z.to(tl.float32), FAST_MATH)")
    L.append(f"{K2}p_od = p_out + {row.format('o')} + o_ts * s_o_l")
    L.append(f"{K2}tl.store(p_od, b_y.to(p_out.dtype.element_ty), mask=m_ds)")
    L.append(f"{I}p_hT_d = p_hT + i_b * s_hT_b + o_d * s_hT_d + i_s * s_hT_s + o_n")
    _final_state_mask(L, I)
    store_states(L, I, [f"h_{k}" for k in ks], "p_hT_d", "1", "R", "hT", mask="m_hT")
    L.append(f"{I}if STATES_ONLY:")
    L.append(f"{I}    p_ds = p_dtsum + (i_b * d_inner + o_d) * tl.num_programs(2) + i_s")
    L.append(f"{I}    tl.store(p_ds, b_dtsum, mask=m_d & (o_g == 0))")
    return HEADER + "\n".join(L) + "\n"


@functools.cache
def _fwd_kernel(N, T, G, U):
    """The generated forward kernel for (d_state, T, lanes per channel, earlier segments chained per step)."""
    src = _fwd_source(N, T, U) if G == 1 else _fwd_source_lanes(N, T, G, U)
    return generated_kernel(src, f"scan_fwd_N{N}_T{T}_G{G}_U{U}", "scan_fwd_kernel")


def _lanes_per_channel(batch, d_inner, d_state, T, time_rows, device, tuning):
    """(lanes, spread): the lanes (threads) sharing one channel's state, a power of two dividing
    d_state and T, and whether they were chosen to fill the GPU.

    At least enough that each lane holds at most tuning.states_per_lane states (registers) where it
    can; tuning.spread_lanes where that alone gives the launch tuning.spread_warps_per_sm one-warp
    programs per multiprocessor (time-contiguous u, Δ, z: the layout it was measured in), spread then,
    so that the sequence needs no segments."""
    def fits(lanes):
        return d_state % lanes == 0 and T % lanes == 0

    lanes = 1
    while d_state // lanes > tuning.states_per_lane and fits(2 * lanes):
        lanes *= 2
    spread = tuning.spread_lanes
    fills = batch * cdiv(d_inner, 32 // spread) >= tuning.spread_warps_per_sm * sm_count(device)
    if spread > lanes and fits(spread) and time_rows and fills:
        return spread, True
    return lanes, False


@triton.jit
def _tile_copy_kernel(
    p_B, p_C, p_BC, seqlen, n_tiles, s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l,
    D_STATE: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, TILES: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    # B, C (batch, d_state, seqlen) -> BC (batch, n_tiles, 2, d_state, T), zeros past the end;
    # TILES tiles per program, both tensors in one launch.
    i_b = tl.program_id(0).to(tl.int64)
    o_c = time_index(tl.program_id(1), WIDE_INDEX) * TILES + tl.arange(0, TILES)
    o_n = tl.arange(0, BLOCK_N)
    o_t = tl.arange(0, T)
    steps = o_c[:, None, None] * T + o_t[None, None, :]  # [tiles, states, steps]
    m_dst = (o_c < n_tiles)[:, None, None] & (o_n < D_STATE)[None, :, None]
    m_src = m_dst & (steps < seqlen)
    p_dst = p_BC + ((i_b * n_tiles + o_c[:, None, None]) * 2 * D_STATE + o_n[None, :, None]) * T + o_t[None, None, :]
    b = tl.load(p_B + i_b * s_B_b + o_n[None, :, None] * s_B_n + steps * s_B_l, mask=m_src, other=0.0)
    tl.store(p_dst, b, mask=m_dst)
    c = tl.load(p_C + i_b * s_C_b + o_n[None, :, None] * s_C_n + steps * s_C_l, mask=m_src, other=0.0)
    tl.store(p_dst + D_STATE * T, c, mask=m_dst)


def _tiled(B, C, T):
    """B and C (batch, d_state, seqlen), any strides, copied into one (batch, n_tiles, 2, d_state, T)
    tensor of their common dtype: a tile's rows of B, then of C, zeros past the end. One launch
    (torch's copies took two, and more for a ragged end)."""
    batch, d_state, seqlen = B.shape
    n_tiles = cdiv(seqlen, T)
    BC = B.new_empty(batch, n_tiles, 2, d_state, T, dtype=torch.promote_types(B.dtype, C.dtype))
    tiles = 16
    launch(
        _tile_copy_kernel, (batch, cdiv(n_tiles, tiles)),
        B, C, BC, seqlen, n_tiles, *B.stride(), *C.stride(),
        D_STATE=d_state, BLOCK_N=next_power_of_2(d_state), T=T, TILES=tiles, WIDE_INDEX=wide_index(seqlen, B, C),
    )
    return BC


def _bc_reads(lanes, B_dtype, C_dtype, B_strides, C_strides, shape, aligned):
    """How the kernel reads B and C (batch, d_state, seqlen) of `shape`: (BC_PAIRS, BC_TIME_VECTORS,
    BC_TILED).

    Several lanes per channel, or unit time stride (the benchmark's layout) with one dtype: one
    vector of a tile's steps per state, from a tile-by-tile copy (`_tiled`), so that the kernel finds
    every state's row at a fixed offset from one pointer per tile; bf16 as words of two steps, through
    an int32 view so that the kernel's strides count words. B and C of two dtypes with unit time
    stride: vectors read as passed. Otherwise step by step, bf16 with unit state stride (the model's
    x_proj layout) as words of two states (`_state_row`; `aligned`: both start on 4-byte boundaries)."""
    B_time_rows = B_strides[2] == 1 and C_strides[2] == 1
    if lanes != 1 or (B_time_rows and B_dtype == C_dtype):
        return torch.promote_types(B_dtype, C_dtype) == torch.bfloat16, True, True
    if B_time_rows:
        return False, True, False
    pairs = aligned and bf16_pair_layout(B_dtype, shape, B_strides) and bf16_pair_layout(C_dtype, shape, C_strides)
    return pairs, False, False


class _FwdPlan(NamedTuple):
    """The launches of one forward, decided once per kind of input (`_fwd_plan`)."""

    kernel: object
    T: int
    n_blocks: int  # programs along the channels
    n_seg: int
    chunks_per_seg: int
    bc_tiled: bool  # B and C read from a tile-by-tile copy
    flags: dict  # constexprs and launch options of both passes
    full: dict  # the full pass's own flags (the one pass where n_seg == 1)
    states_only: dict  # n_seg > 1, first: the states-only pass over every segment but the last


@functools.lru_cache(maxsize=256)
def _fwd_plan(
    shape, d_state, dtype, u_strides, delta_strides, z_strides, B_dtype, C_dtype, B_strides, C_strides, bc_aligned,
    device, has_seq_idx, has_D, has_z, has_delta_bias, delta_softplus, has_initial_state, save, ckpt_len,
    A_is_log, tuning,
):
    """The forward's launch plan. Its arguments are everything the plan reads: the shapes (u's; A is
    (d_inner, d_state), B and C (batch, d_state, seqlen)), dtypes and strides of the inputs, B and C's
    4-byte alignment (the one property of a pointer it reads), the device (multiprocessors, CUDA or
    the interpreter), which optional inputs are given, the flags and the tuning; nothing of the
    tensors' values."""
    batch, d_inner, seqlen = shape
    T = max(2, 16 // dtype.itemsize)  # one 16-byte vector of steps per thread
    num_warps = 1
    time_rows = all(s is None or s[2] == 1 or seqlen == 1 for s in (u_strides, delta_strides, z_strides))
    lanes, spread = _lanes_per_channel(batch, d_inner, d_state, T, time_rows, device, tuning)
    # The spread fills the GPU: no segments.
    warps_per_sm = tuning.spread_warps_per_sm if spread else tuning.warps_per_sm
    bc_pairs, bc_time_vectors, bc_tiled = _bc_reads(
        lanes, B_dtype, C_dtype, B_strides, C_strides, (batch, d_state, seqlen), bc_aligned
    )
    block = 32 * num_warps // lanes  # channels per program
    n_tiles = cdiv(seqlen, T)
    assert not save or ckpt_len % T == 0
    n_blocks = cdiv(d_inner, block)
    max_segments = 1 if has_seq_idx else n_tiles  # segments chain by ΣΔ, blind to document resets
    n_seg = segment_count(batch * n_blocks, warps_per_sm, device, n_tiles, tuning.min_tiles_per_seg, max_segments)
    is_cuda = device.type == "cuda"
    flags = dict(
        HAS_SEQ_IDX=has_seq_idx,
        HAS_D=has_D, HAS_Z=has_z, HAS_DELTA_BIAS=has_delta_bias,
        DELTA_SOFTPLUS=delta_softplus, CKPT_EVERY=max(1, ckpt_len // T), num_warps=num_warps,
        BC_PAIRS=bc_pairs, BC_TIME_VECTORS=bc_time_vectors, BC_TILED=bc_tiled, FAST_MATH=is_cuda,
        A_LOG=A_is_log, BLOCK_D=block, EVEN_TILES=seqlen % T == 0 and d_inner % block == 0,
        **({"maxnreg": tuning.maxnreg} if tuning.maxnreg and is_cuda else {}),
    )
    return _FwdPlan(
        _fwd_kernel(d_state, T, lanes, tuning.fold_segments), T, n_blocks, n_seg, cdiv(n_tiles, n_seg), bc_tiled,
        flags,
        full=dict(USE_INITIAL_STATE=has_initial_state, STATES_ONLY=False, SAVE_CHUNK_STATES=save),
        states_only=dict(USE_INITIAL_STATE=False, STATES_ONLY=True, SAVE_CHUNK_STATES=False),
    )


def scan_fwd_recurrent(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, ckpt_len, seq_idx=None,
    A_is_log=False, tuning=RecurrentFwdTuning(), out_dtype=None,
):
    """Forward scan; fills `chunk_states` (batch, d_inner, n_ckpt, d_state) every `ckpt_len` steps if non-empty.

    Returns (out, final_state), final_state (batch, d_inner, d_state) fp32. With A_is_log, A holds A_log
    (A = -exp(A_log), computed in the kernels). out: u's dtype, or out_dtype.
    """
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    save = chunk_states.numel() > 0
    plan = _fwd_plan(
        u.shape, d_state, u.dtype, u.stride(), delta.stride(), None if z is None else z.stride(),
        B.dtype, C.dtype, B.stride(), C.stride(), B.data_ptr() % 4 == 0 and C.data_ptr() % 4 == 0,
        u.device, seq_idx is not None, D is not None, z is not None, delta_bias is not None, bool(delta_softplus),
        initial_state is not None, save, ckpt_len, A_is_log, tuning,
    )
    if plan.bc_tiled:
        B = C = _tiled(B, C, plan.T)
        if B.dtype == torch.bfloat16:
            B = C = B.view(torch.int32)
        B_strides = C_strides = (B.stride(0), 0, 0)
    else:
        B_strides, C_strides = B.stride(), C.stride()
    n_ckpt = chunk_states.shape[2] if save else 1
    out = torch.empty_like(u, dtype=out_dtype)  # (batch, d_inner, seqlen), in u's layout (channels-last in the model)
    n_seg = plan.n_seg
    A_c = A.contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    z_ = z if z is not None else u
    common = (
        *u.stride(), *delta.stride(), *A_c.stride(), *B_strides, *C_strides, *z_.stride(), *out.stride(),
    )
    si = seq_idx_args(seq_idx)
    wide = wide_index(seqlen, u, delta, z, out, B, C)

    def run_pass(segments, h0, h_out, h_out_strides, dtsum, h_seg, pass_flags):
        """One launch of the generated kernel over (batch, channel blocks, segments)."""
        launch(
            plan.kernel, (batch, plan.n_blocks, segments),
            u, delta, A_c, B, C, D, z, delta_bias, h0, out, h_out, dtsum, h_seg, chunk_states,
            seqlen, d_inner, n_ckpt, plan.chunks_per_seg, *common, *h0_strides, *h_out_strides, *si,
            **pass_flags, **plan.flags, WIDE_INDEX=wide,
        )

    final_state = u.new_empty(batch, d_inner, d_state, dtype=torch.float32)
    h0_strides = (d_inner * d_state, d_state, 0)  # initial_state and final_state, contiguous; no segment stride
    if n_seg == 1:  # no earlier segments: their ΣΔ and end states are never read (any fp32 tensor will do)
        run_pass(1, initial_state, final_state, h0_strides, final_state, final_state, plan.full)
        return out, final_state
    # Pass 1 skips the last segment: no later segment needs its end state, and the full pass computes it.
    # Each segment of the full pass then chains the states of those before it (`_fold_earlier_segments`).
    h_seg = u.new_empty(batch, d_inner, n_seg - 1, d_state, dtype=torch.float32)
    dtsum = u.new_empty(batch, d_inner, n_seg - 1, dtype=torch.float32)
    seg_strides = (d_inner * (n_seg - 1) * d_state, (n_seg - 1) * d_state, d_state)
    run_pass(n_seg - 1, None, h_seg, seg_strides, dtsum, None, plan.states_only)
    run_pass(n_seg, initial_state, final_state, h0_strides, dtsum, h_seg, plan.full)
    return out, final_state


__all__ = ["RecurrentFwdTuning", "scan_fwd_recurrent"]
