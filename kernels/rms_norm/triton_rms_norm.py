"""RMSNorm in Triton, the row in registers (hidden_size up to 64K), optionally fused with the residual
add before it.

A Mamba block returns residual + mixer(...), and the next block (or the final norm) normalises that
sum. On the PyTorch ops the add, the norm, autocast's cast of its output and, in the backward, the
gradient's cast and the sum of the residual's and the norm's gradients are some five kernels per
layer beyond the norm's own; a 24-layer model's training step is host-bound on launches. Here:

- add_rms_norm_train: (hidden, normed) = (residual + delta, norm(residual + delta)) with autograd,
  one launch forward and one (plus the weight gradient's sum) backward.
- rms_norm_train: the norm alone (the first block's), the same kernels without the add.
- add_rms_norm_triton, rms_norm_triton: the forwards without autograd, for inference and the decode step.
- weightless_rms_norms_triton: Falcon Mamba's three weight-free norms on x_proj's output in one launch.

The roundings are the model's (MambaRMSNorm, Transformers' Mamba order): the sum rounded to
promote(residual, delta) (the residual stream's dtype, fp32 with residual_in_fp32), normalised from that
in fp32 (not cast to the norm's dtype first, which overflows fp16), rounded to the norm's dtype ROUND,
scaled by the weight in fp32 and rounded to the output dtype (autocast's, where the next op would cast to
it anyway).
"""

import torch
import triton
import triton.language as tl

from .._launch import cdiv, device_guard, launch, next_power_of_2, sm_count


@triton.jit
def _rms_norm_fwd_kernel(
    p_x, p_delta, p_delta_scale, p_w, p_hidden, p_out, p_rstd, n_rows, n_cols, rows_per_program, eps,
    s_x, s_delta, s_hidden, s_out,
    ADD: tl.constexpr, SCALED: tl.constexpr, STORE_RSTD: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    # ADD: hidden = x + delta (times the row's delta_scale where SCALED), in fp32, rounded to hidden's dtype,
    # stored and normalised. Else x itself is normalised.
    o_c = tl.arange(0, BLOCK)
    m_c = o_c < n_cols
    b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)
    for r in range(rows_per_program):
        i_row = tl.program_id(0).to(tl.int64) * rows_per_program + r
        if i_row < n_rows:
            b_x = tl.load(p_x + i_row * s_x + o_c, mask=m_c, other=0.0).to(tl.float32)
            if ADD:
                b_delta = tl.load(p_delta + i_row * s_delta + o_c, mask=m_c, other=0.0).to(tl.float32)
                if SCALED:
                    b_delta = b_delta * tl.load(p_delta_scale + i_row)
                b_hidden = (b_x + b_delta).to(p_hidden.dtype.element_ty)
                tl.store(p_hidden + i_row * s_hidden + o_c, b_hidden, mask=m_c)
                b_x = b_hidden.to(tl.float32)
            b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / n_cols + eps)
            b_n = (b_x * b_rstd).to(ROUND).to(tl.float32)
            tl.store(p_out + i_row * s_out + o_c, (b_w * b_n).to(p_out.dtype.element_ty), mask=m_c)
            if STORE_RSTD:
                tl.store(p_rstd + i_row, b_rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    p_x, p_w, p_rstd, p_grad, p_dhidden, p_dx, p_ddelta, p_dw, n_rows, n_cols, rows_per_program,
    s_x, s_grad, s_dhidden, s_dx, s_ddelta,
    ADD: tl.constexpr, HAS_DHIDDEN: tl.constexpr, STORE_DDELTA: tl.constexpr, ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # With n = x rstd and dn = (grad w).to(ROUND): dx = rstd (dn - n mean(dn n)), dw = sum_rows grad n.to(ROUND)
    # (this program's rows; the host adds the programs' partial sums).
    # ADD: x is the hidden sum, normalised as it is; its gradient is the norm's, rounded to the sum's dtype
    # as the backward of the norm's upcast rounds it, plus dhidden (the gradient of the sum's other uses),
    # and is stored for the residual (p_dx) and, in delta's dtype where that differs, for delta.
    i_prog = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, BLOCK)
    m_c = o_c < n_cols
    b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(rows_per_program):
        i_row = i_prog * rows_per_program + r
        if i_row < n_rows:
            b_x = tl.load(p_x + i_row * s_x + o_c, mask=m_c, other=0.0).to(tl.float32)
            b_g = tl.load(p_grad + i_row * s_grad + o_c, mask=m_c, other=0.0).to(tl.float32)
            b_rstd = tl.load(p_rstd + i_row)
            b_n = b_x * b_rstd
            b_dw += b_g * b_n.to(ROUND).to(tl.float32)
            b_dn = (b_g * b_w).to(ROUND).to(tl.float32)
            b_dx = b_rstd * (b_dn - b_n * (tl.sum(b_dn * b_n, axis=0) / n_cols))
            if ADD:
                b_dx = b_dx.to(p_dx.dtype.element_ty).to(tl.float32)
                if HAS_DHIDDEN:
                    b_dhidden = tl.load(p_dhidden + i_row * s_dhidden + o_c, mask=m_c, other=0.0).to(tl.float32)
                    b_dx = b_dhidden + b_dx
                b_dx = b_dx.to(p_dx.dtype.element_ty)
                if STORE_DDELTA:
                    tl.store(p_ddelta + i_row * s_ddelta + o_c, b_dx.to(p_ddelta.dtype.element_ty), mask=m_c)
            tl.store(p_dx + i_row * s_dx + o_c, b_dx.to(p_dx.dtype.element_ty), mask=m_c)
    tl.store(p_dw + i_prog * n_cols + o_c, b_dw, mask=m_c)


