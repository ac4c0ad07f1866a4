"""RMSNorm in Triton, the row in registers (hidden_size up to 64K).

- add_rms_norm: the decode step's residual add + norm, one program per row, no autograd.
- rms_norm_train: the training norm (forward and backward, one launch each plus the weight gradient's
  sum): on the PyTorch ops the backward takes about ten kernels per norm, and a 24-layer model's
  training step is host-bound on launches.
"""

import torch
import triton
import triton.language as tl

from .._launch import cdiv, device_guard, launch, next_power_of_2, sm_count


def _num_warps(n_cols):
    """Warps for one program holding a row of n_cols (BLOCK = next power of two) in registers."""
    return 4 if n_cols <= 4096 else 8


@triton.jit
def _add_rms_norm_kernel(
    p_res, p_delta, p_w, p_hidden, p_normed,
    n_cols, eps,
    s_res, s_delta, s_hidden, s_normed,
    BLOCK: tl.constexpr,
):
    i_row = tl.program_id(0).to(tl.int64)
    o_c = tl.arange(0, BLOCK)
    m_c = o_c < n_cols
    b_res = tl.load(p_res + i_row * s_res + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_delta = tl.load(p_delta + i_row * s_delta + o_c, mask=m_c, other=0.0).to(tl.float32)
    # The sum is rounded to the hidden dtype, then to the norm's dtype, as the blocks' ops round it.
    b_hidden = (b_res + b_delta).to(p_hidden.dtype.element_ty)
    tl.store(p_hidden + i_row * s_hidden + o_c, b_hidden, mask=m_c)
    b_x = b_hidden.to(p_normed.dtype.element_ty).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / n_cols + eps)
    b_n = (b_x * b_rstd).to(p_normed.dtype.element_ty).to(tl.float32)
    b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)
    tl.store(p_normed + i_row * s_normed + o_c, (b_w * b_n).to(p_normed.dtype.element_ty), mask=m_c)


def _add_rms_norm(residual, delta, weight, eps):
    n_cols = residual.shape[-1]
    res2, delta2 = residual.reshape(-1, n_cols), delta.reshape(-1, n_cols)
    hidden = torch.empty(res2.shape, dtype=torch.promote_types(residual.dtype, delta.dtype), device=residual.device)
    normed = torch.empty(res2.shape, dtype=weight.dtype, device=residual.device)
    if res2.shape[0]:
        with device_guard(residual):
            launch(
                _add_rms_norm_kernel, (res2.shape[0],),
                res2, delta2, weight, hidden, normed,
                n_cols, eps,
                res2.stride(0), delta2.stride(0), hidden.stride(0), normed.stride(0),
                BLOCK=next_power_of_2(n_cols), num_warps=_num_warps(n_cols),
            )
    return hidden.view(residual.shape), normed.view(residual.shape)


