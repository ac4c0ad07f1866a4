"""hf_mamba.kernels: the selective scan, its decode step, the causal conv, the fused training mixer
(`mamba_inner_triton`) and the residual add + RMSNorm between blocks (`add_rms_norm`), as plain
functions on tensors.

Nothing here imports the model, its config or transformers.
"""

from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .mamba_inner import mamba_inner_triton
from .rms_norm import add_rms_norm, add_rms_norm_ref
from .selective_scan import (
    BACKENDS,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "add_rms_norm_ref",
    "causal_conv1d",
    "causal_conv1d_update",
    "mamba_inner_triton",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
