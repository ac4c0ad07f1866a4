"""One decoding step of the selective SSM in Triton, registered as a torch.library custom op.

Glossary as in `triton_scan`: x is u at one step, dt is Δ, state is h (batch, d_inner, d_state).
    h <- exp(Δ A) h + Δ x B;   y = C . h + D x,   y *= SiLU(z)
With A_is_log the kernel reads A_log and computes A = -exp(A_log) itself, as the training scan kernels do:
the model's decode step then launches no exp and negation kernels for A.

One program per (batch, block of BLOCK_D channels); the state tile is read once and written once
in place. No host synchronisation and fixed launch parameters per shape, so the step can be
captured in a CUDA graph.
"""


import torch
import triton
import triton.language as tl

from .._launch import cdiv, device_guard, launch, next_power_of_2
from ..triton_utils import log2_rate, softplus


@triton.jit
def _selective_state_update_kernel(
    p_state, p_x, p_dt, p_A, p_B, p_C, p_D, p_z, p_dt_bias, p_y,
    d_inner, d_state,
    s_h_b, s_h_d, s_h_n,
    s_x_b, s_x_d,
    s_dt_b, s_dt_d,
    s_A_d, s_A_n,
    s_B_b, s_B_n,
    s_C_b, s_C_n,
    s_z_b, s_z_d,
    s_y_b, s_y_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    A_LOG: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b = tl.program_id(0)
    i_d = tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, BLOCK_N)
    m_d = o_d < d_inner
    m_n = o_n < d_state
    m_dn = m_d[:, None] & m_n[None, :]

    p_h = p_state + i_b * s_h_b + o_d[:, None] * s_h_d + o_n[None, :] * s_h_n
    b_h = tl.load(p_h, mask=m_dn, other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_N)
    b_x = tl.load(p_x + i_b * s_x_b + o_d * s_x_d, mask=m_d, other=0.0).to(tl.float32)
    b_dt = tl.load(p_dt + i_b * s_dt_b + o_d * s_dt_d, mask=m_d, other=0.0).to(tl.float32)
    # A (or A_log) pre-scaled by log2(e), exp(ΔA) = exp2(Δ a): the arithmetic of the training scan kernels
    # (`log2_rate`), so that decode and prefill compute the decay alike. Under the interpreter tl.exp and
    # tl.exp2 are numpy's (exact to rounding); on a GPU both are ex2-based, as in the training kernels.
    b_a = log2_rate(
        tl.load(p_A + o_d[:, None] * s_A_d + o_n[None, :] * s_A_n, mask=m_dn, other=0.0).to(tl.float32), A_LOG
    )  # (BLOCK_D, BLOCK_N)
    b_B = tl.load(p_B + i_b * s_B_b + o_n * s_B_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(p_C + i_b * s_C_b + o_n * s_C_n, mask=m_n, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        b_dt += tl.load(p_dt_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        b_dt = softplus(b_dt, False)
    b_h = tl.exp2(b_dt[:, None] * b_a) * b_h + (b_dt * b_x)[:, None] * b_B[None, :]
    tl.store(p_h, b_h.to(p_state.dtype.element_ty), mask=m_dn)
    b_y = tl.sum(b_h * b_C[None, :], axis=1)  # (BLOCK_D,)
    if HAS_D:
        b_y += b_x * tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_Z:
        b_z = tl.load(p_z + i_b * s_z_b + o_d * s_z_d, mask=m_d, other=0.0).to(tl.float32)
        b_y = b_y * b_z * tl.sigmoid(b_z)
    tl.store(p_y + i_b * s_y_b + o_d * s_y_d, b_y.to(p_y.dtype.element_ty), mask=m_d)


def _config(d_state):
    block_n = next_power_of_2(d_state)
    # 32 channels per program (mamba_ssm's choice for d_state 16): at batch 1 and d_inner 1536, 48 programs
    # instead of 24 with 64 channels (docs/kernels.md, "Decode step").
    block_d = max(1, min(32, 1024 // block_n))
    return block_d, block_n, 4


def _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log=False, out_dtype=None):
    """Updates `state` in place; returns y (batch, d_inner) in x's dtype (or out_dtype). With A_is_log, A holds A_log
    (A = -exp(A_log), computed in the kernel)."""
    batch, d_inner = x.shape
    d_state = A.shape[1]
    block_d, block_n, num_warps = _config(d_state)
    y = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    z_ = z if z is not None else x
    grid = (batch, cdiv(d_inner, block_d))
    with device_guard(x):
        launch(
            _selective_state_update_kernel, grid,
            state, x, dt, A, B, C, D, z, dt_bias, y,
            d_inner, d_state,
            *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(), *z_.stride(),
            *y.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
            A_LOG=A_is_log, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps,
        )
    return y


@torch.library.custom_op("hf_mamba::selective_state_update", mutates_args=("state",))
def selective_state_update_op(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    A_is_log: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    return _state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log, out_dtype)


@selective_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log=False, out_dtype=None):
    return torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)


def selective_state_update_triton(
    state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log=False, out_dtype=None
):
    """Triton decode step; same semantics as `hf_mamba.kernels.selective_state_update` (backend="triton")."""
    args = (state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), bool(A_is_log), out_dtype)
    if torch.compiler.is_compiling():
        return selective_state_update_op(*args)  # the op torch.compile / export trace through
    return _state_update(*args)  # eager: no custom-op dispatch on the host


__all__ = ["selective_state_update_triton"]
