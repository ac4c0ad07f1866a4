"""Selective scan in Triton: the dispatch between the recurrent and the chunk kernels, registered as
torch.library custom ops (what torch.compile and torch.export trace) and as an autograd Function (what
eager mode runs).

Glossary (paper notation, Gu & Dao 2023, Algorithm 2):
    u      input x_t                                (batch, d_inner, seqlen)
    delta  step size Δ_t, before bias / softplus    (batch, d_inner, seqlen)
    A      diagonal state matrix (negative)         (d_inner, d_state)
    B, C   input / output projections               (batch, d_state, seqlen)
    D      skip, z the SiLU gate, h the state       (d_inner,), like u, (batch, d_inner, d_state)
    a_t    Ā_t = exp(Δ_t A)    b_t = Δ_t u_t B_t    h_t = a_t h_{t-1} + b_t    y_t = C_t . h_t

The forward runs the recurrent kernel (`recurrent_fwd`: a channel's state in one thread's registers)
up to d_state 64 and the chunk kernel (`chunk`) above; the backward the recurrent kernel
(`recurrent_bwd`) up to d_state 16 and the chunk kernel above (docs/kernels.md, "Design"). Either
forward stores h at every start of a chunk of the backward, (batch, d_inner, n_chunks, d_state)
fp32, chunk times smaller than all the states; the backward recomputes the rest from there.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._launch import cdiv, device_guard
from .chunk import ChunkTuning, chunk_config, scan_bwd_chunk, scan_fwd_chunk
from .recurrent_bwd import RecurrentBwdTuning, scan_bwd_recurrent
from .recurrent_fwd import RecurrentFwdTuning, scan_fwd_recurrent


@dataclass(frozen=True)
class ScanTuning:
    """Which kernels the scan runs and how they are launched (a sweep passes its own).

    recurrent_fwd_max_d_state: up to this d_state the forward runs the recurrent kernel (d_state fp32
        values per thread, or per lane group); above it the chunk kernel.
    recurrent_bwd_max_d_state: likewise for the backward, whose recurrent kernel holds more per state.
    fwd, bwd, chunk: each kernel's own launch choices.
    """

    recurrent_fwd_max_d_state: int = 64
    recurrent_bwd_max_d_state: int = 16
    fwd: RecurrentFwdTuning = RecurrentFwdTuning()
    bwd: RecurrentBwdTuning = RecurrentBwdTuning()
    chunk: ChunkTuning = ChunkTuning()


DEFAULT_TUNING = ScanTuning()


class ScanGrads(NamedTuple):
    """The scan's gradients; absent inputs get empty tensors."""

    du: torch.Tensor
    ddelta: torch.Tensor
    dA: torch.Tensor
    dB: torch.Tensor
    dC: torch.Tensor
    dD: torch.Tensor
    dz: torch.Tensor
    ddelta_bias: torch.Tensor
    dinitial_state: torch.Tensor


def checkpoint_len(seqlen, tuning=DEFAULT_TUNING):
    """Steps between the states the forward stores for the backward (the chunk kernels' chunk)."""
    return chunk_config(seqlen, tuning.chunk)[1]


def scan_fwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx, A_is_log=False,
    tuning=DEFAULT_TUNING, out_dtype=None,
):
    """(out, final_state, chunk_states); chunk_states is empty unless save_states. With A_is_log, A holds
    A_log (A = -exp(A_log), computed inside the kernels: the training mixer passes its parameter as it is).
    out is in u's dtype, or out_dtype (the training mixer asks fp32 of fp16 inputs: y may pass fp16's range)."""
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    ckpt_len = checkpoint_len(seqlen, tuning)
    if save_states:
        chunk_states = u.new_empty(batch, d_inner, cdiv(seqlen, ckpt_len), d_state, dtype=torch.float32)
    else:
        chunk_states = u.new_empty(0, dtype=torch.float32)
    if d_state <= tuning.recurrent_fwd_max_d_state:
        out, final_state = scan_fwd_recurrent(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, ckpt_len, seq_idx,
            A_is_log, tuning.fwd, out_dtype,
        )
    else:
        out, final_state = scan_fwd_chunk(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, seq_idx, A_is_log,
            tuning.chunk, out_dtype,
        )
    return out, final_state, chunk_states


