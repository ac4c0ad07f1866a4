"""Selective scan: the one entry to the SSM, with interchangeable backends.

Backends:
    "reference"  exact sequential loop in fp32 (tests)
    "torch"      chunked PyTorch scan (CPU default)
    "triton"     Triton kernels (CUDA default; CPU tensors only under TRITON_INTERPRET=1)
    None         the fastest one available for the tensors' device
"""

import os

import torch

from ..checks import check_out_dtype, check_shapes, check_tensors
from .reference import fp32_or_wider, selective_scan_ref, selective_state_update_ref
from .torch_scan import selective_scan_torch

BACKENDS = ("reference", "torch", "triton")


def triton_available(device) -> bool:
    """Whether the Triton kernels can run on `device` (CUDA, or any device under TRITON_INTERPRET=1)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, device) -> str:
    """Turn a requested backend (or None) into the name of the implementation to run on `device`."""
    if backend is None:
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and not triton_available(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors) and an installed "
            f"triton; got tensors on {device}"
        )
    return backend


_triton = None  # (selective_scan_triton, selective_state_update_triton) once imported


def _triton_entries():
    """The Triton entry points, imported on first use (the PyTorch paths need no Triton) and kept, since an
    import statement costs host time on every call. A module global rather than functools.cache, which
    torch.compile warns about when it traces through."""
    global _triton
    if _triton is None:
        from .triton_scan import selective_scan_triton
        from .triton_state_update import selective_state_update_triton

        _triton = selective_scan_triton, selective_state_update_triton
    return _triton


def _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx=None):
    check_tensors(
        u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state
    )
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, d_inner, seqlen), got {tuple(u.shape)}")
    batch, d_inner, seqlen = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must have shape (d_inner={d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    check_shapes(
        ("delta", delta, (batch, d_inner, seqlen)),
        ("B", B, (batch, d_state, seqlen)),
        ("C", C, (batch, d_state, seqlen)),
        ("D", D, (d_inner,)),
        ("z", z, (batch, d_inner, seqlen)),
        ("delta_bias", delta_bias, (d_inner,)),
        ("initial_state", initial_state, (batch, d_inner, d_state)),
    )
    if seq_idx is not None:
        if tuple(seq_idx.shape) != (batch, seqlen):
            raise ValueError(f"seq_idx must have shape {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
        if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must hold integer document ids, got dtype {seq_idx.dtype}")
        if seq_idx.device != u.device:
            raise ValueError(f"seq_idx is on {seq_idx.device} but u is on {u.device}: pass every tensor on one device")


def selective_scan(
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
    backend=None,
    seq_idx=None,
    A_is_log=False,
    out_dtype=None,
):
    """Selective scan y = SSM(Ā, B̄, C)(u) with ZOH discretisation (Ā = exp(ΔA), B̄u = ΔBu).

    Args:
        u, delta, z: (batch, d_inner, seqlen), any float dtype.
        A: (d_inner, d_state), normally -exp(A_log), fp32.
        B, C: (batch, d_state, seqlen).
        D, delta_bias: (d_inner,).
        delta_softplus: apply softplus to delta + delta_bias.
        initial_state: (batch, d_inner, d_state), the state before the first step (zeros if None).
        return_final_state: also return the state after the last step.
        backend: "reference", "torch", "triton" or None (fastest for the device).
        seq_idx: optional (batch, seqlen) integer document ids of packed sequences: where the id
            changes the state is reset to zero, so documents do not leak into each other
            (initial_state feeds the first document only). No gradient.
        A_is_log: A holds A_log, A = -exp(A_log) (the model's parameter). Without gradients the Triton kernels
            compute A themselves (no exp and negation launches); otherwise A is computed here first.
        out_dtype: y's dtype, by default u's (fp32 for fp16 inputs where y may pass fp16's range:
            `hf_mamba.kernels.fp16_range`).

    Returns:
        y (batch, d_inner, seqlen) in u's dtype (or out_dtype), or (y, final_state) with final_state fp32
        (batch, d_inner, d_state). Every float input gets a gradient.
    """
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx)
    check_out_dtype(out_dtype)
    name = resolve_backend(backend, u.device)
    # An empty sequence, batch, channel or state has nothing to scan: the PyTorch path returns the empty (or
    # skip-only, without a state) outputs and their gradients without launching kernels, whose tiles assume
    # at least one element along each dimension.
    if name == "triton" and (u.numel() == 0 or A.shape[1] == 0):
        name = "torch"
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if A_is_log and (
        name != "triton"
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    ):
        A, A_is_log = -torch.exp(fp32_or_wider(A)), False
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state)
    if name == "reference":
        return selective_scan_ref(*args, seq_idx=seq_idx, out_dtype=out_dtype)
    if name == "torch":
        return selective_scan_torch(*args, seq_idx=seq_idx, out_dtype=out_dtype)
    return _triton_entries()[0](*args, seq_idx=seq_idx, A_is_log=A_is_log, out_dtype=out_dtype)


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend=None, A_is_log=False,
    out_dtype=None,
):
    """One recurrent step of the selective SSM, for decoding.

    Args:
        state: (batch, d_inner, d_state), updated in place (keep it fp32).
        x, dt, z: (batch, d_inner).
        A: (d_inner, d_state). B, C: (batch, d_state). D, dt_bias: (d_inner,).
        A_is_log: A holds A_log, A = -exp(A_log) (the model's parameter; the Triton kernel computes A
            itself, so the caller launches no exp and negation kernels). Same shape as A.
        out_dtype: y's dtype, by default x's.

    Returns:
        y (batch, d_inner).
    """
    check_tensors(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    check_out_dtype(out_dtype)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (batch, d_inner), got {tuple(x.shape)}")
    if A.dim() != 2:
        raise ValueError(f"A must have shape (d_inner, d_state), got {tuple(A.shape)}")
    batch, d_inner = x.shape
    d_state = A.shape[-1]
    check_shapes(
        ("state", state, (batch, d_inner, d_state)),
        ("dt", dt, (batch, d_inner)),
        ("A", A, (d_inner, d_state)),
        ("B", B, (batch, d_state)),
        ("C", C, (batch, d_state)),
        ("D", D, (d_inner,)),
        ("z", z, (batch, d_inner)),
        ("dt_bias", dt_bias, (d_inner,)),
    )
    args = (state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log, out_dtype)
    # One step is already fully vectorised in PyTorch: "torch" and "reference" share the code. It also
    # takes the empty cases (no state: y is the skip alone), which the kernel's tiles do not.
    if resolve_backend(backend, x.device) in ("reference", "torch") or x.numel() == 0 or d_state == 0:
        return selective_state_update_ref(*args)
    return _triton_entries()[1](*args)


__all__ = [
    "BACKENDS",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_torch",
    "selective_state_update",
    "selective_state_update_ref",
]
