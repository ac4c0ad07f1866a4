"""The model's RMSNorm (`rms_norm`), and the residual add fused with the next RMSNorm (`add_rms_norm`).

A Mamba block returns residual + mixer(...); the next block (or the final norm) normalises that sum.
`add_rms_norm` computes both in one pass:

    hidden = residual + delta                                     (in promote(residual, delta) dtype)
    normed = weight * rms_norm(hidden, eps).to(weight.dtype)      (normalised in fp32, cast, then scaled)

with the roundings of the model's MambaRMSNorm (Transformers' Mamba order), so that the fused blocks
compute what the blocks compute one op at a time. The norm reads the sum as it is kept (fp32 with
`residual_in_fp32`), not cast to the weight's dtype first: in a pure fp16 model a residual above 65504
would be inf there and the normalised row NaN, although its normalised values are small. Only the
normalised row is rounded to the weight's dtype (as mamba_ssm's fused add + norm does).
"""

import torch
import torch.nn.functional as F

from ..checks import check_eps, check_out_dtype, check_tensors
from ..selective_scan import resolve_backend
from ..selective_scan.reference import fp32_or_wider
from .torch_rms_norm import rms_norm_input_grad


def add_rms_norm_ref(residual, delta, weight, eps, out_dtype=None, delta_scale=None):
    """PyTorch ops in the model's order; returns (hidden, normed)."""
    if delta_scale is None:
        hidden = residual + delta
    else:  # residual + delta * s in fp32 (or wider), rounded once
        hidden = (residual + delta * fp32_or_wider(delta_scale)).to(torch.promote_types(residual.dtype, delta.dtype))
    normed = weight * F.rms_norm(fp32_or_wider(hidden), weight.shape, eps=eps).to(weight.dtype)
    return hidden, normed.to(out_dtype or normed.dtype)


def rms_norm_ref(x, weight, eps, dtype):
    """weight * rms_norm(x).to(dtype), x fp32 holding values of dtype: the training norm's PyTorch ops
    (`triton_rms_norm.rms_norm_train_triton` computes the same, gradients included)."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps).to(dtype)


def weightless_rms_norm(x, eps):
    """x / rms(x) over the last dim, computed in fp32 (fp64 stays fp64) and cast back to x's dtype: Falcon Mamba's
    norms on the time step, B and C."""
    return F.rms_norm(fp32_or_wider(x), (x.shape[-1],), eps=eps).to(x.dtype)


def weightless_rms_norms(x, sizes, eps, backend=None):
    """Falcon Mamba's norms on x_proj's output: x (..., sum(sizes)) split along its last dim into parts of `sizes`
    (dt_rank, d_state, d_state), each normalised as `weightless_rms_norm` does. Returns the parts (views).

    backend "triton": one kernel for three non-empty parts of a 16- or 32-bit x without gradients (the decode
    step, where PyTorch takes nine launches; the fused mixer calls that kernel itself, `_one_launch` deciding
    the same way, to keep its output whole); otherwise, and on
    "reference" / "torch" or None off CUDA, the PyTorch ops part by part (gradients flow through them).
    """
    check_tensors(x=x)
    check_eps(eps)
    sizes = [int(size) for size in sizes]
    if x.dim() == 0 or x.shape[-1] != sum(sizes):
        raise ValueError(f"x must have a last dim of sum(sizes) = {sum(sizes)}, got shape {tuple(x.shape)}")
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if not needs_grad and not torch.compiler.is_compiling() and _one_launch(backend, sizes, x):
        from .triton_rms_norm import weightless_rms_norms_triton

        return weightless_rms_norms_triton(x, sizes, eps).split(sizes, -1)
    return [weightless_rms_norm(part, eps) for part in x.split(sizes, -1)]


def weightless_rms_norms_backward_(grad, x, sizes, eps, backend=None):
    """In place: grad (rows, sum(sizes)), the gradient of `weightless_rms_norms`' parts side by side, becomes
    the gradient of x (rows, sum(sizes)), computed in fp32. One kernel where the forward's takes one."""
    if _one_launch(backend, sizes, x, grad):
        from .triton_rms_norm import weightless_rms_norms_backward_triton_

        weightless_rms_norms_backward_triton_(grad, x, sizes, eps)
        return
    for g_part, x_part in zip(grad.split(sizes, -1), x.split(sizes, -1), strict=True):
        x32 = fp32_or_wider(x_part)
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
        g_part.copy_(rms_norm_input_grad(fp32_or_wider(g_part), x32 * rstd, rstd))


