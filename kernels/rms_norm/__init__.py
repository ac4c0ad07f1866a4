"""Residual add fused with the next RMSNorm, for the decode step.

A Mamba block returns residual + mixer(...); the next block (or the final norm) normalises that sum.
`add_rms_norm` computes both in one pass:

    hidden = residual + delta                                   (in promote(residual, delta) dtype)
    normed = weight * rms_norm(hidden.to(weight.dtype), eps)    (normalised in fp32, cast, then scaled)

with the roundings of the model's MambaRMSNorm (Transformers' Mamba order), so the fused decode step
computes what the blocks compute one op at a time.
"""

import torch
import torch.nn.functional as F


def add_rms_norm_ref(residual, delta, weight, eps):
    """PyTorch ops in the model's order; returns (hidden, normed)."""
    hidden = residual + delta
    x = hidden.to(weight.dtype)
    x_fp32 = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = weight * F.rms_norm(x_fp32, weight.shape, eps=eps).to(weight.dtype)
    return hidden, normed


def add_rms_norm(residual, delta, weight, eps, backend=None):
    """residual, delta: (..., hidden_size); weight: (hidden_size,). Returns (hidden, normed).

    backend: "triton" (one kernel per row block), "reference" / "torch" (PyTorch ops), or None:
    Triton on CUDA, else PyTorch. No autograd: for inference (the decode step).
    """
    if residual.shape != delta.shape:
        raise ValueError(f"residual and delta must have the same shape, got {tuple(residual.shape)} and "
                         f"{tuple(delta.shape)}")
    if weight.dim() != 1 or weight.shape[0] != residual.shape[-1]:
        raise ValueError(f"weight must have shape ({residual.shape[-1]},), got {tuple(weight.shape)}")
    from ..selective_scan import resolve_backend

    if resolve_backend(backend, residual.device) == "triton" and residual.dtype != torch.float64:
        from .triton_rms_norm import add_rms_norm_triton

        return add_rms_norm_triton(residual, delta, weight, eps)
    return add_rms_norm_ref(residual, delta, weight, eps)


__all__ = ["add_rms_norm", "add_rms_norm_ref"]
