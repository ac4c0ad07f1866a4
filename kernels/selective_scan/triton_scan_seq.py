"""Fast forward selective scan: a sequential recurrence per channel, generated for each d_state.

Glossary as in `triton_scan`: h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t,  y_t = C_t . h_t.

Why generated code: the fastest layout gives every thread one channel d and its whole state
h[d, 0:d_state] in registers, so that y_t = sum_n C_t[n] h_t[n] needs no shuffles and each step is
d_state x (exp2, FMA, FMA) in one thread. Triton has no way to say "this axis lives in one thread"
for a 2-D tile, so the kernel is written with d_state separate [BLOCK_D] vectors h_0 .. h_{N-1},
unrolled by a small generator below (cached per (d_state, T) in ~/.cache/hf_mamba/generated,
or $HF_MAMBA_KERNEL_CACHE, where Triton can read the source). Time is read in tiles of T steps,
[BLOCK_D, T] (one 16-byte vector per thread), and split into per-step [BLOCK_D] vectors with
tl.split, which is free when the tile's T steps sit in one thread. B and C are the same for every
channel, so every thread loads the same values (one broadcast from the cache):
- with unit time stride (`_tile_by_state`), one [1, T] vector per state and tile, bf16 as words of
  two steps, and the tile is then scanned state by state (a state's recurrence needs only itself).
  B and C are first copied tile by tile (`_tiled`), so that every state's row sits at a fixed
  offset from one pointer per tile: with a pointer per state, 32 of them, ptxas spilled them at the
  168-register cap and reloaded one for every state and tile;
- otherwise step by step (`_state_row`): per-step scalars, bf16 with unit d_state stride (the
  model's x_proj output) as words of two states.
On CUDA softplus and the SiLU gate run on single ex2 / lg2 / rcp instructions (FAST_MATH); the
interpreter keeps the libdevice forms. The next tile's u, Δ, z can be loaded while the current one
is scanned (PREFETCH), and tiles that are wholly inside the tensors need no masks (EVEN_TILES).
The decays' exp2 can also run on the FMA pipe for chosen states (EXP2_FMA knobs, `_exp2_fma`); on
H200 that was slower in every mix tried (kernels/NOTES.md, session 11), so it is off.

Short batches do not fill the GPU with one program per 32 channels, so the sequence can also be
cut into segments run in parallel: pass 1 scans each segment but the last from h = 0 (keeping only
its end state and sum of Δ), a small kernel chains the segments (h_in[s+1] = exp(A ΣΔ_s) h_in[s] +
h_end[s]), and pass 2 reruns every segment from its true incoming state. That nearly doubles the
exps, so it is used only when the GPU would otherwise be mostly idle (fewer than WARPS_PER_SM warps
per SM).

A channel's states can also be spread over several lanes (`_fwd_source_lanes`): each lane keeps
d_state // lanes states, y_t is summed over the lanes and Δ shared between them by warp shuffles, and
each lane finishes a share of the steps. That multiplies the threads without a second pass, so it is
used where it fills the GPU alone (`_lanes_per_channel`), and for d_state above STATES_PER_LANE.

The forward also stores h every CKPT steps, (batch, d_inner, n_ckpt, d_state) fp32, for the backward
in `triton_scan`.
"""

import functools
import hashlib
import importlib.util
import os

import torch
import triton
import triton.language as tl

from .._launch import cdiv, launch, next_power_of_2, seq_idx_args, sm_count

# A segment must be at least this many T-step tiles long to be worth its second pass.
MIN_TILES_PER_SEG = 16
# The chain kernels' elements (channel, state) per one-warp program and segments per loop step. H200
# (session 12, NOTES.md): 9.6 / 11.0 / 14.0 us at 8, 8 and 64 segments of the benchmark shapes, against
# 14.8 / 15.6 / 72.3 for one segment per step; with 4 warps the scan crossed warps (14.7 / 17.8 / 18.0).
CHAIN_BLOCK_E = 128
CHAIN_BLOCK_S = 16
# Below this many one-warp programs per multiprocessor, the forward cuts the sequence into segments.
# None: the measured choice (`_config`).
WARPS_PER_SM = None
# States held by one thread at most (registers): a larger d_state is always spread over 2, 4, ...
# lanes per channel.
STATES_PER_LANE = 16
# A channel's d_state 16 states spread over 4 lanes (4 states each, `_fwd_source_lanes`) where that
# gives at least 4 one-warp programs per multiprocessor, and then no segments. H200, bf16 ms (session
# 14, NOTES.md), 4 lanes against one lane with segments: (8, 1536, 2048, 16) 0.259 / 0.366, (4, 4096,
# 4096, 16) 0.617 / 0.839, (4, 1536, 2048, 16) (5.8 programs per SM) 0.208 / 0.338; fp32 0.412 /
# 0.516 and 1.065 / 1.275. Below that a channel's latency bounds the time: (1, 2048, 16384, 16), 1.9
# programs per SM, took 1.299 ms on 4 lanes with 2 segments and 0.536 with 8 (twice the exps), against
# 0.488 on one lane with 64 segments.
SPREAD_LANES = 4
SPREAD_WARPS_PER_SM = 4
# Lanes per channel (sweep knob; None: `_lanes_per_channel`'s rule).
LANES = None
# Channels per thread (one lane per channel): the per-step loads of B_t and C_t, the index and pointer
# work are then shared by that many channels. None: the measured choice (`_config`).
CHANNELS_PER_THREAD = None
# Sweep knobs (benchmark_kernels.py --fwd-sweep). Channels per thread in the second pass of a
# segmented forward (None: the measured choice, `_pass2_channels`). The layout B and C are read in:
# "as given", or "time rows" (copied to unit time stride first), which was not faster in the model's
# layout (H200, session 6, scan kernels at (4, 1536, 1024, 16) channels-last bf16: 114.4 us either way,
# before the copies).
# Whether bf16 B, C are read as 32-bit words of two values (`_state_row`, `_time_vector`), and
# whether B, C with unit time stride are read as vectors of a tile's steps (`_tile_by_state`).
PASS2_CHANNELS_PER_THREAD = None
BC_LAYOUT = "as given"
BC_PAIRS = True
BC_TIME_VECTORS = True
# Whether B, C with unit time stride are copied tile by tile first (`_tiled`): the kernel then needs
# no pointer per state, which at 168 registers were spilled and reloaded for every tile.
BC_TILE_COPY = True
# Softplus and the SiLU gate through single special-function instructions on CUDA (`_softplus`,
# `_silu`): libdevice's log alone took ~25 instructions per step, 1.5 per state update.
FAST_MATH = True
# Whether to load the next tile's u, Δ, z while the current one is scanned (software pipelining:
# their latency hidden behind a tile of work). None: the measured choice (`_config`).
PREFETCH = None
# Register cap per thread of the forward kernels: ptxas hoists a tile's B, C loads as far as it is
# free to, and the registers then limit the warps per multiprocessor. 0: no cap; None: the measured
# choice (`_config`).
MAXNREG = None
# Steps per tile (None: one 16-byte vector of u per thread, 8 in bf16, 4 in fp32). Sweep knob.
TILE_STEPS = None
# Bitmasks of the states whose decay exp2 runs on the FMA pipe (`_exp2_fma`, 11 instructions) rather
# than the special-function unit (one instruction, but 16 per cycle and SM): in a segmented forward's
# first pass, and in the pass that writes outputs. Sweep knobs; 0: all on the special-function unit.
EXP2_FMA_PASS1 = 0
EXP2_FMA = 0
# Register cap of a segmented forward's first pass (states only: no C, z or outputs to hold), which
# could run more warps per multiprocessor than the second. None: MAXNREG's choice (sweep knob).
PASS1_MAXNREG = None