@torch.library.custom_op("hf_mamba::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _add_rms_norm(residual, delta, weight, eps)


@add_rms_norm_op.register_fake
def _(residual, delta, weight, eps):
    dtype = torch.promote_types(residual.dtype, delta.dtype)
    return residual.new_empty(residual.shape, dtype=dtype), residual.new_empty(residual.shape, dtype=weight.dtype)


def add_rms_norm_triton(residual, delta, weight, eps):
    """Triton path of `hf_mamba.kernels.add_rms_norm`. Rows need a unit stride along hidden_size."""
    args = (residual.contiguous(), delta.contiguous(), weight.contiguous(), float(eps))
    if torch.compiler.is_compiling():
        return add_rms_norm_op(*args)  # the op torch.compile / export trace through
    return _add_rms_norm(*args)  # eager: no custom-op dispatch on the host


@triton.jit
def _rms_norm_fwd_kernel(
    p_x, p_w, p_out, p_rstd, n_rows, n_cols, rows_per_program, eps, s_x, s_out,
    ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    # out = w * (x * rstd).to(ROUND): normalised in fp32, rounded to the input's dtype, then scaled.
    o_c = tl.arange(0, BLOCK)
    m_c = o_c < n_cols
    b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)
    for r in range(rows_per_program):
        i_row = tl.program_id(0).to(tl.int64) * rows_per_program + r
        if i_row < n_rows:
            b_x = tl.load(p_x + i_row * s_x + o_c, mask=m_c, other=0.0).to(tl.float32)
            b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / n_cols + eps)
            b_n = (b_x * b_rstd).to(ROUND).to(tl.float32)
            tl.store(p_out + i_row * s_out + o_c, (b_w * b_n).to(p_out.dtype.element_ty), mask=m_c)
            tl.store(p_rstd + i_row, b_rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    p_x, p_w, p_rstd, p_grad, p_dx, p_dw, n_rows, n_cols, rows_per_program, s_x, s_grad, s_dx,
    ROUND: tl.constexpr, BLOCK: tl.constexpr,
):
    # With n = x rstd and dn = (grad w).to(ROUND): dx = rstd (dn - n mean(dn n)), dw = sum_rows grad n.to(ROUND)
    # (this program's rows; the host adds the programs' partial sums).
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
            tl.store(p_dx + i_row * s_dx + o_c, b_dx.to(p_dx.dtype.element_ty), mask=m_c)
    tl.store(p_dw + i_prog * n_cols + o_c, b_dw, mask=m_c)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _row_launch(x):
    """(programs, rows per program, num_warps) for the rows of x (n_rows, n_cols): a few programs per
    multiprocessor, so that the weight gradient's partial sums stay small."""
    n_rows, n_cols = x.shape
    rows_per_program = max(1, cdiv(n_rows, 4 * sm_count(x.device)))
    return cdiv(n_rows, rows_per_program), rows_per_program, _num_warps(n_cols)


def _rows(t, n_cols):
    """t as (rows, n_cols) with unit stride along n_cols (the kernels' row layout)."""
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _RMSNormTriton(torch.autograd.Function):
    """weight * rms_norm(x).to(dtype), as the model's MambaRMSNorm computes it; keeps x and 1/rms per row."""

    @staticmethod
    def forward(ctx, x, weight, eps, dtype):
        n_cols = x.shape[-1]
        x2 = _rows(x, n_cols)  # (rows, n_cols)
        out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        programs, rows_per_program, num_warps = _row_launch(x2)
        if x2.shape[0]:
            with device_guard(x):
                launch(
                    _rms_norm_fwd_kernel, (programs,),
                    x2, weight, out, rstd, x2.shape[0], n_cols, rows_per_program, eps, x2.stride(0), out.stride(0),
                    ROUND=_TL_DTYPES[dtype], BLOCK=next_power_of_2(n_cols), num_warps=num_warps,
                )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.dtype, ctx.shape = dtype, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        grad2 = _rows(grad, n_cols)
        dx = torch.empty_like(x2)
        programs, rows_per_program, num_warps = _row_launch(x2)
        dw_parts = torch.empty(programs, n_cols, dtype=torch.float32, device=x2.device)  # per program
        if n_rows:
            with device_guard(x2):
                launch(
                    _rms_norm_bwd_kernel, (programs,),
                    x2, weight, rstd, grad2, dx, dw_parts, n_rows, n_cols, rows_per_program,
                    x2.stride(0), grad2.stride(0), dx.stride(0),
                    ROUND=_TL_DTYPES[ctx.dtype], BLOCK=next_power_of_2(n_cols), num_warps=num_warps,
                )
        dweight = dw_parts.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (n_cols,)
        return dx.view(ctx.shape), dweight, None, None  # eps and dtype: not tensors


def rms_norm_train_triton(x, weight, eps, dtype):
    """weight * rms_norm(x, eps).to(dtype) with autograd, x fp32 (or any float but fp64) and rows of unit
    stride; the output's dtype is promote(weight.dtype, dtype), as the model's ops give."""
    return _RMSNormTriton.apply(x, weight.contiguous(), float(eps), dtype)


__all__ = ["add_rms_norm_triton", "rms_norm_train_triton"]