@triton.jit
def _group_means(b, o_c, n_cols, end0, end1):
    # Each element's group mean over its row, groups the columns [0, end0), [end0, end1), [end1, n_cols);
    # b (rows, BLOCK), zero past n_cols.
    in0 = (o_c < end0)[None, :]
    in1 = ((o_c >= end0) & (o_c < end1))[None, :]
    b_m0 = (tl.sum(tl.where(in0, b, 0.0), 1) / end0)[:, None]
    b_m1 = (tl.sum(tl.where(in1, b, 0.0), 1) / (end1 - end0))[:, None]
    b_m2 = (tl.sum(tl.where(o_c[None, :] >= end1, b, 0.0), 1) / (n_cols - end1))[:, None]
    return tl.where(in0, b_m0, tl.where(in1, b_m1, b_m2))


@triton.jit
def _row_tile(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    # This program's BLOCK_R rows: their indices, the column indices and the in-bounds mask.
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_c = tl.arange(0, BLOCK)
    return o_r, o_c, (o_r < n_rows)[:, None] & (o_c < n_cols)[None, :]


@triton.jit
def _three_norms_kernel(p_x, p_out, n_rows, n_cols, end0, end1, eps, s_x, s_out,
                        BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    # BLOCK_R rows; each column group (_group_means') divided by its rms, in fp32.
    o_r, o_c, m = _row_tile(n_rows, n_cols, BLOCK_R, BLOCK)
    b_x = tl.load(p_x + o_r[:, None] * s_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    b_out = b_x * tl.rsqrt(_group_means(b_x * b_x, o_c, n_cols, end0, end1) + eps)
    tl.store(p_out + o_r[:, None] * s_out + o_c[None, :], b_out.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def _three_norms_bwd_kernel(p_x, p_g, n_rows, n_cols, end0, end1, eps, s_x, s_g,
                            BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    # In place: g, the gradient of the three normalised column groups, becomes x's: rstd * (g - n * mean(g * n))
    # per group, n = x * rstd, in fp32.
    o_r, o_c, m = _row_tile(n_rows, n_cols, BLOCK_R, BLOCK)
    b_x = tl.load(p_x + o_r[:, None] * s_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    p_g_t = p_g + o_r[:, None] * s_g + o_c[None, :]
    b_g = tl.load(p_g_t, mask=m, other=0.0).to(tl.float32)
    b_rstd = tl.rsqrt(_group_means(b_x * b_x, o_c, n_cols, end0, end1) + eps)
    b_n = b_x * b_rstd
    b_dx = b_rstd * (b_g - b_n * _group_means(b_g * b_n, o_c, n_cols, end0, end1))
    tl.store(p_g_t, b_dx.to(p_g.dtype.element_ty), mask=m)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _row_launch(n_rows, n_cols, device):
    """(programs, rows per program, num_warps) for n_rows rows of n_cols: a few programs per
    multiprocessor, so that the weight gradient's partial sums stay small."""
    rows_per_program = max(1, cdiv(n_rows, 4 * sm_count(device)))
    return cdiv(n_rows, rows_per_program), rows_per_program, 4 if n_cols <= 4096 else 8


def _rows(t, n_cols):
    """t as (rows, n_cols) with unit stride along n_cols (the kernels' row layout)."""
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm_fwd(x2, delta2, weight, eps, round_dtype, out_dtype, store_rstd, delta_scale=None):
    """The forward kernel on rows x2 (+ delta2, times delta_scale's fp32 value per row where given): (hidden or
    None, out, rstd or None)."""
    n_rows, n_cols = x2.shape
    # Rows like x2's, contiguous: empty_like costs half the host time of torch.empty(x2.shape, ...),
    # which parses the torch.Size as a sequence.
    hidden = None
    if delta2 is not None:
        dtype = torch.promote_types(x2.dtype, delta2.dtype)
        hidden = torch.empty_like(x2, dtype=dtype, memory_format=torch.contiguous_format)
    out = torch.empty_like(x2, dtype=out_dtype, memory_format=torch.contiguous_format)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device) if store_rstd else None
    programs, rows_per_program, num_warps = _row_launch(n_rows, n_cols, x2.device)
    if n_rows:
        with device_guard(x2):
            launch(
                _rms_norm_fwd_kernel, (programs,),
                x2, delta2, delta_scale, weight, hidden, out, rstd, n_rows, n_cols, rows_per_program, eps,
                x2.stride(0), delta2.stride(0) if delta2 is not None else 0,
                hidden.stride(0) if hidden is not None else 0, out.stride(0),
                ADD=delta2 is not None, SCALED=delta_scale is not None, STORE_RSTD=store_rstd,
                ROUND=_TL_DTYPES[round_dtype],
                BLOCK=next_power_of_2(n_cols), num_warps=num_warps,
            )
    return hidden, out, rstd


def _norm_bwd(x2, weight, rstd, grad, dhidden, round_dtype, add, delta_dtype=None):
    """The backward kernel: (dx, ddelta or None, dweight's fp32 partial sums (programs, n_cols))."""
    n_rows, n_cols = x2.shape
    grad2 = _rows(grad, n_cols)
    dhidden2 = _rows(dhidden, n_cols) if dhidden is not None else None
    dx = torch.empty_like(x2)
    ddelta = torch.empty(x2.shape, dtype=delta_dtype, device=x2.device) if add and delta_dtype != x2.dtype else None
    programs, rows_per_program, num_warps = _row_launch(n_rows, n_cols, x2.device)
    dw_parts = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)  # per program
    if n_rows:
        with device_guard(x2):
            launch(
                _rms_norm_bwd_kernel, (programs,),
                x2, weight, rstd, grad2, dhidden2, dx, ddelta, dw_parts, n_rows, n_cols, rows_per_program,
                x2.stride(0), grad2.stride(0), dhidden2.stride(0) if dhidden2 is not None else 0, dx.stride(0),
                ddelta.stride(0) if ddelta is not None else 0,
                ADD=add, HAS_DHIDDEN=dhidden2 is not None, STORE_DDELTA=ddelta is not None,
                ROUND=_TL_DTYPES[round_dtype], BLOCK=next_power_of_2(n_cols), num_warps=num_warps,
            )
    return dx, ddelta, dw_parts


class _RMSNormTriton(torch.autograd.Function):
    """weight * rms_norm(x).to(dtype), as the model's MambaRMSNorm computes it; keeps x and 1/rms per row."""

    @staticmethod
    def forward(ctx, x, weight, eps, dtype, out_dtype):
        x2 = _rows(x, x.shape[-1])  # (rows, n_cols)
        _, out, rstd = _norm_fwd(x2, None, weight, eps, dtype, out_dtype, store_rstd=True)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.dtype, ctx.shape = dtype, x.shape
        return out.view_as(x)  # view_as: less host time than view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw_parts = _norm_bwd(x2, weight, rstd, grad, None, ctx.dtype, add=False)
        dweight = dw_parts.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (n_cols,)
        return dx.view(ctx.shape), dweight, None, None, None  # eps and the dtypes: not tensors


class _AddRMSNormTriton(torch.autograd.Function):
    """(residual + delta, weight * rms_norm(residual + delta).to(weight.dtype)); keeps the sum (the
    residual stream keeps it anyway) and 1/rms per row."""

    @staticmethod
    def forward(ctx, residual, delta, weight, eps, out_dtype):
        n_cols = residual.shape[-1]
        res2, delta2 = _rows(residual, n_cols), _rows(delta, n_cols)  # (rows, n_cols)
        hidden, normed, rstd = _norm_fwd(res2, delta2, weight, eps, weight.dtype, out_dtype, store_rstd=True)
        ctx.save_for_backward(hidden, weight, rstd)
        ctx.set_materialize_grads(False)  # the sum's gradient is None where only the norm reads it
        ctx.dtypes, ctx.shape = (residual.dtype, delta.dtype), residual.shape
        return hidden.view_as(residual), normed.view_as(residual)

    @staticmethod
    def backward(ctx, dhidden, dnormed):
        hidden, weight, rstd = ctx.saved_tensors
        res_dtype, delta_dtype = ctx.dtypes
        if dnormed is None:
            dnormed = torch.zeros_like(hidden, dtype=weight.dtype)
        dsum, ddelta, dw_parts = _norm_bwd(hidden, weight, rstd, dnormed, dhidden, weight.dtype, True, delta_dtype)
        dweight = dw_parts.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None  # (n_cols,)
        dres = dsum.view(ctx.shape).to(res_dtype)  # a no-op unless residual was narrower than the sum
        # The sum's gradient reaches both inputs; where their dtypes agree it is one tensor.
        ddelta = ddelta.view(ctx.shape) if ddelta is not None else dsum.view(ctx.shape)
        return dres, ddelta, dweight, None, None  # eps, out_dtype: not tensors


def rms_norm_train_triton(x, weight, eps, dtype):
    """weight * rms_norm(x, eps).to(dtype) with autograd, x fp32 (or any float but fp64) holding values
    of dtype; the output's dtype is promote(weight.dtype, dtype), as the model's ops give."""
    out_dtype = torch.promote_types(weight.dtype, dtype)
    return _RMSNormTriton.apply(x, weight.contiguous(), float(eps), dtype, out_dtype)


def rms_norm_triton(x, weight, eps, dtype):
    """`rms_norm_train_triton`'s forward without autograd: one launch (the first block's norm of a decode
    step, where the PyTorch ops take seven)."""
    x2 = _rows(x, x.shape[-1])  # (rows, n_cols)
    out_dtype = torch.promote_types(weight.dtype, dtype)
    _, out, _ = _norm_fwd(x2, None, weight.contiguous(), float(eps), dtype, out_dtype, store_rstd=False)
    return out.view_as(x)


def _three_norms_launch(kernel, x2, other2, sizes, eps):
    """kernel over the rows of x2 and other2 (the output, or the gradient updated in place), about 4K elements
    a program."""
    n_rows, n_cols = x2.shape
    block = next_power_of_2(n_cols)
    block_r = max(1, min(64, 4096 // block))
    if n_rows:
        with device_guard(x2):
            launch(
                kernel, (cdiv(n_rows, block_r),),
                x2, other2, n_rows, n_cols, sizes[0], sizes[0] + sizes[1], float(eps), x2.stride(0), other2.stride(0),
                BLOCK_R=block_r, BLOCK=block,
            )


def weightless_rms_norms_triton(x, sizes, eps):
    """x (..., sum(sizes)) with its three column groups `sizes` each divided by their rms, in fp32, rounded to
    x's dtype; one launch (the PyTorch ops take three per group), no autograd. A new contiguous tensor."""
    x2 = _rows(x, x.shape[-1])
    out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    _three_norms_launch(_three_norms_kernel, x2, out, sizes, eps)
    return out.view_as(x)


def weightless_rms_norms_backward_triton_(grad, x, sizes, eps):
    """In place: grad (rows, sum(sizes)), with unit column stride, the gradient of `weightless_rms_norms_triton`'s
    output, becomes the gradient of its input x (rows, sum(sizes)); fp32 math, one launch."""
    _three_norms_launch(_three_norms_bwd_kernel, _rows(x, x.shape[-1]), grad, sizes, eps)
    return grad


def add_rms_norm_train_triton(residual, delta, weight, eps, out_dtype=None):
    """Triton path of `hf_mamba.kernels.add_rms_norm` with autograd."""
    return _AddRMSNormTriton.apply(residual, delta, weight.contiguous(), float(eps), out_dtype or weight.dtype)


def _add_rms_norm(residual, delta, weight, eps, out_dtype=None, delta_scale=None):
    n_cols = residual.shape[-1]
    res2, delta2 = _rows(residual, n_cols), _rows(delta, n_cols)
    if delta_scale is not None:
        delta_scale = delta_scale.reshape(-1).float().contiguous()  # one fp32 value per row
    out_dtype = out_dtype or weight.dtype
    hidden, normed, _ = _norm_fwd(res2, delta2, weight, eps, weight.dtype, out_dtype, False, delta_scale)
    return hidden.view_as(residual), normed.view_as(residual)  # view_as: less host time than view(shape)


@torch.library.custom_op("hf_mamba::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return _add_rms_norm(residual, delta, weight, eps, out_dtype)


@add_rms_norm_op.register_fake
def _(residual, delta, weight, eps, out_dtype):
    dtype = torch.promote_types(residual.dtype, delta.dtype)
    return residual.new_empty(residual.shape, dtype=dtype), residual.new_empty(residual.shape, dtype=out_dtype)


def add_rms_norm_triton(residual, delta, weight, eps, out_dtype=None, delta_scale=None):
    """Triton path of `hf_mamba.kernels.add_rms_norm` without autograd."""
    args = (residual, delta, weight.contiguous(), float(eps), out_dtype or weight.dtype)
    if torch.compiler.is_compiling():
        if delta_scale is not None:  # add_rms_norm takes the PyTorch ops for it there
            raise ValueError("delta_scale is not supported under torch.compile here: call add_rms_norm")
        return add_rms_norm_op(*args)  # the op torch.compile / export trace through
    return _add_rms_norm(*args, delta_scale=delta_scale)  # eager: no custom-op dispatch on the host


__all__ = [
    "add_rms_norm_train_triton", "add_rms_norm_triton", "rms_norm_train_triton", "rms_norm_triton",
    "weightless_rms_norms_backward_triton_", "weightless_rms_norms_triton",
]