def _config():
    """(channels per thread, warps per SM, prefetch, register cap), the knobs' measured choices.

    H200 sweeps (`benchmark_kernels.py --fwd-sweep`, session 6 in NOTES.md), time vectors and fast
    math: bf16 at one channel per thread, 16 warps per SM, prefetching, capped at 168 registers
    (0.382 ms at (8, 1536, 2048, 16); 0.399 with pass 1 at two channels, 0.469-0.519 without the cap,
    0.480 at 152, 0.423 at 176). fp32 the same since B, C are copied tile by tile (session 11: 0.526
    ms, against 0.596 without prefetching or a cap; before the copy, that was the faster, 0.541)."""
    channels, warps, prefetch, maxnreg = 1, 16, True, 168
    return (
        CHANNELS_PER_THREAD or channels,
        WARPS_PER_SM or warps,
        prefetch if PREFETCH is None else PREFETCH,
        maxnreg if MAXNREG is None else MAXNREG,
    )


def _pass2_channels(channels_per_thread, pairs):
    """Channels per thread of the segmented forward's second pass. H200 sweeps (session 5, NOTES.md):
    with B, C read in pairs (bf16 in the model's layout), one channel where pass 1 keeps two took the
    130M training shape from 0.25 to 0.18 ms (ncu, scalar loads: pass 2 at two channels held 252
    registers, 8 warps per multiprocessor); with scalar loads (time-contiguous B, C: the benchmark
    shapes) two channels stayed faster (0.560 against 0.632 ms at (8, 1536, 2048, 16))."""
    return PASS2_CHANNELS_PER_THREAD or (1 if pairs else channels_per_thread)


_HEADER = '''"""Generated by hf_mamba.kernels.selective_scan.triton_scan_seq: do not edit."""
import triton
import triton.language as tl


@triton.jit
def _approx(x, op: tl.constexpr):
    # One special-function-unit instruction (ex2, lg2 or rcp), flushing denormals: no range fix-ups.
    return tl.inline_asm_elementwise(
        op + ".approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _softplus(x, FAST_MATH: tl.constexpr):
    # log(1 + e^x), linear above 20 like torch. FAST_MATH (CUDA only, not the interpreter): as
    # ln 2 lg2(1 + ex2(x log2 e)), three instructions where libdevice's log takes about 25.
    if FAST_MATH:
        y = _approx(1.0 + _approx(x * 1.4426950408889634, "ex2"), "lg2") * 0.6931471805599453
    else:
        y = tl.log(1.0 + tl.exp(x))
    return tl.where(x <= 20.0, y, x)


@triton.jit
def _log2_rate(a, A_LOG: tl.constexpr):
    # A scaled by log2(e), so that exp(ΔA) = exp2(Δ a). A_LOG: the pointer holds A_log, A = -exp(A_log)
    # (the model's parameter, as the mixer hands it over: no host-side exp and negation kernels).
    if A_LOG:
        a = -tl.exp(a)
    return a * 1.4426950408889634


@triton.jit
def _exp2_fma(x):
    # 2^x on the FMA pipe, not the special-function unit (whose ex2 rate, 16 per cycle and SM, bounds
    # the scan): x = j + f with j = round(x) by the 1.5 * 2^23 trick, 2^f by a degree-5 polynomial on
    # [-1/2, 1/2] (relative error 9e-8, 1.9e-7 in fp32 arithmetic; exactly 1 at 0, so Δ = 0 keeps h),
    # and j added to its exponent bits. Clamped to +-126.
    x = tl.minimum(tl.maximum(x, -126.0), 126.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = 0.0013264726693621052 * f + 0.009671512736402432
    p = p * f + 0.05550733744859314
    p = p * f + 0.24022242083267376
    p = p * f + 0.6931469775981836
    p = p * f + 1.0
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _sigmoid(x, FAST_MATH: tl.constexpr):
    # FAST_MATH: with an approximate reciprocal in place of an IEEE division.
    if FAST_MATH:
        return _approx(1.0 + _approx(x * -1.4426950408889634, "ex2"), "rcp")
    return tl.sigmoid(x)


@triton.jit
def _silu(x, FAST_MATH: tl.constexpr):
    return x * _sigmoid(x, FAST_MATH)

'''


# The forward kernels' signature (one lane or several per channel: the launcher passes the same arguments).
_FWD_SIGNATURE = """@triton.jit
def scan_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_delta_bias, p_h0, p_out, p_hT, p_dtsum, p_hc,
    seqlen, d_inner, n_ckpt, chunks_per_seg,
    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_A_d, s_A_n,
    s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l, s_z_b, s_z_d, s_z_l, s_o_b, s_o_d, s_o_l,
    s_h0_b, s_h0_d, s_h0_s, s_hT_b, s_hT_d, s_hT_s, p_seq_idx, s_si_b, s_si_l,
    HAS_SEQ_IDX: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STATES_ONLY: tl.constexpr,
    SAVE_CHUNK_STATES: tl.constexpr, CKPT_EVERY: tl.constexpr, BLOCK_D: tl.constexpr,
    BC_PAIRS: tl.constexpr, BC_TIME_VECTORS: tl.constexpr, BC_TILED: tl.constexpr,
    FAST_MATH: tl.constexpr, EVEN_TILES: tl.constexpr, PREFETCH: tl.constexpr, A_LOG: tl.constexpr,
    EXP2_FMA: tl.constexpr,
):"""


