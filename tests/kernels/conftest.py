"""Kernel tests run the Triton kernels on the GPU when there is one, else under the Triton interpreter.

TRITON_INTERPRET must be set before triton compiles anything; the kernel modules are imported lazily
(on the first backend="triton" call), so setting it at collection time is early enough. The model
tests are unaffected: on CPU they resolve backend=None to "torch" whatever this variable says.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_fill_empty():
    """Fill every torch.empty with NaN, so a kernel that leaves part of its output unwritten fails."""
    import torch.utils.deterministic

    old_flag = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_flag, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
