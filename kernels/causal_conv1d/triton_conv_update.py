"""One decode step of the causal depthwise conv in Triton, registered as a torch.library custom op.

conv_state (batch, d_inner, d_conv) holds the last d_conv inputs, newest last. The step shifts it left
by one, appends x, and returns act(bias + sum_k weight[k] window[k]) in fp32 arithmetic: one launch
where the PyTorch composition (roll, copy, index, multiply, sum, add, cast, SiLU) takes about eight,
which is what a decode step on a CUDA graph pays for (docs/kernels.md, "Decode step").
"""

import torch
import triton
import triton.language as tl

from .._launch import cdiv, device_guard, launch, next_power_of_2


@triton.jit
def conv_window(p_x_b, s_x_d, p_state_b, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K: tl.constexpr):
    """The conv's window once x shifts in, without touching the state: window[k] = state[k + 1] for
    k < d_conv - 1 and x at k = d_conv - 1; (BLOCK_D, BLOCK_K) in the state's dtype, zero past d_conv."""
    o_k = tl.arange(0, BLOCK_K)
    p_st = p_state_b + o_d[:, None] * s_st_d  # (BLOCK_D, 1) row starts
    b_old = tl.load(p_st + (o_k[None, :] + 1) * s_st_k, mask=m_d[:, None] & (o_k < d_conv - 1)[None, :], other=0.0)
    b_x = tl.load(p_x_b + o_d * s_x_d, mask=m_d, other=0.0).to(b_old.dtype)
    return tl.where((o_k == d_conv - 1)[None, :], b_x[:, None], b_old)


@triton.jit
def conv_of_window(b_win, p_w, s_w_d, s_w_k, p_bias, o_d, m_d, d_conv, HAS_BIAS: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """bias + sum_k weight[k] window[k] for the channels o_d, in fp32, before any activation."""
    o_k = tl.arange(0, BLOCK_K)
    m_dk = m_d[:, None] & (o_k < d_conv)[None, :]
    b_w = tl.load(p_w + o_d[:, None] * s_w_d + o_k[None, :] * s_w_k, mask=m_dk, other=0.0).to(tl.float32)
    b_out = tl.sum(b_win.to(tl.float32) * b_w, axis=1)  # (BLOCK_D,)
    if HAS_BIAS:
        b_out += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    return b_out


@triton.jit
def shift_conv_state(p_x_b, s_x_d, p_state_b, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K: tl.constexpr):
    """Shift x (one batch row's, at p_x_b) into the conv state rows o_d in place, newest last; returns the
    window it stored, (BLOCK_D, BLOCK_K) in the state's dtype (zero past d_conv)."""
    b_win = conv_window(p_x_b, s_x_d, p_state_b, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K)
    store_conv_window(b_win, p_state_b, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K)
    return b_win


@triton.jit
def store_conv_window(b_win, p_state_b, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K: tl.constexpr):
    """Write the window `conv_window` read from the state rows o_d back as their new state."""
    # Every thread has read its old entries before any thread overwrites a neighbour's.
    tl.debug_barrier()
    o_k = tl.arange(0, BLOCK_K)
    tl.store(p_state_b + o_d[:, None] * s_st_d + o_k[None, :] * s_st_k, b_win,
             mask=m_d[:, None] & (o_k < d_conv)[None, :])


@triton.jit
def _conv_update_kernel(
    p_x, p_state, p_w, p_bias, p_out,
    d_inner, d_conv,
    s_x_b, s_x_d,
    s_st_b, s_st_d, s_st_k,
    s_w_d, s_w_k,
    s_o_b, s_o_d,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < d_inner
    p_x_b, p_state_b = p_x + i_b * s_x_b, p_state + i_b * s_st_b
    b_win = shift_conv_state(p_x_b, s_x_d, p_state_b, s_st_d, s_st_k, o_d, m_d, d_conv, BLOCK_K)
    b_out = conv_of_window(b_win, p_w, s_w_d, s_w_k, p_bias, o_d, m_d, d_conv, HAS_BIAS, BLOCK_K)
    if SILU:
        b_out = b_out * tl.sigmoid(b_out)
    tl.store(p_out + i_b * s_o_b + o_d * s_o_d, b_out.to(p_out.dtype.element_ty), mask=m_d)


def _conv_update(x, conv_state, weight, bias, silu):
    """Shifts x into `conv_state` in place; returns the conv output (batch, d_inner) in x's dtype."""
    batch, d_inner = x.shape
    d_conv = weight.shape[1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    block_d = 128
    grid = (batch, cdiv(d_inner, block_d))
    with device_guard(x):
        launch(
            _conv_update_kernel, grid,
            x, conv_state, weight, bias, out,
            d_inner, d_conv,
            *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
            HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d, BLOCK_K=next_power_of_2(d_conv), num_warps=4,
        )
    return out


@torch.library.custom_op("hf_mamba::causal_conv1d_update", mutates_args=("conv_state",))
def causal_conv1d_update_op(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    return _conv_update(x, conv_state, weight, bias, silu)


@causal_conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def causal_conv1d_update_triton(x, conv_state, weight, bias, activation):
    """Triton decode step; same semantics as `hf_mamba.kernels.causal_conv1d_update` (backend="triton")."""
    args = (x, conv_state, weight, bias, activation is not None)
    if torch.compiler.is_compiling():
        return causal_conv1d_update_op(*args)  # the op torch.compile / export trace through
    return _conv_update(*args)  # eager: no custom-op dispatch on the host


__all__ = ["causal_conv1d_update_triton", "conv_of_window", "conv_window", "shift_conv_state", "store_conv_window"]