# A masked load's fill; none where EVEN_TILES drops the masks (a fill needs a mask).
_ZERO = "None if EVEN_TILES else 0"


def _unpack(src, names, lines, indent, tmp, rows="BLOCK_D"):
    """Emit code splitting the [rows, len(names)] tile `src` into one [rows] vector per column."""
    k = len(names)
    if k == 2:
        lines.append(f"{indent}{names[0]}, {names[1]} = tl.split({src})")
        return
    lines.append(f"{indent}{tmp}e, {tmp}o = tl.split(tl.reshape({src}, [{rows}, {k // 2}, 2]))")
    _unpack(f"{tmp}e", names[0::2], lines, indent, tmp + "e", rows)
    _unpack(f"{tmp}o", names[1::2], lines, indent, tmp + "o", rows)


def _pack(names, lines, indent, tmp, rows="BLOCK_D"):
    """Emit code joining [rows] vectors (one per column) into a [rows, len(names)] tile; returns its name."""
    k = len(names)
    if k == 2:
        lines.append(f"{indent}{tmp} = tl.join({names[0]}, {names[1]})")
        return tmp
    even = _pack(names[0::2], lines, indent, tmp + "e", rows)
    odd = _pack(names[1::2], lines, indent, tmp + "o", rows)
    lines.append(f"{indent}{tmp} = tl.reshape(tl.join({even}, {odd}), [{rows}, {k}])")
    return tmp


def _reset_state(lines, indent, t, T, names, init=False):
    """Emit the document-boundary reset: h = 0 before step t where seq_idx[t] != seq_idx[t - 1].

    init: names are new variables set to the 0/1 factor (1.0 without seq_idx), not states."""
    if init:
        for name in names:
            lines.append(f"{indent}{name} = 1.0")
    lines.append(f"{indent}if HAS_SEQ_IDX:")
    lines.append(f"{indent}    p_si_b = p_seq_idx + i_b * s_si_b")
    lines.append(f"{indent}    si_prev = tl.load(p_si_b + tl.maximum(i_t - 1, 0) * s_si_l)")
    lines.append(f"{indent}    same = tl.load(p_si_b + i_t * s_si_l) == si_prev")
    # Steps past the end (i_t clamped) never reset, so the final state survives them.
    lines.append(f"{indent}    keep = tl.where(same | (i_c * {T} + {t} >= seqlen), 1.0, 0.0)")
    for name in names:
        lines.append(f"{indent}    {name} = {'keep' if init else f'{name} * keep'}")


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


def _decay(x, n):
    """Code for exp2(x), state n's decay: on the FMA pipe where bit n of EXP2_FMA is set. Written
    inline: under the interpreter every call of a jit function costs milliseconds."""
    return f"(_exp2_fma({x}) if (EXP2_FMA >> {n}) & 1 else tl.exp2({x}))"


def _step(lines, indent, t, N, pairs):
    """Emit step t of a tile: the state update h_n = exp(Δ A_n) h_n + Δ u B_n, and y_t = C_t . h."""
    b = _state_row(lines, indent, "p_B_b + i_t * s_B_l", "s_B_n", "bt", N, pairs)
    for n in range(N):
        lines.append(f"{indent}h_{n} = {_decay(f'dt_{t} * a_{n}', n)} * h_{n} + dtu_{t} * {b[n]}")
    lines.append(f"{indent}if not STATES_ONLY:")
    c = _state_row(lines, indent + "    ", "p_C_b + i_t * s_C_l", "s_C_n", "ct", N, pairs)
    lines.append(f"{indent}    y_{t} = " + " + ".join(f"h_{n} * {c[n]}" for n in range(N)))


