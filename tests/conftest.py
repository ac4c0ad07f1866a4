import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before triton is
# first imported (a kernel decorated before that compiles for a GPU). The model's CPU path does not use
# it: backend None resolves to "torch" on CPU whatever this variable says; only a test asking for
# backend="triton" runs the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

import pytest  # noqa: E402

# Tests compare against Transformers' built-in models' PyTorch path. Where mamba_ssm / causal_conv1d are
# importable (the GPU machine's benchmark peers), Transformers binds their CUDA kernels at import and calls
# them on CPU tensors too; hide them so the built-in models keep their PyTorch path on every machine.
for _peer in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda"):
    sys.modules.setdefault(_peer, None)

# The tests never touch the network; make any accidental Hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)


@pytest.fixture
def tiny_kwargs():
    return dict(TINY)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine they are 10x slower with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
