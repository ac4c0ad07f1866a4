"""Fast pure-PyTorch selective scan for CPU (and any device without Triton).

Everything that does not depend on the previous state is computed for a block of steps at once, in
time-major layout (steps, batch, d_inner, d_state) so every step reads contiguous memory:
Ā_t = exp(Δ_t A) and B̄_t u_t = Δ_t B_t u_t. What remains is one multiply-add per step,
h_t = Ā_t h_{t-1} + B̄_t u_t, and one contraction with C per block. Blocks are sized to stay in
cache; materialising the whole sequence at once is memory-bound and measured slower on CPU.

When a step is too small to amortise Python's per-op overhead (short channels, long sequences),
the recurrence is split into chunks of T ~ sqrt(seqlen) steps: every chunk scans from a zero state,
all chunks at once, keeping the running product of Ā; a loop over chunks carries the state across;
each position then adds (running product) x (state entering its chunk). All products are of decays
in (0, 1], so nothing overflows (a cumsum-of-logs form would need exp(+|ΔA|)).

Steps are taken with `unbind` rather than indexing: indexing a big tensor once per step makes
autograd allocate a full-size gradient per step (quadratic time in the backward pass).
"""

import math

import torch
import torch.nn.functional as F

from .reference import effective_delta, finish_output, fp32_or_wider

# Below this many state elements per step (batch * d_inner * d_state) and above MIN_CHUNKED_SEQLEN
# steps, Python overhead dominates a sequential loop and the chunked form wins (measured on CPU).
# BLOCK_ELEMENTS: state elements per block of the sequential form (1 MiB of fp32).
SMALL_STEP_ELEMENTS = 1 << 14
MIN_CHUNKED_SEQLEN = 512
BLOCK_ELEMENTS = 1 << 18


def _discretize(u, delta, A, B, steps, keep=None):
    """Ā = exp(ΔA) and B̄u = ΔBu for the given slice of steps, time-major (steps, batch, d_inner, d_state).

    keep: optional (batch, seqlen) 0/1, 0 where a new document starts: Ā = 0 there resets the state.
    """
    delta_t = delta[:, :, steps].permute(2, 0, 1)  # (steps, batch, d_inner)
    dA = torch.exp(delta_t[..., None] * fp32_or_wider(A))
    if keep is not None:
        dA = dA * keep[:, steps].t()[:, :, None, None]
    B_t = fp32_or_wider(B[:, :, steps]).permute(2, 0, 1)[:, :, None, :]  # (steps, batch, 1, d_state)
    dBu = (delta_t * u[:, :, steps].permute(2, 0, 1))[..., None] * B_t
    return dA, dBu


def _sequential_states(dA, dBu, h):
    """All states h_1..h_L from h_0 = h. dA, dBu: (seqlen, batch, d_inner, d_state)."""
    states = []
    for dA_t, dBu_t in zip(dA.unbind(0), dBu.unbind(0), strict=True):
        h = torch.addcmul(dBu_t, dA_t, h)
        states.append(h)
    return torch.stack(states), h


def _chunked_states(dA, dBu, h, chunk_len):
    """Same result as _sequential_states, with ~2 sqrt(seqlen) Python steps."""
    seqlen = dA.shape[0]
    n_chunks = -(-seqlen // chunk_len)
    pad = n_chunks * chunk_len - seqlen
    # Padded steps have Ā = 1 and B̄u = 0: the state passes through them unchanged.
    dA = F.pad(dA, (0, 0, 0, 0, 0, 0, 0, pad), value=1.0)
    dBu = F.pad(dBu, (0, 0, 0, 0, 0, 0, 0, pad))
    shape = (n_chunks, chunk_len) + tuple(dA.shape[1:])
    dA_steps = dA.view(shape).transpose(0, 1).unbind(0)  # chunk_len x (n_chunks, batch, d_inner, d_state)
    dBu_steps = dBu.view(shape).transpose(0, 1).unbind(0)

    local_h, decay = dBu_steps[0], dA_steps[0]
    local_states, decays = [local_h], [decay]
    for dA_t, dBu_t in zip(dA_steps[1:], dBu_steps[1:], strict=True):
        local_h = dA_t * local_h + dBu_t
        decay = decay * dA_t
        local_states.append(local_h)
        decays.append(decay)
    local_states = torch.stack(local_states, dim=1)  # (n_chunks, chunk_len, batch, d_inner, d_state)
    decays = torch.stack(decays, dim=1)

    entering = []
    for chunk_decay, chunk_state in zip(decays[:, -1].unbind(0), local_states[:, -1].unbind(0), strict=True):
        entering.append(h)
        h = chunk_decay * h + chunk_state
    entering = torch.stack(entering)[:, None]  # (n_chunks, 1, batch, d_inner, d_state)
    states = (local_states + decays * entering).flatten(0, 1)[:seqlen]  # (seqlen, batch, d_inner, d_state)
    return states, h


def selective_scan_torch(
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
    chunk_size=None,
    seq_idx=None,
    out_dtype=None,
):
    """Vectorised selective scan; same signature and semantics as `hf_mamba.kernels.selective_scan`.

    chunk_size: steps per chunk of the chunked form; None picks by size, >= seqlen means sequential.
    """
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    u_w = fp32_or_wider(u)
    delta = effective_delta(delta, delta_bias, delta_softplus)  # (batch, d_inner, seqlen)
    h = fp32_or_wider(initial_state) if initial_state is not None else u_w.new_zeros(batch, d_inner, d_state)
    if seqlen == 0:  # through finish_output, so that the empty y is still a function of u, D and z
        out = finish_output(u_w.new_zeros(batch, d_inner, 0), u, D, z, out_dtype or u.dtype)
        return (out, h) if return_final_state else out

    keep = None
    if seq_idx is not None:  # 0 where the document id changes: the state restarts from zero there
        keep = F.pad((seq_idx[:, 1:] == seq_idx[:, :-1]).to(u_w.dtype), (1, 0), value=1.0)  # (batch, seqlen)
    per_step = max(batch * d_inner * d_state, 1)  # 0 where a dimension is empty: nothing to size blocks by
    if chunk_size is None and per_step < SMALL_STEP_ELEMENTS and seqlen >= MIN_CHUNKED_SEQLEN:
        chunk_size = math.isqrt(seqlen)
    if chunk_size is not None and chunk_size < seqlen:
        dA, dBu = _discretize(u_w, delta, A, B, slice(None), keep)
        states, h = _chunked_states(dA, dBu, h, chunk_size)
        y = torch.einsum("lbdn,bnl->bdl", states, fp32_or_wider(C))  # (batch, d_inner, seqlen)
    else:
        # Blocks of steps sized to stay in cache (~1 MiB of fp32 per block tensor).
        block = max(16, min(256, BLOCK_ELEMENTS // per_step))
        ys = []
        for start in range(0, seqlen, block):
            steps = slice(start, start + block)
            dA, dBu = _discretize(u_w, delta, A, B, steps, keep)
            states, h = _sequential_states(dA, dBu, h)
            ys.append(torch.einsum("lbdn,bnl->bdl", states, fp32_or_wider(C[:, :, steps])))
        y = torch.cat(ys, dim=-1)  # (batch, d_inner, seqlen)
    out = finish_output(y, u, D, z, out_dtype or u.dtype)
    return (out, h) if return_final_state else out
