"""Exact PyTorch references for the selective scan: a plain sequential loop in fp32.

Glossary (paper notation, Gu & Dao 2023, Algorithm 2):
    u      input sequence x_t                      (batch, d_inner, seqlen)
    delta  step size Δ_t (before bias / softplus)  (batch, d_inner, seqlen)
    A      state matrix, diagonal, negative real   (d_inner, d_state)
    B, C   input / output projections per step     (batch, d_state, seqlen)
    D      skip connection                         (d_inner,)
    z      gate, output multiplied by SiLU(z)      (batch, d_inner, seqlen)
    h      hidden state                            (batch, d_inner, d_state)

Zero-order hold: Ā = exp(Δ A); B̄ u ≈ Δ B u (the simplification the paper uses for B).
These functions are slow on purpose: one time step at a time, every product in fp32,
so every faster path is tested against them.
"""

import torch
import torch.nn.functional as F


def fp32_or_wider(t):
    """t in fp32, or fp64 if it already is: half-precision inputs are computed in fp32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def effective_delta(delta, delta_bias, delta_softplus):
    """Δ after the optional bias and softplus, in fp32 (fp64 for fp64 inputs)."""
    delta = fp32_or_wider(delta)
    if delta_bias is not None:
        delta = delta + fp32_or_wider(delta_bias)[..., None] if delta.dim() == 3 else delta + fp32_or_wider(delta_bias)
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def finish_output(y, u, D, z, out_dtype):
    """Add the D skip, gate by SiLU(z), cast to out_dtype (the input's, unless the caller asked another)."""
    if D is not None:
        y = y + fp32_or_wider(u) * (fp32_or_wider(D)[..., None] if u.dim() == 3 else fp32_or_wider(D))
    if z is not None:
        y = y * F.silu(fp32_or_wider(z))
    return y.to(out_dtype)


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
    seq_idx=None,
    out_dtype=None,
):
    """Sequential selective scan; same signature and semantics as `hf_mamba.kernels.selective_scan`.

    seq_idx: optional (batch, seqlen) integer document ids of packed sequences; where it changes
    from t - 1 to t the state is reset to zero before step t (documents do not see each other).
    """
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    delta = effective_delta(delta, delta_bias, delta_softplus)  # (batch, d_inner, seqlen)
    u_f, A_f, B_f, C_f = fp32_or_wider(u), fp32_or_wider(A), fp32_or_wider(B), fp32_or_wider(C)
    if initial_state is None:
        h = u_f.new_zeros(batch, d_inner, d_state)
    else:
        h = fp32_or_wider(initial_state)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(h.dtype)  # (batch,)
            h = h * keep[:, None, None]
        dA = torch.exp(delta[:, :, t, None] * A_f)  # (batch, d_inner, d_state)
        dBu = (delta[:, :, t] * u_f[:, :, t])[:, :, None] * B_f[:, None, :, t]  # (batch, d_inner, d_state)
        h = dA * h + dBu
        ys.append(torch.einsum("bdn,bn->bd", h, C_f[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u_f.new_zeros(batch, d_inner, 0)  # (batch, d_inner, seqlen)
    out = finish_output(y, u, D, z, out_dtype or u.dtype)
    return (out, h) if return_final_state else out


def selective_state_update_ref(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, A_is_log=False, out_dtype=None
):
    """One recurrent step; updates `state` in place and returns y (batch, d_inner) in x's dtype (or out_dtype).
    With A_is_log, A holds A_log (A = -exp(A_log))."""
    delta = effective_delta(dt, dt_bias, dt_softplus)  # (batch, d_inner)
    A = -torch.exp(fp32_or_wider(A)) if A_is_log else fp32_or_wider(A)
    dA = torch.exp(delta[:, :, None] * A)  # (batch, d_inner, d_state)
    dBx = (delta * fp32_or_wider(x))[:, :, None] * fp32_or_wider(B)[:, None, :]  # (batch, d_inner, d_state)
    h = dA * fp32_or_wider(state) + dBx
    state.copy_(h)
    y = torch.einsum("bdn,bn->bd", h, fp32_or_wider(C))  # (batch, d_inner)
    return finish_output(y, x, D, z, out_dtype or x.dtype)