def _time_vector(lines, indent, row, name, T, steps_at="o_tt[None, :], mask=m_t1", other=_ZERO, rows="1"):
    """One state's T steps of B or C (unit time stride) as T [rows]-tensors name_0 .. name_{T-1}:
    [1] where every thread reads the same row, [R] in the lanes kernel (a row per lane).

    BC_PAIRS (bf16 with 4-byte aligned rows, passed as an int32 view: word strides, so the loads can
    be 16-byte vectors): loaded as T / 2 words of two steps each, where bf16 -> fp32 is a shift or a
    mask of the word (at o_w, mask m_w1); otherwise as T values converted to fp32 (steps_at: their
    offsets from `row` and mask). other: the loads' fill."""
    names = [f"{name}_{t}" for t in range(T)]
    lines.append(f"{indent}if BC_PAIRS:")
    J = indent + "    "
    words = [f"w_{k}" for k in range(T // 2)]
    lines.append(f"{J}v = tl.load({row} + o_w, mask=m_w1, other={other})")
    if len(words) == 1:
        lines.append(f"{J}w_0 = v" if rows == "1" else f"{J}w_0 = tl.reshape(v, [{rows}])")
    else:
        _unpack("v", words, lines, J, "sw", rows=rows)
    for k, w in enumerate(words):
        lines.append(f"{J}{names[2 * k]} = ({w} << 16).to(tl.float32, bitcast=True)")
        lines.append(f"{J}{names[2 * k + 1]} = ({w} & -65536).to(tl.float32, bitcast=True)")
    lines.append(f"{indent}else:")
    lines.append(f"{J}v = tl.load({row} + {steps_at}, other={other})")
    _unpack("v.to(tl.float32)", names, lines, J, "sv", rows=rows)


def _tile_by_state(lines, indent, T, N):
    """Emit one tile's T steps state by state, for B and C with unit time stride (BC_TIME_VECTORS).

    Each state's T values of B (and C) arrive in one vector load of a [1, T] tile that every thread
    holds whole, where the step-by-step order needs T scalar loads per state. A state's recurrence
    over the tile needs only that state, so the order changes nothing else; y_t is summed over the
    states as they come."""
    if_states = f"{indent}if not STATES_ONLY:"
    for t in range(T):
        lines.append(f"{indent}i_t = tl.minimum(i_c * {T} + {t}, seqlen - 1)")
        _reset_state(lines, indent, t, T, [f"keep_{t}"], init=True)
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
        _time_vector(lines, indent, f"p_bt + {n} * s_bn", "bt", T, **at)
        lines.append(if_states)
        _time_vector(lines, indent + "    ", f"p_ct + {n} * s_cn", "ct", T, **at)
        for t in range(T):
            lines.append(f"{indent}if HAS_SEQ_IDX:")
            lines.append(f"{indent}    h_{n} = h_{n} * keep_{t}")
            lines.append(f"{indent}h_{n} = {_decay(f'dt_{t} * a_{n}', n)} * h_{n} + dtu_{t} * bt_{t}")
            lines.append(if_states)
            y = f"h_{n} * ct_{t}" if n == 0 else f"y_{t} + h_{n} * ct_{t}"
            lines.append(f"{indent}    y_{t} = {y}")


def _load_tiles(lines, indent, suffix, names=("u", "dt", "z"), tile=None, tag=""):
    """Emit the loads of one tile's u, Δ and z (z only where outputs are written), [BLOCK_D, T] as
    stored, into raw_u{suffix}, raw_dt{suffix}, raw_z{suffix}. EVEN_TILES: every channel and step of
    every tile exists, so the loads need no masks (and no zero fills).

    tile: the tile's index, whose offsets and mask are emitted here (named apart by tag: a mask of
    None must not become a loop-carried value); None: the current tile's o_tt and m_dt."""
    o_tt, m = ("o_tt", "m_dt") if tile is None else (f"o_tt{suffix}{tag}", f"m_dt{suffix}{tag}")
    if tile is not None:
        lines.append(f"{indent}{o_tt} = ({tile}) * T + o_t")
        lines.append(f"{indent}{m} = None if EVEN_TILES else m_d[:, None] & ({o_tt} < seqlen)[None, :]")
    tensors = {"u": ("raw_u", "p_u", "s_u"), "dt": ("raw_dt", "p_delta", "s_dt"), "z": ("raw_z", "p_z", "s_z")}
    for raw, ptr, s in (tensors[name] for name in names):
        offsets = f"i_b * {s}_b + o_d[:, None] * {s}_d + {o_tt}[None, :] * {s}_l"
        load = f"{raw}{suffix} = tl.load({ptr} + {offsets}, mask={m}, other={_ZERO})"
        if raw == "raw_z":
            lines.append(f"{indent}if HAS_Z and not STATES_ONLY:")
            lines.append(f"{indent}    {load}")
        else:
            lines.append(f"{indent}{load}")


def _decay_rate(n, mask="m_d"):
    """Code for state n's A of this thread's channel(s), pre-scaled by log2(e): exp(ΔA) = exp2(Δ a_n)."""
    return f"_log2_rate(tl.load(p_A_d + {n} * s_A_n, mask={mask}, other=0.0).to(tl.float32), A_LOG)"


def _program_ids(lines, indent, T):
    """Emit the ids of a (batch, channel block, segment) program, its channels o_d and mask m_d, and
    o_t, the steps of a T-step tile."""
    lines.append(f"{indent}T: tl.constexpr = {T}")
    lines.append(f"{indent}i_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x d_inner x seqlen > 2^31")
    lines.append(f"{indent}i_d = tl.program_id(1)")
    lines.append(f"{indent}i_s = tl.program_id(2)")
    lines.append(f"{indent}o_d = i_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)")
    lines.append(f"{indent}m_d = o_d < d_inner")
    lines.append(f"{indent}o_t = tl.arange(0, {T})")


def _fwd_source(N, T):
    """Source of the forward kernel for d_state = N and T time steps per tile (T a power of two >= 2)."""
    ns = range(N)
    L = []
    L.extend(_FWD_SIGNATURE.splitlines())
    I = "    "
    _program_ids(L, I, T)
    L.append(f"{I}p_A_d = p_A + o_d * s_A_d")
    for n in ns:  # A pre-scaled by log2(e): exp(ΔA) = exp2(Δ A log2 e)
        L.append(f"{I}a_{n} = {_decay_rate(n)}")
    L.append(f"{I}if USE_INITIAL_STATE:")
    L.append(f"{I}    p_h0_d = p_h0 + i_b * s_h0_b + o_d * s_h0_d + i_s * s_h0_s")
    for n in ns:
        L.append(f"{I}    h_{n} = tl.load(p_h0_d + {n}, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}else:")
    for n in ns:
        L.append(f"{I}    h_{n} = tl.zeros([BLOCK_D], dtype=tl.float32)")
    L.append(f"{I}if HAS_D:")
    L.append(f"{I}    b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}if HAS_DELTA_BIAS:")
    L.append(f"{I}    b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}b_dtsum = tl.zeros([BLOCK_D], dtype=tl.float32)")
    L.append(f"{I}p_B_b = p_B + i_b * s_B_b")
    L.append(f"{I}p_C_b = p_C + i_b * s_C_b")
    L.append(f"{I}n_tiles = tl.cdiv(seqlen, {T})")
    L.append(f"{I}c_start = i_s * chunks_per_seg")
    L.append(f"{I}c_end = tl.minimum(c_start + chunks_per_seg, n_tiles)")
    L.append(f"{I}if PREFETCH:")
    _load_tiles(L, I * 2, "_n", tile="tl.minimum(c_start, n_tiles - 1)", tag="_first")
    L.append(f"{I}for i_c in range(c_start, c_end):")
    J = I * 2
    L.append(f"{J}o_tt = i_c * {T} + o_t")
    L.append(f"{J}m_dt = None if EVEN_TILES else m_d[:, None] & (o_tt < seqlen)[None, :]")
    L.append(f"{J}if PREFETCH:  # this tile's u, Δ, z arrived during the last tile; ask for the next one's")
    L.append(f"{J}    raw_u, raw_dt = raw_u_n, raw_dt_n")
    L.append(f"{J}    if HAS_Z and not STATES_ONLY:")
    L.append(f"{J}        raw_z = raw_z_n")
    _load_tiles(L, J + I, "_n", tile="tl.minimum(i_c + 1, n_tiles - 1)")
    L.append(f"{J}else:")
    _load_tiles(L, J + I, "", names=("u", "dt"))  # z when the outputs need it, as before PREFETCH
    L.append(f"{J}if SAVE_CHUNK_STATES:")
    L.append(f"{J}    if i_c % CKPT_EVERY == 0:")
    L.append(f"{J}        p_hc_d = p_hc + (i_b * d_inner + o_d) * (n_ckpt * {N}) + (i_c // CKPT_EVERY) * {N}")
    for n in ns:
        L.append(f"{J}        tl.store(p_hc_d + {n}, h_{n}, mask=m_d)")
    L.append(f"{J}b_u = raw_u.to(tl.float32)")
    L.append(f"{J}b_dt = raw_dt.to(tl.float32)")
    L.append(f"{J}if HAS_DELTA_BIAS:")
    L.append(f"{J}    b_dt = b_dt + b_db[:, None]")
    L.append(f"{J}if DELTA_SOFTPLUS:")
    L.append(f"{J}    b_dt = _softplus(b_dt, FAST_MATH)")
    L.append(f"{J}# Steps past the end get Δ = 0: exp(0 A) = 1 and Δ u B = 0 leave h unchanged.")
    L.append(f"{J}if not EVEN_TILES:")
    L.append(f"{J}    b_dt = tl.where(m_dt, b_dt, 0.0)")
    L.append(f"{J}b_dtsum += tl.sum(b_dt, axis=1)")
    L.append(f"{J}b_dtu = b_dt * b_u")
    _unpack("b_dt", [f"dt_{t}" for t in range(T)], L, J, "sdt")
    _unpack("b_dtu", [f"dtu_{t}" for t in range(T)], L, J, "sdtu")
    L.append(f"{J}if BC_TIME_VECTORS:")
    _tile_by_state(L, J + I, T, N)
    L.append(f"{J}else:")
    for t in range(T):
        K = J + I
        # Clamp the step index: B, C past the end are never used (Δ = 0 there) but must be in bounds.
        L.append(f"{K}i_t = tl.minimum(i_c * {T} + {t}, seqlen - 1)")
        _reset_state(L, K, t, T, [f"h_{n}" for n in ns])
        L.append(f"{K}if BC_PAIRS:")
        _step(L, K + I, t, N, pairs=True)
        L.append(f"{K}else:")
        _step(L, K + I, t, N, pairs=False)
    L.append(f"{J}if not STATES_ONLY:")
    K = J + I
    b_y = _pack([f"y_{t}" for t in range(T)], L, K, "py")
    L.append(f"{K}b_y = {b_y}")
    L.append(f"{K}if HAS_D:")
    L.append(f"{K}    b_y += b_u * b_D[:, None]")
    L.append(f"{K}if HAS_Z:")
    L.append(f"{K}    if not PREFETCH:  # loaded here: loaded with u and Δ it cost the step-by-step fp32 path 25%")
    _load_tiles(L, K + I * 2, "", names=("z",))
    L.append(f"{K}    b_y = b_y * _silu(raw_z.to(tl.float32), FAST_MATH)")
    L.append(f"{K}p_od = p_out + i_b * s_o_b + o_d[:, None] * s_o_d + o_tt[None, :] * s_o_l")
    L.append(f"{K}tl.store(p_od, b_y.to(p_out.dtype.element_ty), mask=m_dt)")
    L.append(f"{I}p_hT_d = p_hT + i_b * s_hT_b + o_d * s_hT_d + i_s * s_hT_s")
    for n in ns:
        L.append(f"{I}tl.store(p_hT_d + {n}, h_{n}, mask=m_d)")
    L.append(f"{I}if STATES_ONLY:")
    L.append(f"{I}    tl.store(p_dtsum + (i_b * d_inner + o_d) * tl.num_programs(2) + i_s, b_dtsum, mask=m_d)")
    return _HEADER + "\n".join(L) + "\n"


def _fwd_source_lanes(N, T, G):
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
    L.append(f"{I}# B, C come tile by tile (BC_TIME_VECTORS, BC_TILED); PREFETCH, EXP2_FMA: one-lane knobs.")
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
    L.append(f"{I}p_A_d = p_A + o_d * s_A_d + o_n * s_A_n")
    for k in ks:
        L.append(f"{I}a_{k} = {_decay_rate(k)}")
    L.append(f"{I}if USE_INITIAL_STATE:")
    L.append(f"{I}    p_h0_d = p_h0 + i_b * s_h0_b + o_d * s_h0_d + i_s * s_h0_s + o_n")
    for k in ks:
        L.append(f"{I}    h_{k} = tl.load(p_h0_d + {k}, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}else:")
    for k in ks:
        L.append(f"{I}    h_{k} = tl.zeros([R], dtype=tl.float32)")
    L.append(f"{I}if HAS_D:")
    L.append(f"{I}    b_D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}if HAS_DELTA_BIAS:")
    L.append(f"{I}    b_db = tl.load(p_delta_bias + o_d, mask=m_d, other=0.0).to(tl.float32)")
    L.append(f"{I}b_dtsum = tl.zeros([R], dtype=tl.float32)")
    L.append(f"{I}p_B_b = p_B + i_b * s_B_b")
    L.append(f"{I}s_row: tl.constexpr = {T // 2} if BC_PAIRS else {T}  # (batch, tile, B | C, state, step) rows")
    L.append(f"{I}o_w, m_w1 = tl.arange(0, s_row)[None, :], None")
    L.append(f"{I}n_tiles = tl.cdiv(seqlen, {T})")
    L.append(f"{I}c_start = i_s * chunks_per_seg")
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
    for k in ks:
        L.append(f"{J}        tl.store(p_hc_d + {k}, h_{k}, mask=m_d)")
    row = "i_b * s_{0}_b + o_d[:, None] * s_{0}_d"
    L.append(f"{J}raw_u = tl.load(p_u + {row.format('u')} + o_tt[None, :] * s_u_l, mask=m_dt, other={_ZERO})")
    L.append(f"{J}raw_dt = tl.load(p_delta + {row.format('dt')} + o_ts * s_dt_l, mask=m_ds, other={_ZERO})")
    L.append(f"{J}b_dt = raw_dt.to(tl.float32)  # (R, S): this lane's steps")
    L.append(f"{J}if HAS_DELTA_BIAS:")
    L.append(f"{J}    b_dt = b_dt + b_db[:, None]")
    L.append(f"{J}if DELTA_SOFTPLUS:")
    L.append(f"{J}    b_dt = _softplus(b_dt, FAST_MATH)")
    L.append(f"{J}# Steps past the end get Δ = 0: exp(0 A) = 1 and Δ u B = 0 leave h unchanged.")
    L.append(f"{J}if not EVEN_TILES:")
    L.append(f"{J}    b_dt = tl.where(m_ds, b_dt, 0.0)")
    if S == 1:
        L.append(f"{J}dto_0 = tl.reshape(b_dt, [R])")
    else:
        _unpack("b_dt", [f"dto_{s}" for s in range(S)], L, J, "sdt", rows="R")
    for t in range(T):  # Δ of step t from lane t // S of the channel
        L.append(f"{J}dt_{t} = tl.gather(dto_{t % S}, src_{t // S}, 0)")
    L.append(f"{J}if STATES_ONLY:")
    L.append(f"{J}    b_dtsum += " + " + ".join(f"dt_{t}" for t in range(T)))
    _unpack("raw_u.to(tl.float32)", [f"u_{t}" for t in range(T)], L, J, "su", rows="R")
    for t in range(T):
        L.append(f"{J}dtu_{t} = dt_{t} * u_{t}")
    for t in range(T):
        L.append(f"{J}i_t = tl.minimum(i_c * {T} + {t}, seqlen - 1)")
        _reset_state(L, J, t, T, [f"keep_{t}"], init=True)
    L.append(f"{J}p_bt = p_B_b + i_c * {2 * N} * s_row + o_n[:, None] * s_row  # (R, 1): the lane's first row")
    at = dict(steps_at="o_w", other="None", rows="R")  # whole tiles of the copy: no masks
    for k in ks:
        _time_vector(L, J, f"p_bt + {k} * s_row", "bt", T, **at)
        L.append(f"{J}if not STATES_ONLY:")
        _time_vector(L, J + I, f"p_bt + {N + k} * s_row", "ct", T, **at)
        for t in range(T):
            L.append(f"{J}if HAS_SEQ_IDX:")
            L.append(f"{J}    h_{k} = h_{k} * keep_{t}")
            L.append(f"{J}h_{k} = {_decay(f'dt_{t} * a_{k}', k)} * h_{k} + dtu_{t} * bt_{t}")
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
        L.append(f"{K2}b_y = {_pack(vals, L, K2, 'py', rows='R')}  # (R, S): y of this lane's steps")
    L.append(f"{K2}if HAS_D:")
    L.append(f"{K2}    b_uo = tl.load(p_u + {row.format('u')} + o_ts * s_u_l, mask=m_ds, other={_ZERO})")
    L.append(f"{K2}    b_y += b_uo.to(tl.float32) * b_D[:, None]")
    L.append(f"{K2}if HAS_Z:")
    L.append(f"{K2}    b_z = tl.load(p_z + {row.format('z')} + o_ts * s_z_l, mask=m_ds, other={_ZERO})")
    L.append(f"{K2}    b_y = b_y * _silu(b_z.to(tl.float32), FAST_MATH)")
    L.append(f"{K2}p_od = p_out + {row.format('o')} + o_ts * s_o_l")
    L.append(f"{K2}tl.store(p_od, b_y.to(p_out.dtype.element_ty), mask=m_ds)")
    L.append(f"{I}p_hT_d = p_hT + i_b * s_hT_b + o_d * s_hT_d + i_s * s_hT_s + o_n")
    for k in ks:
        L.append(f"{I}tl.store(p_hT_d + {k}, h_{k}, mask=m_d)")
    L.append(f"{I}if STATES_ONLY:")
    L.append(f"{I}    p_ds = p_dtsum + (i_b * d_inner + o_d) * tl.num_programs(2) + i_s")
    L.append(f"{I}    tl.store(p_ds, b_dtsum, mask=m_d & (o_g == 0))")
    return _HEADER + "\n".join(L) + "\n"


def _generated_kernel(src, stem, name):
    """The kernel `name` defined in the generated source `src`, written to a cache file (named from
    `stem` and the source's hash) so that Triton can read its source."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    default = os.path.join(os.path.expanduser("~"), ".cache", "hf_mamba", "generated")
    folder = os.environ.get("HF_MAMBA_KERNEL_CACHE", default)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stem}_{digest}.py")
    if not os.path.exists(path):
        tmp_path = f"{path}.{os.getpid()}.tmp"
        with open(tmp_path, "w") as f:
            f.write(src)
        os.replace(tmp_path, path)  # atomic, so concurrent processes never read half a file
    spec = importlib.util.spec_from_file_location(f"hf_mamba_generated_{stem}_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


@functools.cache
def _fwd_kernel(N, T, G=1):
    """The generated forward kernel for (d_state, T, lanes per channel)."""
    src = _fwd_source(N, T) if G == 1 else _fwd_source_lanes(N, T, G)
    return _generated_kernel(src, f"scan_fwd_N{N}_T{T}_G{G}", "scan_fwd_kernel")


@triton.jit
def _chain_combine(a1, b1, a2, b2):
    # The maps h -> a1 h + b1, then h -> a2 h + b2, as one: h -> a1 a2 h + (a2 b1 + b2).
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _chain_rows(b_a, b_b, b_carry, BLOCK_S: tl.constexpr):
    # Rows j of [BLOCK_S, elements] tiles: h_j = a_j h_{j-1} + b_j from h_{-1} = carry, by a scan of
    # the maps; returns every h_j and the last one (rows past the end, a = 1 and b = 0, keep it).
    b_P, b_Q = tl.associative_scan((b_a, b_b), 0, _chain_combine)
    b_h = b_P * b_carry[None, :] + b_Q
    last = (tl.arange(0, BLOCK_S) == BLOCK_S - 1)[:, None]
    return b_h, tl.sum(tl.where(last, b_h, 0.0), axis=0)


@triton.jit
def _chain_segments_kernel(
    p_hend, p_dtsum, p_A, p_h0, p_hin, d_inner, d_state, n_seg,
    USE_INITIAL_STATE: tl.constexpr, A_LOG: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # h_in[s + 1] = exp(A ΣΔ_s) h_in[s] + h_end[s]: the state entering every segment; h_end and ΣΔ
    # (batch, d_inner, n_seg - 1) of segments 0 .. n_seg - 2. Each program takes BLOCK_E elements
    # (channel, state) and BLOCK_S segments at a time, loaded together and chained by a scan: one
    # segment per loop step waited on its loads' latency (57 us of the forward at 64 segments).
    i_b = tl.program_id(0).to(tl.int64)
    o_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # channel * d_state + state
    m_e = o_e < d_inner * d_state
    o_d = o_e // d_state
    b_A = tl.load(p_A + o_e, mask=m_e, other=0.0).to(tl.float32)
    if A_LOG:
        b_A = -tl.exp(b_A)
    if USE_INITIAL_STATE:
        b_h = tl.load(p_h0 + i_b * d_inner * d_state + o_e, mask=m_e, other=0.0)
    else:
        b_h = tl.zeros([BLOCK_E], dtype=tl.float32)
    p_seg = (i_b * d_inner + o_d) * (n_seg * d_state) + o_e % d_state  # (batch, d_inner, n_seg, d_state)
    tl.store(p_hin + p_seg, b_h, mask=m_e)
    o_s = tl.arange(0, BLOCK_S)
    for s_first in range(0, n_seg - 1, BLOCK_S):  # pass 1 ran every segment but the last
        o_ss = s_first + o_s
        m_se = (o_ss < n_seg - 1)[:, None] & m_e[None, :]
        b_dts = tl.load(p_dtsum + ((i_b * d_inner + o_d) * (n_seg - 1))[None, :] + o_ss[:, None], mask=m_se, other=0.0)
        b_hend = tl.load(p_hend + p_seg[None, :] + o_ss[:, None] * d_state, mask=m_se, other=0.0)
        # Past the last segment ΣΔ = 0 and h_end = 0: decay 1, nothing added.
        b_hs, b_h = _chain_rows(tl.exp(b_dts * b_A[None, :]), b_hend, b_h, BLOCK_S)  # h_in[s + 1]
        tl.store(p_hin + p_seg[None, :] + (o_ss[:, None] + 1) * d_state, b_hs, mask=m_se)


def _lanes_per_channel(batch, d_inner, d_state, T, time_rows, device):
    """(lanes, spread): the lanes (threads) sharing one channel's state, a power of two dividing
    d_state and T, and whether they were chosen to fill the GPU.

    At least enough that each lane holds at most STATES_PER_LANE states (registers) where it can;
    SPREAD_LANES where that alone gives the launch SPREAD_WARPS_PER_SM one-warp programs per
    multiprocessor (time-contiguous u, Δ, z: the layout it was measured in), spread then, so that
    the sequence needs no segments; LANES (a sweep knob) overrides the spread, and is not one."""
    def fits(lanes):
        return d_state % lanes == 0 and T % lanes == 0

    lanes = 1
    while d_state // lanes > STATES_PER_LANE and fits(2 * lanes):
        lanes *= 2
    spread = LANES if LANES is not None else SPREAD_LANES
    fills = batch * cdiv(d_inner, 32 // spread) >= SPREAD_WARPS_PER_SM * sm_count(device)
    if spread > lanes and fits(spread) and (LANES is not None or (time_rows and fills)):
        return spread, LANES is None
    return lanes, False


def _bf16_pairs(t, axis=1):
    """Whether t (batch, d_state, seqlen) can be read as 32-bit words of two bf16 values along `axis`
    (1: states, `_state_row`; 2: steps, `_time_vector`): unit stride there, an even length, and
    every row starting on a 4-byte boundary."""
    if t.dtype != torch.bfloat16 or t.stride(axis) != 1 or t.shape[axis] % 2 or t.data_ptr() % 4:
        return False
    others = [(size, stride) for i, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)) if i != axis]
    return all(size == 1 or stride % 2 == 0 for size, stride in others)


@triton.jit
def _tile_copy_kernel(
    p_B, p_C, p_BC, seqlen, n_tiles, s_B_b, s_B_n, s_B_l, s_C_b, s_C_n, s_C_l,
    D_STATE: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr, TILES: tl.constexpr,
):
    # B, C (batch, d_state, seqlen) -> BC (batch, n_tiles, 2, d_state, T), zeros past the end;
    # TILES tiles per program, both tensors in one launch.
    i_b = tl.program_id(0).to(tl.int64)
    o_c = tl.program_id(1) * TILES + tl.arange(0, TILES)
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
        D_STATE=d_state, BLOCK_N=next_power_of_2(d_state), T=T, TILES=tiles,
    )
    return BC


def _bc_reads(B, C, lanes, T):
    """How the kernel reads B and C: (B, C as passed, their (batch, state, step) strides, BC_PAIRS,
    BC_TIME_VECTORS, BC_TILED).

    Several lanes per channel, or unit time stride (the benchmark's layout) with BC_TIME_VECTORS:
    one vector of a tile's steps per state, from a tile-by-tile copy (`_tiled`, with BC_TILE_COPY;
    the lanes kernel always copies), so that the kernel finds every state's row at a fixed offset
    from one pointer per tile; bf16 as words of two steps, through an int32 view so that the
    kernel's strides count words. Without the copy the one-lane kernel reads the rows as passed.
    Otherwise step by step, bf16 with unit state stride (the model's x_proj layout) as words of two
    states (`_state_row`)."""
    time_rows = B.stride(2) == 1 and C.stride(2) == 1
    if lanes != 1 or (BC_TIME_VECTORS and time_rows and BC_TILE_COPY and B.dtype == C.dtype):
        BC = _tiled(B, C, T)
        if BC_PAIRS and BC.dtype == torch.bfloat16:
            BC = BC.view(torch.int32)
        strides = (BC.stride(0), 0, 0)
        return BC, BC, strides, strides, BC.dtype == torch.int32, True, True
    if BC_TIME_VECTORS and time_rows:
        pairs = BC_PAIRS and _bf16_pairs(B, axis=2) and _bf16_pairs(C, axis=2)
        if pairs:
            B, C = B.view(torch.int32), C.view(torch.int32)
        return B, C, B.stride(), C.stride(), pairs, True, False
    return B, C, B.stride(), C.stride(), BC_PAIRS and _bf16_pairs(B) and _bf16_pairs(C), False, False


def _segment_count(programs, warps_per_sm, device, n_tiles, min_tiles, max_segments):
    """Segments (a power of two, at most max_segments) to cut the sequence into: doubled while the
    launch has fewer one-warp programs than warps_per_sm per multiprocessor and each segment keeps
    at least min_tiles tiles."""
    n_seg = 1
    while (
        programs * n_seg < warps_per_sm * sm_count(device)
        and n_tiles // (n_seg * 2) >= min_tiles
        and n_seg * 2 <= max_segments
    ):
        n_seg *= 2
    return n_seg


def scan_fwd_seq(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, ckpt_len, seq_idx=None,
    need_final_state=True, A_is_log=False,
):
    """Forward scan; fills `chunk_states` (batch, d_inner, n_ckpt, d_state) every `ckpt_len` steps if non-empty.

    Returns (out, final_state); final_state may be None without need_final_state (it saves a copy).
    With A_is_log, A holds A_log (A = -exp(A_log), computed in the kernels).
    """
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    T = TILE_STEPS or max(2, 16 // u.element_size())  # by default one 16-byte vector of steps per thread
    num_warps = 1
    time_rows = all(t is None or t.stride(2) == 1 or seqlen == 1 for t in (u, delta, z))
    lanes, spread = _lanes_per_channel(batch, d_inner, d_state, T, time_rows, u.device)
    channels_per_thread, warps_per_sm, prefetch, maxnreg = _config()
    if spread and WARPS_PER_SM is None:
        warps_per_sm = SPREAD_WARPS_PER_SM  # the spread fills the GPU: no segments
    if BC_LAYOUT == "time rows":
        B, C = (t if t.stride(2) == 1 or seqlen == 1 else t.contiguous() for t in (B, C))
    B, C, B_strides, C_strides, bc_pairs, bc_time_vectors, bc_tiled = _bc_reads(B, C, lanes, T)
    # Channels per program: of a launch that only scans states (the first pass of a segmented
    # forward), and of one that writes outputs (holding their tiles too: registers, occupancy).
    block_states = 32 * num_warps // lanes * (channels_per_thread if lanes == 1 else 1)
    block_out = 32 * num_warps // lanes * (_pass2_channels(channels_per_thread, bc_pairs or bc_time_vectors)
                                            if lanes == 1 else 1)
    n_tiles = cdiv(seqlen, T)
    save = chunk_states.numel() > 0
    assert not save or ckpt_len % T == 0
    ckpt_every = max(1, ckpt_len // T)
    n_ckpt = chunk_states.shape[2] if save else 1
    out = torch.empty_like(u)  # (batch, d_inner, seqlen), in u's layout (channels-last in the model)
    kernel = _fwd_kernel(d_state, T, lanes)
    # Segments: one warp per 32 channels is latency-bound (each step waits on its B_t, C_t loads and
    # exp2), so it needs several warps per scheduler; with fewer programs than WARPS_PER_SM per
    # multiprocessor, cut the sequence (measured on H100: 1 warp per SM ran ~7x slower per step).
    programs = batch * cdiv(d_inner, block_out)
    max_segments = 1 if seq_idx is not None else n_tiles  # segments chain by ΣΔ, blind to document resets
    n_seg = _segment_count(programs, warps_per_sm, u.device, n_tiles, MIN_TILES_PER_SEG, max_segments)
    chunks_per_seg = cdiv(n_tiles, n_seg)
    A_c = A.contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    z_ = z if z is not None else u
    common = (
        *u.stride(), *delta.stride(), *A_c.stride(), *B_strides, *C_strides, *z_.stride(), *out.stride(),
    )
    si = seq_idx_args(seq_idx)
    flags = dict(
        HAS_SEQ_IDX=seq_idx is not None,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=delta_softplus, CKPT_EVERY=ckpt_every, num_warps=num_warps,
        BC_PAIRS=bc_pairs, BC_TIME_VECTORS=bc_time_vectors, BC_TILED=bc_tiled, FAST_MATH=FAST_MATH and u.is_cuda,
        PREFETCH=prefetch, A_LOG=A_is_log,
    )

    def run_pass(block, segments, h0, h0_strides, h_out, dtsum, maxnreg=maxnreg, exp2_fma=EXP2_FMA, **pass_flags):
        """One launch of the generated kernel over (batch, channel blocks of `block`, segments)."""
        launch(
            kernel, (batch, cdiv(d_inner, block), segments),
            u, delta, A_c, B, C, D, z, delta_bias, h0, out, h_out, dtsum, chunk_states,
            seqlen, d_inner, n_ckpt, chunks_per_seg, *common, *h0_strides, *h0_strides, *si,
            BLOCK_D=block, EVEN_TILES=seqlen % T == 0 and d_inner % block == 0, EXP2_FMA=exp2_fma,
            **pass_flags, **flags,
            **({"maxnreg": maxnreg} if maxnreg and u.is_cuda else {}),
        )

    if n_seg == 1:
        final_state = u.new_empty(batch, d_inner, d_state, dtype=torch.float32)
        run_pass(
            block_out, 1, initial_state, (d_inner * d_state, d_state, 0), final_state, None,
            USE_INITIAL_STATE=initial_state is not None, STATES_ONLY=False, SAVE_CHUNK_STATES=save,
        )
        return out, final_state
    seg_strides = (d_inner * n_seg * d_state, n_seg * d_state, d_state)
    h_end = u.new_empty(batch, d_inner, n_seg, d_state, dtype=torch.float32)
    dtsum = u.new_empty(batch, d_inner, n_seg - 1, dtype=torch.float32)
    # Pass 1 skips the last segment: no later segment needs its end state, and pass 2 computes it.
    run_pass(
        block_states, n_seg - 1, None, seg_strides, h_end, dtsum,
        maxnreg=maxnreg if PASS1_MAXNREG is None else PASS1_MAXNREG, exp2_fma=EXP2_FMA_PASS1,
        USE_INITIAL_STATE=False, STATES_ONLY=True, SAVE_CHUNK_STATES=False,
    )
    h_in = torch.empty_like(h_end)
    launch(
        _chain_segments_kernel, (batch, cdiv(d_inner * d_state, CHAIN_BLOCK_E)),
        h_end, dtsum, A_c, initial_state, h_in, d_inner, d_state, n_seg,
        USE_INITIAL_STATE=initial_state is not None, A_LOG=A_is_log, BLOCK_E=CHAIN_BLOCK_E,
        BLOCK_S=min(CHAIN_BLOCK_S, next_power_of_2(n_seg - 1)), num_warps=1,
    )
    run_pass(
        block_out, n_seg, h_in, seg_strides, h_end, None,
        USE_INITIAL_STATE=True, STATES_ONLY=False, SAVE_CHUNK_STATES=save,
    )
    return out, h_end[:, :, -1].contiguous() if need_final_state else None


__all__ = ["scan_fwd_seq"]
