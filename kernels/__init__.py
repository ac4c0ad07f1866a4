"""hf_mamba.kernels: the selective scan, its decode step, the causal conv, the fused training mixer
(`mamba_inner_triton`), the mixer's fused decode step (`mamba_step_triton`), a decode step's projections
(`few_rows_linear`) and the residual add + RMSNorm between blocks (`add_rms_norm`), as plain functions on tensors.

Nothing here imports the model, its config or transformers.
"""

import importlib


def _hand_over_to_hugging_face_kernels():
    """Whether this module, imported as the top-level package `kernels`, was replaced by Hugging Face's
    `kernels` library of that name.

    That happens where the repository root is on sys.path (`python -m pytest`, a Python session
    started there). Transformers (a dependency of it since 5.25) imports that library at start-up,
    and `from kernels import ...` must get it. Where it is not installed, this folder stays what
    `kernels` names (Transformers' availability check then finds no version and leaves it alone)."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    )
    if spec is None or spec.origin is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement hands back what sys.modules holds
    spec.loader.exec_module(module)
    return True


if __name__ != "kernels" or not _hand_over_to_hugging_face_kernels():
    from ._launch import wait_for_background_compiles
    from .causal_conv1d import causal_conv1d, causal_conv1d_update
    from .fp16_range import fp16_range_scale, to_fp16_range, y_dtype
    from .mamba_inner import compute_dtype, mamba_inner_triton
    from .rms_norm import (
        add_rms_norm,
        add_rms_norm_ref,
        rms_norm,
        rms_norm_ref,
        weightless_rms_norm,
        weightless_rms_norms,
    )
    from .selective_scan import (
        BACKENDS,
        resolve_backend,
        selective_scan,
        selective_scan_ref,
        selective_state_update,
        selective_state_update_ref,
    )
    from .selective_scan.reference import fp32_or_wider



def _imported_at_first_call(module, name, doc):
    """`module`.`name`, imported at its first call: a Triton-only module the PyTorch paths must not need."""
    function = None

    def call(*args, **kwargs):
        nonlocal function
        if function is None:
            function = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        return function(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = doc
    return call


mamba_step_triton = _imported_at_first_call(
    "mamba_step", "mamba_step_triton",
    "The mixer's fused decode step on the Triton kernels: `hf_mamba.kernels.mamba_step.mamba_step_triton`.",
)
few_rows_linear = _imported_at_first_call(
    "few_rows", "few_rows_linear",
    "A projection of a decode step's few rows in one Triton launch: `hf_mamba.kernels.few_rows.few_rows_linear`.",
)


__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "add_rms_norm_ref",
    "causal_conv1d",
    "causal_conv1d_update",
    "compute_dtype",
    "few_rows_linear",
    "fp16_range_scale",
    "fp32_or_wider",
    "mamba_inner_triton",
    "mamba_step_triton",
    "resolve_backend",
    "rms_norm",
    "rms_norm_ref",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "wait_for_background_compiles",
    "to_fp16_range",
    "weightless_rms_norm",
    "weightless_rms_norms",
    "y_dtype",
]
