"""fp16's range for the gated scan output y, out_proj's input.

Where a model's fp32 y passes 65504 (training can take it there: docs/reliability.md), an fp16 y is inf, and
so is everything after it. In fp16 the scan therefore writes y in fp32, and out_proj multiplies y / s in fp16,
s the power of two that brings max |y| to at most FP16_Y_MAX, then multiplies its fp32 result by s.
Dividing and multiplying by a power of two is exact, and where max |y| is at most FP16_Y_MAX (s = 1) the fp16
matmul sees the y it saw before. At that bound out_proj's sums stay far inside fp16's range, and a y below it
by 2^-22 (where y / s turns subnormal) adds less than the matmul's rounding.

The training mixer takes one s for its whole y (`fp16_range_scale`); elsewhere each token has its own
(`to_fp16_range`), which a decode step or a prefill computes in one launch, and where nothing needs gradients
the model's residual add multiplies out_proj's result by it (`add_rms_norm`'s delta_scale).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths need no Triton
    triton = None

FP16_Y_MAX = 2.0**8


def y_dtype(matmul_dtype):
    """The dtype the scan writes y (out_proj's input) in where the matmuls run in `matmul_dtype`: fp32 for fp16,
    where y may pass 65504; None (the activations' own) otherwise."""
    return torch.float32 if matmul_dtype == torch.float16 else None


def fp16_range_scale(y, dim=None):
    """The power of two s >= 1 with max |y| / s <= FP16_Y_MAX (up to 2x that where log2 rounds), as fp32,
    without host synchronisation: 0-dim over all of y, or with `dim` one per slice along it (kept, size 1)."""
    y = y.detach()
    if dim is None:
        amax = torch.maximum(y.amax(), y.amin().neg())  # no |y| copy
    else:
        amax = torch.maximum(y.amax(dim, keepdim=True), y.amin(dim, keepdim=True).neg())
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp_min(FP16_Y_MAX) / FP16_Y_MAX)))


def to_fp16_range(y):
    """(y / s in fp16, s) for an fp32 y, s of shape (..., 1): one power of two per row of y's last dimension,
    as `fp16_range_scale(y, dim=-1)` chooses it. One Triton launch for a 2-d or 3-d CUDA y without gradients
    (a decode step's or a prefill's, per layer: the PyTorch ops take eight), PyTorch ops otherwise
    (differentiable in y)."""
    if y.dim() in (2, 3) and y.is_cuda and triton is not None and not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and y.requires_grad
    ):
        return to_fp16_range_triton(y)
    scale = fp16_range_scale(y, dim=-1)
    return (y / scale).half(), scale


def to_fp16_range_triton(y):
    """`to_fp16_range` of a 2-d (rows, d) or 3-d (batch, seqlen, d) y, read by its strides, in one launch, a
    program per row (also under TRITON_INTERPRET=1). The outputs are contiguous."""
    from ._launch import device_guard, launch, next_power_of_2

    y3 = y if y.dim() == 3 else y[None]  # (outer, inner, d): rows are (outer, inner) pairs
    outer, inner, d = y3.shape
    out = torch.empty(y.shape, dtype=torch.float16, device=y.device)
    scale = torch.empty((*y.shape[:-1], 1), dtype=torch.float32, device=y.device)
    if y.numel():
        with device_guard(y):
            launch(
                _to_fp16_range_kernel, (outer * inner,), y3, out, scale, inner, d, *y3.stride(),
                Y_MAX=FP16_Y_MAX, BLOCK=min(4096, next_power_of_2(d)), num_warps=4,
            )
    elif scale.numel():
        scale.fill_(1.0)
    return out, scale


if triton is not None:

    @triton.jit
    def _to_fp16_range_kernel(
        p_y, p_out, p_scale, inner, d, s_y_o, s_y_i, s_y_d, Y_MAX: tl.constexpr, BLOCK: tl.constexpr
    ):
        i_r = tl.program_id(0).to(tl.int64)  # the row: out and scale are contiguous, y is read by its strides
        p_row = p_y + (i_r // inner) * s_y_o + (i_r % inner) * s_y_i
        o = tl.arange(0, BLOCK)
        b_amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for d0 in range(0, d, BLOCK):
            b_y = tl.load(p_row + (d0 + o) * s_y_d, mask=d0 + o < d, other=0.0).to(tl.float32)
            b_amax = tl.maximum(b_amax, tl.abs(b_y))
        amax = tl.maximum(tl.max(b_amax, axis=0), Y_MAX)
        scale = tl.exp2(tl.ceil(tl.log2(amax / Y_MAX)))
        for d0 in range(0, d, BLOCK):
            m = d0 + o < d
            b_y = tl.load(p_row + (d0 + o) * s_y_d, mask=m, other=0.0).to(tl.float32)
            tl.store(p_out + i_r * d + d0 + o, (b_y / scale).to(tl.float16), mask=m)
        tl.store(p_scale + i_r, scale)


__all__ = ["FP16_Y_MAX", "fp16_range_scale", "to_fp16_range", "to_fp16_range_triton", "y_dtype"]