def scan_bwd(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx, y_out=None,
    need_dinitial=True, dBC_out=None, dz_out=None, A_is_log=False, tuning=DEFAULT_TUNING,
):
    """The scan's gradients (`ScanGrads`) from the forward's checkpoints.

    For a caller that fuses the scan with its neighbours (`mamba_inner`), outputs can go straight
    where it needs them: y_out, laid out as torch.empty_like(u), also receives the forward's output
    (the backward recomputes it for dz anyway); with dBC_out (batch, seqlen, 2, d_state) dB and dC
    are written there and come back empty, and likewise dz with dz_out (batch, d_inner, seqlen).
    Without need_dinitial the initial state's gradient may come back empty. With A_is_log, A holds
    A_log and dA is A_log's gradient. Outputs may share storage (see `_distinct`)."""
    d_state = A.shape[1]
    if d_state <= tuning.recurrent_bwd_max_d_state:
        grads = scan_bwd_recurrent(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, checkpoint_len(u.shape[2], tuning),
            dout, dfinal_state, seq_idx, y_out, need_dinitial, dBC_out, dz_out, A_is_log, tuning.bwd,
        )
    else:
        grads = scan_bwd_chunk(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx,
            y_out, dBC_out, dz_out, A_is_log, tuning.chunk,
        )
    return ScanGrads._make(grads)


@torch.library.custom_op("hf_mamba::selective_scan_fwd", mutates_args=())
def selective_scan_fwd_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    save_states: bool,
    seq_idx: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, final_state, chunk_states); chunk_states is empty unless save_states."""
    with device_guard(u):
        return scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx,
            out_dtype=out_dtype,
        )


@selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx, out_dtype=None):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    n_chunks = cdiv(seqlen, checkpoint_len(seqlen))
    out = torch.empty_like(u, dtype=out_dtype)
    final_state = u.new_empty(batch, d_inner, d_state, dtype=torch.float32)
    shape = (batch, d_inner, n_chunks, d_state) if save_states else (0,)
    return out, final_state, u.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("hf_mamba::selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk_states: torch.Tensor,
    dout: torch.Tensor,
    dfinal_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); absent inputs get empty tensors."""
    with device_guard(u):
        return _distinct(scan_bwd(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx
        ))


def _distinct(tensors):
    """The tensors as a custom op must return them: none aliasing another and none at an offset into
    its storage (the fake kernel's fresh tensors). The backward returns views into one buffer for the
    small gradients; those are copied out."""
    seen = set()
    out = []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out.append(t.clone() if ptr in seen or t.storage_offset() else t)
        seen.add(ptr)
    return tuple(out)


@selective_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_states, dout, dfinal_state, seq_idx):
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    empty = u.new_empty(0)
    if d_state <= DEFAULT_TUNING.recurrent_bwd_max_d_state:  # du, ddelta, dz in u's layout
        du, ddelta = torch.empty_like(u), torch.empty_like(u, dtype=delta.dtype)
        dz = torch.empty_like(u, dtype=z.dtype) if z is not None else empty
    else:
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
        dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else empty
    return (
        du,
        ddelta,
        torch.empty_like(A, memory_format=torch.contiguous_format),
        torch.empty_like(B, memory_format=torch.contiguous_format),
        torch.empty_like(C, memory_format=torch.contiguous_format),
        torch.empty_like(D) if D is not None else empty,
        dz,
        torch.empty_like(delta_bias) if delta_bias is not None else empty,
        u.new_empty(batch, d_inner, d_state, dtype=torch.float32),
    )


