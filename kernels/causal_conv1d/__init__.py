"""Causal depthwise conv1d (the Mamba block's short convolution) and its one-step update.

x: (batch, d_inner, seqlen); weight: (d_inner, d_conv); bias: (d_inner,).
"""

import torch
import torch.nn.functional as F

from ..checks import check_tensors
from ..selective_scan import resolve_backend  # one definition of the backend names and checks


def causal_conv1d(
    x, weight, bias=None, activation=None, initial_state=None, seq_idx=None, backend=None, channels_last_out=False
):
    """out[t] = act(bias + sum_k weight[k] * x[t - d_conv + 1 + k]), with x before t=0 taken from `initial_state`.

    initial_state: (batch, d_inner, d_conv - 1), the inputs just before x (zeros if None), so a
    sequence can be continued from a cache exactly.
    seq_idx: optional (batch, seqlen) document ids of packed sequences; inputs of another document
    count as zeros, so each document is convolved as if it started the sequence.
    backend: "reference" / "torch" (PyTorch ops), "triton" (fused kernel), or None: Triton on CUDA,
    else PyTorch.
    channels_last_out: a layout hint for the Triton kernel: write the output as a (batch, d_inner,
    seqlen) view of a (batch, seqlen, d_inner) tensor, the layout a following nn.Linear over the
    channels reads without a copy. The PyTorch path returns its own layout (on CPU the copy cost
    more than it saved); the values are the same either way.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    check_tensors(x=x, weight=weight, bias=bias, initial_state=initial_state)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, d_inner, seqlen), got {tuple(x.shape)}")
    batch, d_inner, seqlen = x.shape
    if weight.dim() != 2 or weight.shape[0] != d_inner or weight.shape[1] == 0:
        raise ValueError(f"weight must have shape (d_inner={d_inner}, d_conv >= 1), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d_inner,):
        raise ValueError(f"bias must have shape ({d_inner},), got {tuple(bias.shape)}")
    state_shape = (batch, d_inner, weight.shape[1] - 1)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must have shape {state_shape}, got {tuple(initial_state.shape)}")
    if seq_idx is not None and tuple(seq_idx.shape) != (batch, seqlen):
        raise ValueError(f"seq_idx must have shape {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
    if seq_idx is not None and initial_state is not None:
        raise ValueError("causal_conv1d takes seq_idx or initial_state, not both")
    name = resolve_backend(backend, x.device)
    if x.numel() == 0:
        # No output to compute: the tap-by-tap form gives the empty output as a function of x, weight and bias
        # (F.conv1d rejects an input shorter than the kernel, or no channels; the kernel needs a tile).
        no_documents = torch.zeros(batch, seqlen, dtype=torch.long, device=x.device)
        return _causal_conv1d_packed(x, weight, bias, activation, no_documents)
    if name == "triton":
        from .triton_conv import causal_conv1d_triton

        return causal_conv1d_triton(
            x, weight, bias, activation, seq_idx, channels_last_out, initial_state=initial_state
        )
    return _causal_conv1d_torch(x, weight, bias, activation, initial_state, seq_idx)


def _causal_conv1d_torch(x, weight, bias, activation, initial_state, seq_idx):
    if seq_idx is not None:
        return _causal_conv1d_packed(x, weight, bias, activation, seq_idx)
    d_inner, d_conv = weight.shape
    if initial_state is None:
        x_ext = F.pad(x, (d_conv - 1, 0))  # (batch, d_inner, d_conv - 1 + seqlen)
    else:
        x_ext = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    out = F.conv1d(
        x_ext, weight.unsqueeze(1).to(x.dtype), bias.to(x.dtype) if bias is not None else None, groups=d_inner
    )
    return F.silu(out) if activation is not None else out


def _causal_conv1d_packed(x, weight, bias, activation, seq_idx):
    """The conv as d_conv shifted taps, each masked where it would reach into another document."""
    seqlen = x.shape[-1]
    d_conv = weight.shape[1]
    out = torch.zeros_like(x) if bias is None else bias.to(x.dtype)[:, None].expand_as(x).clone()
    for k in range(d_conv):
        shift = d_conv - 1 - k  # tap k reads x[t - shift]
        shifted = F.pad(x, (shift, 0))[..., :seqlen]
        same_document = F.pad(seq_idx, (shift, 0), value=-1)[..., :seqlen] == seq_idx  # (batch, seqlen)
        out = out + weight[:, k, None].to(x.dtype) * shifted * same_document[:, None, :].to(x.dtype)
    return F.silu(out) if activation is not None else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend=None):
    """One decode step. x: (batch, d_inner); conv_state: (batch, d_inner, d_conv) holding the last
    d_conv inputs, shifted left and refilled with x in place. Returns (batch, d_inner) in x's dtype.

    backend: "triton" (one fused kernel, fp32 arithmetic), "reference" / "torch" (PyTorch ops, in the
    state's dtype), or None: Triton on CUDA, else PyTorch.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    check_tensors(x=x, conv_state=conv_state, weight=weight, bias=bias)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, d_inner), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] == 0:
        raise ValueError(f"weight must have shape (d_inner={x.shape[1]}, d_conv >= 1), got {tuple(weight.shape)}")
    expected = (*x.shape, weight.shape[1])
    if tuple(conv_state.shape) != expected:
        raise ValueError(f"conv_state must have shape {expected}, got {tuple(conv_state.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")
    if resolve_backend(backend, x.device) == "triton":
        from .triton_conv_update import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x.to(conv_state.dtype)
    out = (conv_state * weight.to(conv_state.dtype)).sum(dim=-1)  # (batch, d_inner)
    if bias is not None:
        out = out + bias.to(conv_state.dtype)
    out = out.to(x.dtype)
    return F.silu(out) if activation is not None else out


__all__ = ["causal_conv1d", "causal_conv1d_update"]
