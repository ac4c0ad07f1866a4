"""The segment chain of a segmented recurrent backward: the adjoints leaving each segment, a linear
recurrence over the segments, x_{s-1} = P_s x_s + Q_s per (state, channel) element. Each one-warp program
takes block_e elements and block_s segments at a time, loaded together and chained by `tl.associative_scan`;
one segment per loop step waited on its loads' latency (docs/kernels.md, "Segments"). Also how many segments
a segmented scan cuts its sequence into (`segment_count`). The forward chains its segments inside its full
pass (`recurrent_fwd._fold_earlier_segments`).
"""

from dataclasses import dataclass

import triton
import triton.language as tl

from .._launch import cdiv, launch, next_power_of_2, sm_count
from ..triton_utils import linear_combine


@dataclass(frozen=True)
class ChainTuning:
    """block_e (state, channel) elements per one-warp program, block_s segments per loop step (measured on
    the forward's chain of the same shape, H200: 9.6 / 11.0 / 14.0 us at 8, 8 and 64 segments of the
    benchmark shapes, against 14.8 / 15.6 / 72.3 for one segment per step; with 4 warps the scan crossed
    warps, 14.7 / 17.8 / 18.0)."""

    block_e: int = 128
    block_s: int = 16


@triton.jit
def _chain_rows(b_a, b_b, b_carry, BLOCK_S: tl.constexpr):
    # Rows j of [BLOCK_S, elements] tiles: h_j = a_j h_{j-1} + b_j from h_{-1} = carry, by a scan of
    # the maps; returns every h_j and the last one (rows past the end, a = 1 and b = 0, keep it).
    b_P, b_Q = tl.associative_scan((b_a, b_b), 0, linear_combine)
    b_h = b_P * b_carry[None, :] + b_Q
    last = (tl.arange(0, BLOCK_S) == BLOCK_S - 1)[:, None]
    return b_h, tl.sum(tl.where(last, b_h, 0.0), axis=0)


@triton.jit
def _chain_adjoint_kernel(
    p_PQ, p_x, d_inner, d_state, n_seg, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # x[s - 1] = Q_s + P_s x[s], from the last segment (x holds dL/dh_T there) to the first.
    # x (batch, n_seg, d_state, d_inner), P and Q (batch, n_seg, 2, d_state, d_inner). BLOCK_E
    # elements (state, channel) per program, BLOCK_S segments per loop step (row j: segment
    # s_top - j), loaded together and chained by a scan.
    i_b = tl.program_id(0).to(tl.int64)
    o_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)  # state * d_inner + channel
    m_e = o_e < d_state * d_inner
    size = d_state * d_inner
    b_x = tl.load(p_x + (i_b * n_seg + n_seg - 1) * size + o_e, mask=m_e, other=0.0)
    o_j = tl.arange(0, BLOCK_S)
    for s_top in range(n_seg - 1, 0, -BLOCK_S):
        o_ss = s_top - o_j
        m_se = (o_ss >= 1)[:, None] & m_e[None, :]
        p_pq = p_PQ + ((i_b * n_seg + o_ss) * 2 * size)[:, None] + o_e[None, :]
        # Below the first segment: P = 1 and Q = 0.
        b_P = tl.load(p_pq, mask=m_se, other=1.0)
        b_Q = tl.load(p_pq + size, mask=m_se, other=0.0)
        b_xs, b_x = _chain_rows(b_P, b_Q, b_x, BLOCK_S)  # x[s - 1]
        tl.store(p_x + ((i_b * n_seg + o_ss - 1) * size)[:, None] + o_e[None, :], b_xs, mask=m_se)


def segment_count(programs, warps_per_sm, device, n_tiles, min_tiles, max_segments):
    """Segments (a power of two, at most max_segments) to cut a sequence of n_tiles tiles into: doubled
    while the launch has fewer one-warp programs than warps_per_sm per multiprocessor and each segment
    keeps at least min_tiles tiles."""
    n_seg = 1
    while (
        programs * n_seg < warps_per_sm * sm_count(device)
        and n_tiles // (n_seg * 2) >= min_tiles
        and n_seg * 2 <= max_segments
    ):
        n_seg *= 2
    return n_seg


def chain_adjoints(PQ, x, tuning=ChainTuning()):
    """Fill x[:, s - 1] = Q_s + P_s x[:, s] for s from the last segment down to 1; x (batch, n_seg,
    d_state, d_inner) holds dL/dh_T in its last segment, PQ (batch, n_seg, 2, d_state, d_inner)."""
    batch, n_seg, d_state, d_inner = x.shape
    launch(
        _chain_adjoint_kernel, (batch, cdiv(d_state * d_inner, tuning.block_e)),
        PQ, x, d_inner, d_state, n_seg, BLOCK_E=tuning.block_e,
        BLOCK_S=min(tuning.block_s, next_power_of_2(n_seg - 1)), num_warps=1,
    )


__all__ = ["ChainTuning", "chain_adjoints", "segment_count"]