def _input_grads(ctx, grads):
    """The scan's gradients (`ScanGrads`) in the order of the forward op's inputs."""
    g = ScanGrads._make(grads)
    return (
        g.du, g.ddelta, g.dA, g.dB, g.dC,
        g.dD if ctx.has_D else None,
        g.dz if ctx.has_z else None,
        g.ddelta_bias if ctx.has_delta_bias else None,
        None,  # delta_softplus: a flag
        g.dinitial_state if ctx.has_initial_state else None,
        None,  # save_states: a flag
        None,  # seq_idx: integer document ids
        None,  # out_dtype
    )


def _save(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, seq_idx):
    ctx.delta_softplus = delta_softplus
    ctx.has_D, ctx.has_z, ctx.has_delta_bias = D is not None, z is not None, delta_bias is not None
    ctx.has_initial_state = initial_state is not None
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, chunk_states, seq_idx)


def _saved_for_backward(ctx):
    saved = ctx.saved_tensors
    if saved[8].numel() == 0 and saved[0].shape[-1] > 0:
        raise RuntimeError("selective_scan backward needs the forward to run with save_states=True")
    return saved


def _backward(ctx, dout, dfinal_state, dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, chunk_states, seq_idx = _saved_for_backward(ctx)
    grads = selective_scan_bwd_op(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, chunk_states, dout, dfinal_state,
        seq_idx,
    )
    return _input_grads(ctx, grads)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx, _ = inputs
    _save(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, output[2], seq_idx)


selective_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _SelectiveScanEager(torch.autograd.Function):
    """The same kernels as the custom ops, without the dispatcher in eager mode.

    Calling a torch.library custom op with autograd costs about 0.2 ms of CPU per forward +
    backward (measured on this project's 2-core CPU machine), several times a plain autograd.Function;
    a 24-layer model pays it per layer and step, and small models' training steps are CPU-bound.
    """

    @staticmethod
    def forward(
        ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx, out_dtype,
        tuning,
    ):
        with device_guard(u):
            out, final_state, chunk_states = scan_fwd(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save_states, seq_idx,
                tuning=tuning, out_dtype=out_dtype,
            )
        _save(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_states, seq_idx)
        ctx.tuning = tuning
        ctx.set_materialize_grads(False)
        return out, final_state

    @staticmethod
    def backward(ctx, dout, dfinal_state):
        u, delta, A, B, C, D, z, delta_bias, chunk_states, seq_idx = _saved_for_backward(ctx)
        dout = torch.zeros_like(u) if dout is None else dout
        with device_guard(u):
            grads = scan_bwd(
                u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, chunk_states, dout, dfinal_state, seq_idx,
                tuning=ctx.tuning,
            )
        return (*_input_grads(ctx, grads), None)  # tuning: launch choices (out_dtype is in _input_grads)


def selective_scan_triton(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, seq_idx=None,
    tuning=DEFAULT_TUNING, A_is_log=False, out_dtype=None,
):
    """Triton selective scan; same semantics as `hf_mamba.kernels.selective_scan` (backend="triton").

    tuning: the kernels' launch choices (tests and sweeps pass their own; torch.compile traces the
    custom ops, which take the defaults). A_is_log (A holds A_log): without gradients only, outside
    torch.compile (the custom ops take A)."""
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save_states = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if A_is_log and (save_states or torch.compiler.is_compiling()):
        raise ValueError("selective_scan_triton: A_is_log is for calls without gradients, outside torch.compile")
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, save_states, seq_idx)
    if torch.compiler.is_compiling():
        if tuning != DEFAULT_TUNING:
            raise ValueError("selective_scan_triton: torch.compile traces the custom ops, which take no tuning")
        out, final_state, _ = selective_scan_fwd_op(*args, out_dtype)  # the op torch.compile / export trace through
    elif not save_states:  # nothing to differentiate: the autograd Function's apply would only cost host time
        with device_guard(u):
            out, final_state, _ = scan_fwd(*args, A_is_log=A_is_log, tuning=tuning, out_dtype=out_dtype)
    else:
        out, final_state = _SelectiveScanEager.apply(*args, out_dtype, tuning)
    return (out, final_state) if return_final_state else out


__all__ = ["DEFAULT_TUNING", "ScanGrads", "ScanTuning", "scan_bwd", "scan_fwd", "selective_scan_triton"]
