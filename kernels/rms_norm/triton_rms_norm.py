"""add_rms_norm in Triton: one program per row, the row in registers (hidden_size up to 64K)."""

import torch
import triton
import triton.language as tl

from .._launch import device_guard, next_power_of_2


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
            _add_rms_norm_kernel[(res2.shape[0],)](
                res2, delta2, weight, hidden, normed,
                n_cols, eps,
                res2.stride(0), delta2.stride(0), hidden.stride(0), normed.stride(0),
                BLOCK=next_power_of_2(n_cols), num_warps=4 if n_cols <= 4096 else 8,
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


__all__ = ["add_rms_norm_triton"]
