"""Host-side helpers shared by the Triton launchers of every kernel folder."""

import contextlib
import functools

import torch


def device_guard(t):
    """Launch on t's GPU (Triton launches on the current device); nothing for CPU tensors (interpreter)
    or when t's GPU is already current (entering torch.cuda.device costs host time every layer)."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def sm_count(device):
    """Multiprocessors of a CUDA device (4 for CPU tensors under the interpreter), cached: launch
    sizes read it every call."""
    return _cuda_sm_count(device.index) if device.type == "cuda" else 4


@functools.cache
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def seq_idx_args(seq_idx):
    """The (pointer, batch stride, step stride) kernel arguments of optional (batch, seqlen) document ids."""
    return (seq_idx, *seq_idx.stride()) if seq_idx is not None else (None, 0, 0)


def cdiv(a, b):
    """ceil(a / b) for host-side grid and loop sizes. Plain Python: triton.cdiv and
    triton.next_power_of_2 are constexpr functions in recent Triton, about 9 us per host call on the
    CI machine's CPU, and a layer's forward + backward made 15 such calls."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (0 for n = 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
