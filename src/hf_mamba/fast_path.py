"""How one forward runs, decided once at its start: the backend and the fused paths (`decide_fast_path`).

The model decides a FastPath per forward and hands it to every block, mixer and norm (`path`), so no module
resolves the backend or the fused-path conditions on its own.
"""

import os
from dataclasses import dataclass

import torch

from .kernels import resolve_backend

BACKEND_ENV_VAR = "HF_MAMBA_BACKEND"


def unhooked(module):
    """No forward or backward hooks (the module's or global) and no replaced forward (as accelerate's
    hooks do): a module the fused mixer would not call must have nothing that expects the call."""
    from torch.nn.modules import module as module_globals

    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
        or module_globals._global_backward_hooks
        or module_globals._global_backward_pre_hooks
        or "forward" in module.__dict__
    )


def scan_backend_for(config) -> str | None:
    """The backend asked for: $HF_MAMBA_BACKEND, else config.scan_backend, else None (the fastest for the device)."""
    return os.environ.get(BACKEND_ENV_VAR) or getattr(config, "scan_backend", None)


@dataclass(frozen=True)
class FastPath:
    """How one forward runs: decided once at its start (`decide_fast_path`) and passed down to every module.

    backend: the scan and conv implementation for the inputs' device ("reference", "torch" or "triton").
    fused_blocks: the blocks run as MambaModel._blocks_fused_norms runs them (each residual add fused with the
        next RMSNorm in one Triton kernel) rather than as modules.
    training_kernels: Triton's training kernels run where they apply (the fused mixer; the RMSNorm takes its
        Triton kernels wherever backend is "triton", and their autograd function where gradients are wanted).
    """

    backend: str
    fused_blocks: bool = False
    training_kernels: bool = False


def decide_fast_path(config, device, blocks_plain: bool = False) -> FastPath:
    """The FastPath of a forward on `device`; `blocks_plain`: the blocks and norms are ours, unhooked and not
    checkpointed, so they need not be called as modules."""
    backend = resolve_backend(scan_backend_for(config), device)
    triton = backend == "triton"
    # Without gradients there is nothing to save; under torch.compile the custom ops are traced instead.
    training = triton and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    return FastPath(backend, fused_blocks=triton and blocks_plain, training_kernels=training)
