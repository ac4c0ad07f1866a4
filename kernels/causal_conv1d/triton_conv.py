"""Causal depthwise conv1d in Triton: forward and backward with the bias and SiLU fused in.

    out[t] = act(bias + sum_k weight[k] * x[t - (d_conv - 1) + k])      x: (batch, d_inner, seqlen)

One program per (batch, BLOCK_D channels, BLOCK_L steps). x may be time-contiguous or channels-last
(a view of the in_proj output); the d_conv taps are shifted loads of the same tile (cache hits). The
output may be channels-last too, so that the Linear after the conv reads it without a transposing
copy. The backward recomputes the pre-activation where it needs SiLU's derivative instead of storing
it, writes dx in x's layout, and writes the weight and bias gradients as per-program partial sums
that the host adds up (no atomics, deterministic).
With seq_idx, a tap that would read another document counts as zero, as in the PyTorch path.
With an initial state (a cache's window, inference), the taps before step 0 read it instead of zeros.
With a padding mask (batch, seqlen) (0 at padding, as the model's attention_mask), padded inputs count
as zero and padded outputs are zero: the model's x * mask before the conv and out * mask after it,
read in the kernels instead of two elementwise passes (and their gradients in the backward).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._launch import cdiv, device_guard, launch, seq_idx_args, wide_index
from ..triton_utils import time_index


@dataclass(frozen=True)
class ConvTuning:
    """block_d channels x block_l steps per program (4 warps)."""

    block_d: int = 16
    block_l: int = 128


DEFAULT_TUNING = ConvTuning()


@triton.jit
def _conv_at(p_row, s_x_l, p_w_d, b_bias, o_t, m_d, seqlen, p_si_b, s_si_l, b_si_t, p_pm_b, s_pm_l, p_init_row,
             s_init_l, HAS_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, HAS_PAD_MASK: tl.constexpr,
             HAS_INIT: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    # Pre-activation at steps o_t, (BLOCK_D, BLOCK_L) fp32. HAS_INIT: the K - 1 inputs before step 0 come from
    # the initial state's columns (p_init_row: this block's channels), not zeros.
    b_acc = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    for k in tl.static_range(K):
        o_src = o_t - (K - 1 - k)
        m_src = (o_src >= 0) & (o_src < seqlen)
        if HAS_SEQ_IDX:  # another document's input counts as zero
            b_si_src = tl.load(p_si_b + o_src * s_si_l, mask=m_src, other=-1)
            m_src = m_src & (b_si_src == b_si_t)
        if HAS_PAD_MASK:  # a padded input counts as zero
            m_src = m_src & _kept(p_pm_b, s_pm_l, o_src, m_src)
        b_x = tl.load(p_row + o_src[None, :] * s_x_l, mask=m_d[:, None] & m_src[None, :], other=0.0)
        b_x = b_x.to(tl.float32)
        if HAS_INIT:  # steps before 0: the initial state's column K - 1 + o_src
            m_init = (o_src < 0) & (o_src >= 1 - K)
            b_x += tl.load(p_init_row + (K - 1 + o_src)[None, :] * s_init_l, mask=m_d[:, None] & m_init[None, :],
                           other=0.0).to(tl.float32)
        b_w = tl.load(p_w_d + k, mask=m_d, other=0.0).to(tl.float32)
        b_acc += b_w[:, None] * b_x
    if HAS_BIAS:
        b_acc += b_bias[:, None]
    return b_acc


@triton.jit
def _kept(p_pm_b, s_pm_l, o_t, m_t):
    # Whether steps o_t are tokens (padding mask nonzero); False past the ends.
    return tl.load(p_pm_b + o_t * s_pm_l, mask=m_t, other=0) != 0


@triton.jit
def _row_inputs(p_si_b, p_bias, o_t, m_t, o_d, m_d, s_si_l, HAS_SEQ_IDX: tl.constexpr, HAS_BIAS: tl.constexpr):
    # The document ids at steps o_t (0 without seq_idx) and each channel's bias in fp32 (0.0 without).
    # Values only: a jit helper returning a None pointer does not compile for CUDA.
    b_si = 0
    if HAS_SEQ_IDX:
        b_si = tl.load(p_si_b + o_t * s_si_l, mask=m_t, other=0)
    b_bias = 0.0
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    return b_si, b_bias


@triton.jit
def _conv_fwd_kernel(
    p_x, p_w, p_bias, p_out, p_seq_idx, p_pad_mask, p_init, d_inner, seqlen, s_x_b, s_x_d, s_x_l, s_o_b, s_o_d, s_o_l,
    s_si_b, s_si_l, s_pm_b, s_pm_l, s_init_b, s_init_d, s_init_l,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, HAS_PAD_MASK: tl.constexpr,
    HAS_INIT: tl.constexpr, K: tl.constexpr, WIDE_INDEX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    o_t = time_index(tl.program_id(2), WIDE_INDEX) * BLOCK_L + tl.arange(0, BLOCK_L)
    m_d = o_d < d_inner
    m_t = o_t < seqlen
    p_row = p_x + i_b * s_x_b + o_d[:, None] * s_x_d  # (BLOCK_D, 1): each channel's row
    p_si_b = p_seq_idx  # this batch row's document ids (None without seq_idx)
    if HAS_SEQ_IDX:
        p_si_b += i_b * s_si_b
    p_pm_b = p_pad_mask  # this batch row's padding mask (None without one)
    if HAS_PAD_MASK:
        p_pm_b += i_b * s_pm_b
    p_init_row = p_init  # this block's channels of the initial state (None without one)
    if HAS_INIT:
        p_init_row += i_b * s_init_b + o_d[:, None] * s_init_d
    b_si_t, b_bias = _row_inputs(p_si_b, p_bias, o_t, m_t, o_d, m_d, s_si_l, HAS_SEQ_IDX, HAS_BIAS)
    b_pre = _conv_at(p_row, s_x_l, p_w + o_d * K, b_bias, o_t, m_d, seqlen, p_si_b, s_si_l, b_si_t,
                     p_pm_b, s_pm_l, p_init_row, s_init_l, HAS_BIAS, HAS_SEQ_IDX, HAS_PAD_MASK, HAS_INIT, K,
                     BLOCK_D, BLOCK_L)
    b_out = b_pre
    if SILU:
        b_out = b_pre * tl.sigmoid(b_pre)
    if HAS_PAD_MASK:  # zero at padding
        b_out = tl.where(_kept(p_pm_b, s_pm_l, o_t, m_t)[None, :], b_out, 0.0)
    p_out_t = p_out + i_b * s_o_b + o_d[:, None] * s_o_d + o_t[None, :] * s_o_l
    tl.store(p_out_t, b_out.to(p_out.dtype.element_ty), mask=m_d[:, None] & m_t[None, :])


@triton.jit
def _conv_bwd_kernel(
    p_x, p_w, p_bias, p_dout, p_dx, p_dw, p_dbias, p_seq_idx, p_pad_mask, d_inner, seqlen, s_x_b, s_x_d, s_x_l,
    s_do_b, s_do_d, s_do_l, s_dx_b, s_dx_d, s_dx_l, s_si_b, s_si_l, s_pm_b, s_pm_l,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, HAS_PAD_MASK: tl.constexpr,
    K: tl.constexpr, WIDE_INDEX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_l = time_index(tl.program_id(2), WIDE_INDEX)
    o_s = i_l * BLOCK_L + tl.arange(0, BLOCK_L)  # the steps whose dx this program writes
    m_d = o_d < d_inner
    m_s = o_s < seqlen
    p_row = p_x + i_b * s_x_b + o_d[:, None] * s_x_d
    p_drow = p_dout + i_b * s_do_b + o_d[:, None] * s_do_d
    p_w_d = p_w + o_d * K
    p_si_b = p_seq_idx  # this batch row's document ids (None without seq_idx)
    if HAS_SEQ_IDX:
        p_si_b += i_b * s_si_b
    p_pm_b = p_pad_mask  # this batch row's padding mask (None without one)
    if HAS_PAD_MASK:
        p_pm_b += i_b * s_pm_b
    b_si_s, b_bias = _row_inputs(p_si_b, p_bias, o_s, m_s, o_d, m_d, s_si_l, HAS_SEQ_IDX, HAS_BIAS)
    b_dx = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    # x[s] feeds out[s + j] through tap K - 1 - j; dpre at those steps comes from dout and, with
    # SiLU, the recomputed pre-activation there.
    for j in tl.static_range(K):
        o_t = o_s + j
        m_t = o_t < seqlen
        b_si_t = 0
        if HAS_SEQ_IDX:
            b_si_t = tl.load(p_si_b + o_t * s_si_l, mask=m_t, other=-1)
        b_dpre = tl.load(p_drow + o_t[None, :] * s_do_l, mask=m_d[:, None] & m_t[None, :], other=0.0)
        b_dpre = b_dpre.to(tl.float32)
        if SILU:
            b_pre = _conv_at(p_row, s_x_l, p_w_d, b_bias, o_t, m_d, seqlen, p_si_b, s_si_l, b_si_t,
                             p_pm_b, s_pm_l, p_row, 0, HAS_BIAS, HAS_SEQ_IDX, HAS_PAD_MASK, False, K, BLOCK_D,
                             BLOCK_L)
            b_sig = tl.sigmoid(b_pre)
            b_dpre = b_dpre * b_sig * (1.0 + b_pre * (1.0 - b_sig))
        if HAS_PAD_MASK:  # a padded output is zero: no gradient reaches its pre-activation
            b_dpre = tl.where(_kept(p_pm_b, s_pm_l, o_t, m_t)[None, :], b_dpre, 0.0)
        if j == 0:
            b_dpre_s = b_dpre  # dpre at the program's own steps: for dweight and dbias
        if HAS_SEQ_IDX:
            b_dpre = tl.where((b_si_t == b_si_s)[None, :], b_dpre, 0.0)
        b_w = tl.load(p_w_d + (K - 1 - j), mask=m_d, other=0.0).to(tl.float32)
        b_dx += b_w[:, None] * b_dpre
    if HAS_PAD_MASK:  # a padded input was read as zero
        b_dx = tl.where(_kept(p_pm_b, s_pm_l, o_s, m_s)[None, :], b_dx, 0.0)
    p_dx_s = p_dx + i_b * s_dx_b + o_d[:, None] * s_dx_d + o_s[None, :] * s_dx_l
    tl.store(p_dx_s, b_dx.to(p_dx.dtype.element_ty), mask=m_d[:, None] & m_s[None, :])

    # Partial sums over this program's steps: dweight[k] = sum_s dpre[s] x[s - (K - 1 - k)].
    i_part = i_b * tl.num_programs(2) + i_l  # (batch x L-blocks, d_inner, K) partials
    for k in tl.static_range(K):
        o_src = o_s - (K - 1 - k)
        m_src = m_s & (o_src >= 0)
        if HAS_SEQ_IDX:
            b_si_src = tl.load(p_si_b + o_src * s_si_l, mask=m_src, other=-1)
            m_src = m_src & (b_si_src == b_si_s)
        if HAS_PAD_MASK:
            m_src = m_src & _kept(p_pm_b, s_pm_l, o_src, m_src)
        b_x = tl.load(p_row + o_src[None, :] * s_x_l, mask=m_d[:, None] & m_src[None, :], other=0.0)
        b_x = b_x.to(tl.float32)
        tl.store(p_dw + (i_part * d_inner + o_d) * K + k, tl.sum(b_dpre_s * b_x, axis=1), mask=m_d)
    if HAS_BIAS:
        tl.store(p_dbias + i_part * d_inner + o_d, tl.sum(b_dpre_s, axis=1), mask=m_d)


def _grid(x, tuning):
    batch, d_inner, seqlen = x.shape
    return (batch, cdiv(d_inner, tuning.block_d), cdiv(seqlen, tuning.block_l))


def _empty_out(x, channels_last):
    # channels_last: a (batch, d_inner, seqlen) view of a (batch, seqlen, d_inner) tensor, the layout a
    # following nn.Linear over the channels reads without a copy. Otherwise x's dimension order.
    if channels_last:
        return x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)
    return torch.empty_like(x)


def _is_channels_last(x):
    return x.stride(1) == 1 and x.shape[2] > 1


def conv_fwd(x, weight, bias, seq_idx, silu, channels_last, out=None, tuning=DEFAULT_TUNING, pad_mask=None,
             initial_state=None):
    """The conv's output (batch, d_inner, seqlen), written into `out` when given (any strides), else a
    new tensor, channels-last or in x's dimension order. x: time or channels of stride 1; weight:
    contiguous (d_inner, d_conv). pad_mask: optional (batch, seqlen), 0 at padding (module docstring).
    initial_state: optional (batch, d_inner, d_conv - 1), the inputs before x (no gradient flows to it here)."""
    if out is None:
        out = _empty_out(x, channels_last)
    si, s_si_b, s_si_l = seq_idx_args(seq_idx)
    pm, s_pm_b, s_pm_l = seq_idx_args(pad_mask)  # a (batch, seqlen) tensor too
    init_strides = initial_state.stride() if initial_state is not None else (0, 0, 0)
    with device_guard(x):
        launch(
            _conv_fwd_kernel, _grid(x, tuning),
            x, weight, bias, out, si, pm, initial_state, x.shape[1], x.shape[2], *x.stride(), *out.stride(),
            s_si_b, s_si_l, s_pm_b, s_pm_l, *init_strides,
            HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ_IDX=seq_idx is not None,
            HAS_PAD_MASK=pad_mask is not None, HAS_INIT=initial_state is not None, K=weight.shape[1],
            WIDE_INDEX=wide_index(x.shape[2], x, out), BLOCK_D=tuning.block_d, BLOCK_L=tuning.block_l,
        )
    return out


def conv_bwd(x, weight, bias, seq_idx, silu, dout, dx=None, tuning=DEFAULT_TUNING, pad_mask=None):
    """(dx, dweight, dbias); dx is written into `dx` when given (any strides), else a new tensor in x's
    layout; dbias is empty without a bias. pad_mask: as `conv_fwd`'s."""
    batch, d_inner, seqlen = x.shape
    grid = _grid(x, tuning)
    if dx is None:
        dx = _empty_out(x, _is_channels_last(x))  # in x's layout, so the gradient of a view needs no transpose
    dw_parts = x.new_empty(batch * grid[2], d_inner, weight.shape[1], dtype=torch.float32)
    dbias_parts = x.new_empty(batch * grid[2], d_inner, dtype=torch.float32) if bias is not None else None
    si, s_si_b, s_si_l = seq_idx_args(seq_idx)
    pm, s_pm_b, s_pm_l = seq_idx_args(pad_mask)  # a (batch, seqlen) tensor too
    with device_guard(x):
        launch(
            _conv_bwd_kernel, grid,
            x, weight, bias, dout, dx, dw_parts, dbias_parts, si, pm, d_inner, seqlen, *x.stride(),
            *dout.stride(), *dx.stride(), s_si_b, s_si_l, s_pm_b, s_pm_l,
            HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ_IDX=seq_idx is not None,
            HAS_PAD_MASK=pad_mask is not None, K=weight.shape[1], WIDE_INDEX=wide_index(seqlen, x, dout, dx),
            BLOCK_D=tuning.block_d, BLOCK_L=tuning.block_l,
        )
    dweight = dw_parts.sum(0).to(weight.dtype)
    dbias = dbias_parts.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias


@torch.library.custom_op("hf_mamba::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    silu: bool,
    channels_last: bool,
) -> torch.Tensor:
    """x: (batch, d_inner, seqlen) with time or channels of stride 1; weight: contiguous (d_inner, d_conv)."""
    return conv_fwd(x, weight, bias, seq_idx, silu, channels_last)


@causal_conv1d_fwd_op.register_fake
def _(x, weight, bias, seq_idx, silu, channels_last):
    return _empty_out(x, channels_last)


@torch.library.custom_op("hf_mamba::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    silu: bool,
    dout: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias); dbias is empty without a bias."""
    return conv_bwd(x, weight, bias, seq_idx, silu, dout)


@causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, seq_idx, silu, dout):
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return _empty_out(x, _is_channels_last(x)), torch.empty_like(weight), dbias


def _input_grads(bias, dx, dweight, dbias):
    # seq_idx holds integer document ids, silu and channels_last are flags: none has a gradient.
    return dx, dweight, dbias if bias is not None else None, None, None, None


def _setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, silu, channels_last = inputs
    ctx.silu = silu
    ctx.save_for_backward(x, weight, bias, seq_idx)


def _backward(ctx, dout):
    x, weight, bias, seq_idx = ctx.saved_tensors
    return _input_grads(bias, *causal_conv1d_bwd_op(x, weight, bias, seq_idx, ctx.silu, dout))


causal_conv1d_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _CausalConv1dEager(torch.autograd.Function):
    """The same kernels without the custom-op dispatcher in eager mode (its CPU cost: see
    `hf_mamba.kernels.selective_scan.triton_scan._SelectiveScanEager`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, silu, channels_last, tuning):
        _setup_context(ctx, (x, weight, bias, seq_idx, silu, channels_last), None)
        ctx.tuning = tuning
        return conv_fwd(x, weight, bias, seq_idx, silu, channels_last, tuning=tuning)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, seq_idx = ctx.saved_tensors
        grads = _input_grads(bias, *conv_bwd(x, weight, bias, seq_idx, ctx.silu, dout, tuning=ctx.tuning))
        return (*grads, None)  # tuning: launch choices


