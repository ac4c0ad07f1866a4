"""hf_mamba.kernels: the selective scan, its decode step, the causal conv, the fused training mixer
(`mamba_inner_triton`) and the residual add + RMSNorm between blocks (`add_rms_norm`), as plain
functions on tensors.

Nothing here imports the model, its config or transformers.
"""

if __name__ == "kernels":
    # Imported as the top-level package `kernels`: the repository root is on sys.path (`python -m
    # pytest` or a Python session started there). That name belongs to Hugging Face's `kernels`
    # library, which Transformers (a dependency since 5.25) imports at start-up; load it in this
    # module's place, so that `from kernels import ...` gets what it asked for.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is None or _spec.origin is None:
        raise ImportError(
            f"{os.path.dirname(os.path.abspath(__file__))} is hf_mamba's kernels folder, importable as "
            "`hf_mamba.kernels`; the top-level name `kernels` is Hugging Face's kernels library, "
            "which is not installed"
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement hands back what sys.modules holds
    _spec.loader.exec_module(_module)
else:
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
