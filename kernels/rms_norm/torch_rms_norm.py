"""The training RMSNorm in PyTorch ops, as an autograd function that keeps less than the composed ops."""

import torch

# The op behind F.rms_norm that also returns 1/rms (PyTorch >= 2.8); without it the norm is composed from ops.
HAS_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")


class RMSNormFunction(torch.autograd.Function):
    """weight * rms_norm(x).to(dtype), keeping only x (which the residual keeps anyway) and 1/rms per row.

    Composed from ops, autograd also keeps the normalised fp32 copy of x for the weight gradient: one
    (batch, seqlen, hidden) fp32 tensor per layer, recomputed here with one multiply.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, dtype):
        normalized, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.dtype = dtype
        return weight * normalized.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normalized = x * rstd
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (grad * normalized.to(ctx.dtype)).sum(tuple(range(grad.dim() - 1))).to(weight.dtype)
        # Rounded to dtype first, as autograd rounds the gradient of the cast normalised tensor.
        dnormalized = (grad * weight).to(ctx.dtype).to(x.dtype)
        return rms_norm_input_grad(dnormalized, normalized, rstd), dweight, None, None  # eps, dtype: no tensors


def rms_norm_input_grad(grad, normalized, rstd):
    """d/dx of x * rstd(x) applied to `grad`, the gradient of the normalised rows `normalized` (rows over the
    last dim, rstd = 1/rms per row): rstd * (g - n * mean(g * n))."""
    return rstd * (grad - normalized * (grad * normalized).mean(-1, keepdim=True))


__all__ = ["HAS_FUSED_RMS_NORM", "RMSNormFunction", "rms_norm_input_grad"]
