"""x @ weight.T (+ bias) for a few rows of x in one Triton launch: a decode step's in_proj and out_proj.

Why: a decode step at a small batch reads every weight once for a handful of rows, so its time is the
weights' bytes over the memory bandwidth reached, plus the launches inside the step's CUDA graph. cuBLAS's
GEMM for one row of out_proj at the 7B shape is a split-K kernel and its reduction (two launches); here it is
one. Per call (do_bench, H100 80GB HBM3, bf16) this kernel and F.linear are within 5% of each other at the
1.4B and 7B shapes and batches 1 to 16; in the decode step it gained 0.5-2.5% tokens/s there
(`hf_mamba.block.FEW_ROWS_LINEAR_MIN_WEIGHT` keeps smaller weights on cuBLAS).

A program computes BLOCK_N outputs for all rows (up to BLOCK_M = 16, tl.dot's least size) and streams its rows
of the weight once. BLOCK_N shrinks to 16 until the launch has two programs per multiprocessor, so that every
multiprocessor keeps loads in flight; each load takes `tile_bytes` of the weight, `num_stages` of them in
flight per program (`FewRowsTuning`). By default no split over K: each output is one program's sum; with
`split_k` the parts are added up in their order, so either way the sum's order is fixed.

The products run on tensor cores from the 16-bit weight and x in the weight's dtype, summed in fp32 and
rounded once to the output dtype, as cuBLAS's 16-bit GEMMs compute them (up to summation order).
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import cdiv, device_guard, launch, next_power_of_2, sm_count
from .checks import check_tensors

MAX_ROWS = 16  # rows per call: one BLOCK_M of tl.dot


@dataclass(frozen=True)
class FewRowsTuning:
    """Launch choices of few_rows_linear (scripts/dev/few_rows_sweep.py times others)."""

    min_block_n: int = 16
    max_block_n: int = 64
    programs_per_sm: int = 2
    tile_bytes: int = 8192  # of the weight per load: BLOCK_K = tile_bytes / (BLOCK_N x its element size)
    num_stages: int = 4  # loads of the weight in flight per program
    num_warps: int = 4
    one_row_fma: bool = False  # a single row's products on CUDA cores (no tl.dot), summed once at the end
    split_k: int = 1  # programs per block of outputs, each over a part of K (the last adds the parts up)


DEFAULT_TUNING = FewRowsTuning()


@triton.jit
def _few_rows_linear_kernel(
    p_x, p_w, p_bias, p_out, p_part, p_count,
    M, N, K, K_PER,
    s_x_m, s_x_k, s_w_n, s_w_k, s_o_m, s_o_n,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr, NUM_STAGES: tl.constexpr, SPLIT_K: tl.constexpr,
):
    i_n, i_k = tl.program_id(0), tl.program_id(1)
    k_start = i_k * K_PER  # this program's part of K (all of it without a split)
    k_end = tl.minimum(K, k_start + K_PER)
    o_m = tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = k_start + tl.arange(0, BLOCK_K)
    m_m, m_n = o_m < M, o_n < N
    p_x_k = p_x + o_m[:, None] * s_x_m + o_k[None, :] * s_x_k  # (BLOCK_M, BLOCK_K)
    p_w_k = p_w + o_n[None, :] * s_w_n + o_k[:, None] * s_w_k  # (BLOCK_K, BLOCK_N): the weight's rows, transposed
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            b_x = tl.load(p_x_k, mask=m_m[:, None], other=0.0)
            b_w = tl.load(p_w_k, mask=m_n[None, :], other=0.0)
        else:
            m_k = k - k_start + o_k < k_end
            b_x = tl.load(p_x_k, mask=m_m[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(p_w_k, mask=m_k[:, None] & m_n[None, :], other=0.0)
        if FP32_DOT:  # the interpreter multiplies 16-bit blocks as their raw bits
            acc = tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(b_x.to(b_w.dtype), b_w, acc)
        p_x_k += BLOCK_K * s_x_k
        p_w_k += BLOCK_K * s_w_k
    if SPLIT_K > 1:
        # Each part's sums go to p_part; the last program of this block of outputs to arrive (a counter,
        # reset by that program for the next call) adds the parts up in their order, so the result does not
        # depend on which program came last.
        o_part = o_m[:, None] * N + o_n[None, :]
        m_part = m_m[:, None] & m_n[None, :]
        tl.store(p_part + i_k * BLOCK_M * N + o_part, acc, mask=m_part)
        tl.debug_barrier()  # every thread's part stored before the counter moves
        last = tl.atomic_add(p_count + i_n, 1) == SPLIT_K - 1
        if last:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for part in tl.static_range(SPLIT_K):  # read past L1, which may hold an earlier call's parts
                acc += tl.load(p_part + part * BLOCK_M * N + o_part, mask=m_part, other=0.0, cache_modifier=".cg")
            tl.store(p_count + i_n, 0)
        m_n = o_n < tl.where(last, N, 0)  # only the last program stores
    if HAS_BIAS:
        acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    tl.store(p_out + o_m[:, None] * s_o_m + o_n[None, :] * s_o_n, acc.to(p_out.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _one_row_linear_kernel(
    p_x, p_w, p_bias, p_out,
    N, K,
    s_x_k, s_w_n, s_w_k, s_o_n,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_n = o_n < N
    p_x_k = p_x + o_k * s_x_k
    p_w_k = p_w + o_n[:, None] * s_w_n + o_k[None, :] * s_w_k  # (BLOCK_N, BLOCK_K): the weight's rows
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        if EVEN_K:
            b_x = tl.load(p_x_k)
            b_w = tl.load(p_w_k, mask=m_n[:, None], other=0.0)
        else:
            m_k = k + o_k < K
            b_x = tl.load(p_x_k, mask=m_k, other=0.0)
            b_w = tl.load(p_w_k, mask=m_n[:, None] & m_k[None, :], other=0.0)
        acc += b_w.to(tl.float32) * b_x.to(tl.float32)[None, :]
        p_x_k += BLOCK_K * s_x_k
        p_w_k += BLOCK_K * s_w_k
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)
    tl.store(p_out + o_n * s_o_n, out.to(p_out.dtype.element_ty), mask=m_n)


_counters = {}  # device -> int32 zeros: the split programs' arrival counters, each left at 0 after a call


def _split_counters(device, n):
    """At least n arrival counters on device, zero. Allocated outside CUDA graph capture only: a buffer first
    made inside a capture would hold zeros only once that graph had run."""
    if device.type == "cuda" and device.index is None:  # one key per GPU, however the caller names it
        device = torch.device("cuda", torch.cuda.current_device())
    counters = _counters.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("few_rows_linear with split_k > 1 needs a call outside CUDA graph capture first, "
                               "to allocate its counters")
        counters = _counters[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return counters


def block_n(n_out, device, tuning=None):
    """Outputs per program: the largest power of two from max_block_n down to min_block_n that still gives
    programs_per_sm programs per multiprocessor."""
    tuning = tuning or DEFAULT_TUNING
    size = tuning.max_block_n
    while size > tuning.min_block_n and cdiv(n_out, size) < tuning.programs_per_sm * sm_count(device):
        size //= 2
    return size


def few_rows_linear(x, weight, bias=None, tuning=None):
    """x @ weight.T + bias for x of at most MAX_ROWS rows, as torch.nn.functional.linear computes it.

    Args:
        x: (..., in_features) with at most MAX_ROWS rows in all, of the weight's dtype.
        weight: (out_features, in_features), 16-bit (bf16 or fp16).
        bias: (out_features,) or None.
        tuning: launch choices (FewRowsTuning); None for the module's DEFAULT_TUNING as it is at the call.

    Returns:
        (..., out_features) in the weight's dtype.
    """
    check_tensors(x=x, weight=weight, bias=bias)
    if weight.dim() != 2 or weight.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"weight must be a 2-d bf16 or fp16 tensor, got shape {tuple(weight.shape)}, {weight.dtype}")
    n_out, n_in = weight.shape
    if x.shape[-1:] != (n_in,) or x.dtype != weight.dtype:
        raise ValueError(f"x must have shape (..., {n_in}) and dtype {weight.dtype}, got {tuple(x.shape)}, {x.dtype}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {tuple(bias.shape)}")
    rows = x.reshape(-1, n_in)
    if rows.shape[0] > MAX_ROWS:
        raise ValueError(f"x must have at most {MAX_ROWS} rows, got {rows.shape[0]}")
    out = torch.empty(rows.shape[0], n_out, dtype=weight.dtype, device=weight.device)
    tuning = tuning or DEFAULT_TUNING
    if rows.shape[0] and n_out:
        size = block_n(n_out, weight.device, tuning)
        block_k = min(tuning.tile_bytes // (size * weight.element_size()), max(16, next_power_of_2(n_in)))
        shared = dict(HAS_BIAS=bias is not None, BLOCK_N=size, BLOCK_K=block_k, EVEN_K=n_in % block_k == 0,
                      NUM_STAGES=tuning.num_stages, num_warps=tuning.num_warps)
        with device_guard(weight):
            if tuning.one_row_fma and rows.shape[0] == 1:
                launch(_one_row_linear_kernel, (cdiv(n_out, size),), rows, weight, bias, out, n_out, n_in,
                       rows.stride(1), *weight.stride(), out.stride(1), **shared)
            else:
                n_blocks, k_tiles = cdiv(n_out, size), cdiv(n_in, block_k)
                k_per = cdiv(k_tiles, max(1, tuning.split_k)) * block_k
                split = cdiv(n_in, k_per)
                part = count = None
                if split > 1:
                    part = torch.empty(split, MAX_ROWS, n_out, dtype=torch.float32, device=weight.device)
                    count = _split_counters(weight.device, n_blocks)
                launch(
                    _few_rows_linear_kernel, (n_blocks, split),
                    rows, weight, bias, out, part, count, rows.shape[0], n_out, n_in, k_per,
                    *rows.stride(), *weight.stride(), *out.stride(),
                    BLOCK_M=MAX_ROWS, FP32_DOT=os.environ.get("TRITON_INTERPRET") == "1", SPLIT_K=split, **shared,
                )
    return out.view(*x.shape[:-1], n_out)


__all__ = ["DEFAULT_TUNING", "MAX_ROWS", "FewRowsTuning", "few_rows_linear"]