def _one_launch(backend, sizes, *tensors):
    """Whether the three-norms kernels take these: three non-empty parts, 16- or 32-bit tensors, Triton."""
    return (
        len(sizes) == 3 and min(sizes) > 0
        and all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)
        and resolve_backend(backend, tensors[0].device) == "triton"
    )


def rms_norm(x, weight, eps, dtype, backend=None):
    """weight * rms_norm(x).to(dtype): the model's RMSNorm (Transformers' Mamba order) on x, an fp32 (or fp64)
    tensor holding values of `dtype`; (..., hidden_size) and weight (hidden_size,).

    backend "triton" (fp32 x of a 16- or 32-bit dtype, a 16- or 32-bit weight): one kernel forward, and with
    gradients one backward. Otherwise, with gradients wanted, an autograd function keeping x and 1/rms per
    row (less than the composed ops keep); without gradients the PyTorch ops. Under torch.compile the
    PyTorch ops on every backend.
    """
    check_tensors(x=x, weight=weight)
    check_eps(eps)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if torch.compiler.is_compiling():
        return rms_norm_ref(x, weight, eps, dtype)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    triton_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if (backend == "triton" and x.dtype == torch.float32 and dtype in triton_dtypes and weight.dtype in triton_dtypes
            and x.shape[-1] > 0):
        from .triton_rms_norm import rms_norm_train_triton, rms_norm_triton

        return rms_norm_train_triton(x, weight, eps, dtype) if needs_grad else rms_norm_triton(x, weight, eps, dtype)
    if needs_grad:
        from .torch_rms_norm import HAS_FUSED_RMS_NORM, RMSNormFunction

        if HAS_FUSED_RMS_NORM:
            return RMSNormFunction.apply(x, weight, eps, dtype)
    return rms_norm_ref(x, weight, eps, dtype)


def add_rms_norm(residual, delta, weight, eps, backend=None, out_dtype=None, delta_scale=None):
    """residual, delta: (..., hidden_size); weight: (hidden_size,). Returns (hidden, normed).

    out_dtype: normed's dtype, by default weight's; autocast's dtype lets the next matmul skip its cast
    (the value is the one that cast would give). delta_scale: (..., 1), a factor per row of delta (the power of
    two an fp16 out_proj's output still has to be multiplied by, `to_fp16_range`): the sum is then residual +
    delta * delta_scale, computed in fp32 and rounded once. backend: "triton" (one kernel forward, one backward
    plus the weight gradient's sum), "reference" / "torch" (PyTorch ops), or None: Triton on CUDA, else
    PyTorch. Gradients flow to residual, delta and weight on every backend (with delta_scale through the
    PyTorch ops).
    """
    if residual is None or delta is None:
        raise ValueError("residual and delta must both be tensors: add_rms_norm normalises residual + delta")
    check_tensors(residual=residual, delta=delta, weight=weight, delta_scale=delta_scale)
    check_eps(eps)
    if residual.shape != delta.shape:
        raise ValueError(f"residual and delta must have the same shape, got {tuple(residual.shape)} and "
                         f"{tuple(delta.shape)}")
    if weight.dim() != 1 or weight.shape[0] != residual.shape[-1]:
        raise ValueError(f"weight must have shape ({residual.shape[-1]},), got {tuple(weight.shape)}")
    check_out_dtype(out_dtype)
    if delta_scale is not None and delta_scale.shape != (*delta.shape[:-1], 1):
        raise ValueError(f"delta_scale must have shape {(*delta.shape[:-1], 1)} (one factor per row of delta), "
                         f"got {tuple(delta_scale.shape)}")
    tensors = (residual, delta, weight) if delta_scale is None else (residual, delta, weight, delta_scale)
    # Rows of no elements (hidden_size 0) go to the PyTorch ops: the kernel's rows need a column.
    triton = resolve_backend(backend, residual.device) == "triton" and residual.shape[-1] > 0
    if triton and torch.float64 not in {t.dtype for t in tensors}:
        from .triton_rms_norm import add_rms_norm_train_triton, add_rms_norm_triton

        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        compiling = torch.compiler.is_compiling()
        if not needs_grad and (delta_scale is None or not compiling):
            return add_rms_norm_triton(residual, delta, weight, eps, out_dtype, delta_scale)
        if not compiling and delta_scale is None:  # compiled training traces the ops below
            return add_rms_norm_train_triton(residual, delta, weight, eps, out_dtype)
    return add_rms_norm_ref(residual, delta, weight, eps, out_dtype, delta_scale)


__all__ = [
    "add_rms_norm", "add_rms_norm_ref", "rms_norm", "rms_norm_ref", "weightless_rms_norm", "weightless_rms_norms",
    "weightless_rms_norms_backward_",
]