def causal_conv1d_triton(
    x, weight, bias=None, activation=None, seq_idx=None, channels_last_out=False, tuning=DEFAULT_TUNING,
    initial_state=None,
):
    """Triton causal conv1d; weight (d_inner, d_conv). Output in x's dtype.
    tuning: tests pass their own; torch.compile traces the custom ops, which take the defaults.
    initial_state (batch, d_inner, d_conv - 1), the inputs before x: read by the kernel where nothing needs
    gradients; otherwise the kernel convolves from zeros and the first d_conv - 1 outputs, the only ones that
    read the initial state, are recomputed from it with PyTorch ops (fp32, as the kernel adds up)."""
    if seq_idx is not None and initial_state is not None:
        raise ValueError("causal_conv1d takes seq_idx or initial_state, not both")
    if x.stride(-1) != 1 and x.stride(1) != 1:
        x = x.contiguous()  # read along time or across channels; anything else is copied first
    weight = weight.contiguous()
    silu = activation is not None
    if initial_state is not None and not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, initial_state))
    ):
        return conv_fwd(x, weight, bias, seq_idx, silu, channels_last_out, tuning=tuning, initial_state=initial_state)
    args = (x, weight, bias, seq_idx, silu, channels_last_out)
    if torch.compiler.is_compiling():
        out = causal_conv1d_fwd_op(*args)  # the op torch.compile / export trace through
    else:
        out = _CausalConv1dEager.apply(*args, tuning)
    if initial_state is None:
        return out
    head = min(weight.shape[1] - 1, x.shape[-1])
    exact = _conv_head(x[..., :head], weight, bias, silu, initial_state).to(out.dtype)
    return torch.cat([exact, out[..., head:]], dim=-1)  # autograd forbids writing into the Function's view


def _conv_head(x_head, weight, bias, silu, initial_state):
    """The outputs at x_head's steps (the first d_conv - 1 or fewer), which read initial_state: products
    summed in fp32 (not F.conv1d, which cuDNN may run in TF32)."""
    window = torch.cat([initial_state.float(), x_head.float()], dim=-1).unfold(-1, weight.shape[1], 1)
    out = (window * weight.float()[:, None, :]).sum(-1)  # (batch, d_inner, head)
    if bias is not None:
        out = out + bias.float()[:, None]
    return F.silu(out) if silu else out


__all__ = ["ConvTuning", "causal_conv1d_triton", "conv_bwd", "conv_fwd"]
