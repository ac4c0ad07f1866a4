"""Argument checks shared by the kernel entry points: clear errors before any kernel runs.

Shapes are checked by each entry point; here, what they all need: every tensor a real floating-point one
(the kernels read no integer, boolean or complex data) and all on one device (a kernel handed a pointer
into another device's memory faults instead of raising).
"""

import math
import numbers

import torch


def check_tensors(**tensors) -> None:
    """ValueError naming the argument where one given tensor (None: not given) is not a real floating-point
    tensor, or lies on another device than the first one given."""
    first = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if first is None:
            first = (name, tensor.device)
        elif tensor.device != first[1]:
            raise ValueError(
                f"{name} is on {tensor.device} but {first[0]} is on {first[1]}: pass every tensor on one device"
            )


def check_eps(eps) -> None:
    """ValueError unless eps is a finite number >= 0 (a negative one turns the norms' rsqrt into NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def check_out_dtype(out_dtype) -> None:
    """ValueError unless out_dtype is None (the entry point's default) or a floating-point torch.dtype."""
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}")


def check_shapes(*expected) -> None:
    """ValueError for the first (name, tensor, shape) whose tensor is given and has another shape."""
    for name, tensor, shape in expected:
        if tensor is not None and tensor.shape != shape:  # torch.Size against a tuple, no conversion
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


__all__ = ["check_eps", "check_out_dtype", "check_shapes", "check_tensors"]
