"""Causal depthwise conv1d (the Mamba block's short convolution) and its one-step update.

x: (batch, d_inner, seqlen); weight: (d_inner, d_conv); bias: (d_inner,).
"""

import torch
import torch.nn.functional as F


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None):
    """out[t] = act(bias + sum_k weight[k] * x[t - d_conv + 1 + k]), with x before t=0 taken from `initial_state`.

    initial_state: (batch, d_inner, d_conv - 1), the inputs just before x (zeros if None), so a
    sequence can be continued from a cache exactly.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    d_inner, d_conv = weight.shape
    if initial_state is None:
        x_ext = F.pad(x, (d_conv - 1, 0))  # (batch, d_inner, d_conv - 1 + seqlen)
    else:
        x_ext = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    out = F.conv1d(x_ext, weight.unsqueeze(1).to(x.dtype), bias.to(x.dtype) if bias is not None else None, groups=d_inner)
    return F.silu(out) if activation is not None else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decode step. x: (batch, d_inner); conv_state: (batch, d_inner, d_conv) holding the last
    d_conv inputs, shifted left and refilled with x in place. Returns (batch, d_inner)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = (conv_state * weight.to(conv_state.dtype)).sum(dim=-1)  # (batch, d_inner)
    if bias is not None:
        out = out + bias.to(conv_state.dtype)
    out = out.to(x.dtype)
    return F.silu(out) if activation is not None else out


__all__ = ["causal_conv1d", "causal_conv1d_update"]
