"""How one forward runs, decided once at its start: the backend and the fused paths (`decide_fast_path`).

The model decides a FastPath per forward and hands it to every block, mixer and norm (`path`), so no module
resolves the backend or the fused-path conditions on its own.
"""

import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

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


def plain(module, cls):
    """`module` is exactly a `cls` (no subclass, no wrapper) and `unhooked`: code that reads its parameters
    instead of calling it computes what calling it would."""
    return type(module) is cls and unhooked(module)


def fused_weight(module, plain_cls):
    """The weight W a fused kernel may multiply by in place of calling `module`, a projection x -> W x (a bias,
    where it has one, is read on its own), or None where the module must run.

    - `module` is exactly `plain_cls`: its weight.
    - a bitsandbytes 4-bit Linear: its weight dequantized (what its own matmul multiplies by; no gradient).
    - a PEFT LoRA layer over either: W + sum of scaling * B @ A over its active adapters (fp32), which autograd
      differentiates into the adapters' gradients. Vanilla LoRA only: with dropout, DoRA or another variant,
      a LoRA bias, or mixed adapters per batch row the layer computes something else, and it runs.

    Never for a module with hooks (`unhooked`), any other wrapper, or an 8-bit bitsandbytes Linear (its
    matmul keeps outlier columns in 16 bits: not a product with one dequantized weight).
    """
    if not unhooked(module):
        return None
    if type(module) is plain_cls:
        return module.weight
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None and type(module) is bnb.nn.Linear4bit:
        return _dequantized_4bit(module, bnb)
    lora = sys.modules.get("peft.tuners.lora")
    if lora is not None and isinstance(module, lora.LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit"):
        return _lora_weight(module, plain_cls)
    return None


def _dequantized_4bit(module, bnb):
    state = getattr(module.weight, "quant_state", None)
    # Repacked for bitsandbytes' CPU inference kernel (after a no-grad CPU forward): another layout.
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    return bnb.functional.dequantize_4bit(module.weight.data, state)


def _lora_weight(layer, plain_cls):
    base = fused_weight(layer.base_layer, plain_cls)
    if base is None or getattr(layer, "fan_in_fan_out", False) or (layer.disable_adapters and layer.merged):
        return None
    if layer.merged or layer.disable_adapters:  # the forward is base_layer's alone
        return base
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    for name in adapters:
        A, B = layer.lora_A[name], layer.lora_B[name]
        linear = plain(A, nn.Linear) and plain(B, nn.Linear) and B.bias is None
        variant = name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False)
        if not linear or variant or type(layer.lora_dropout[name]) is not nn.Identity:
            return None
    if not adapters:
        return base
    weight = base if base.dtype in (torch.float32, torch.float64) else base.float()
    with torch.autocast(base.device.type, enabled=False):
        for name in adapters:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            weight = torch.addmm(weight, B.to(weight.dtype), A.to(weight.dtype), alpha=layer.scaling[name])
    return weight


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
