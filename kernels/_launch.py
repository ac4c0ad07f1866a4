"""Host-side helpers shared by the Triton launchers of every kernel folder."""

import contextlib

import torch


def device_guard(t):
    """Launch on t's GPU (Triton launches on the current device); nothing for CPU tensors (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def seq_idx_args(seq_idx):
    """The (pointer, batch stride, step stride) kernel arguments of optional (batch, seqlen) document ids."""
    return (seq_idx, *seq_idx.stride()) if seq_idx is not None else (None, 0, 0)
