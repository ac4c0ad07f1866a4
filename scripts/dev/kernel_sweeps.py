"""Developer tool: time the selective scan under other launch choices (its tuning objects) than the
shipped ones, beside the defaults and mamba_ssm. Nothing global changes: each row passes a ScanTuning.

    python scripts/dev/kernel_sweeps.py --forward            # forward only, ms
    python scripts/dev/kernel_sweeps.py --backward           # forward + backward, ms
    python scripts/dev/kernel_sweeps.py --forward --only "capped"   # rows whose label starts so

The shipped choices and their measurements are in docs/kernels.md; a row that beats them there is a
lead, to be confirmed with scripts/benchmark_kernels.py before the defaults change.
"""

import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for the helpers

from benchmark_kernels import (  # noqa: E402
    SHAPES,
    channels_last,
    make_inputs,
    scan_args,
    scan_fns,
    time_fwd,
    time_fwd_bwd,
)
from hf_mamba.kernels import selective_scan_ref  # noqa: E402
from hf_mamba.kernels.selective_scan.chunk import ChunkTuning  # noqa: E402
from hf_mamba.kernels.selective_scan.triton_scan import DEFAULT_TUNING, selective_scan_triton  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FWD, BWD = DEFAULT_TUNING.fwd, DEFAULT_TUNING.bwd

FORWARD_ROWS = [
    ("default", DEFAULT_TUNING),
    ("no register cap", replace(DEFAULT_TUNING, fwd=replace(FWD, maxnreg=0))),
    ("capped at 152", replace(DEFAULT_TUNING, fwd=replace(FWD, maxnreg=152))),
    ("capped at 176", replace(DEFAULT_TUNING, fwd=replace(FWD, maxnreg=176))),
    ("segments below 8 warps/SM", replace(DEFAULT_TUNING, fwd=replace(FWD, warps_per_sm=8))),
    ("segments below 32 warps/SM", replace(DEFAULT_TUNING, fwd=replace(FWD, warps_per_sm=32))),
    ("no spread over lanes", replace(DEFAULT_TUNING, fwd=replace(FWD, spread_lanes=1))),
    ("2 lanes spread", replace(DEFAULT_TUNING, fwd=replace(FWD, spread_lanes=2))),
    ("chunk forward", replace(DEFAULT_TUNING, recurrent_fwd_max_d_state=0)),
]
BACKWARD_ROWS = [
    ("default", DEFAULT_TUNING),
    ("segments below 32 warps/SM", replace(DEFAULT_TUNING, bwd=replace(BWD, warps_per_sm=32))),
    ("8-step tiles", replace(DEFAULT_TUNING, bwd=replace(BWD, tile_steps=8))),
    *((f"states per iteration {g}", replace(DEFAULT_TUNING, bwd=replace(BWD, states_per_iter=g)))
      for g in (1, 2, 4)),
    ("chunk backward", replace(DEFAULT_TUNING, recurrent_bwd_max_d_state=0)),
    ("chunk backward, 256-step chunks, 2 warps",
     replace(DEFAULT_TUNING, recurrent_bwd_max_d_state=0, chunk=ChunkTuning(max_chunk=256, max_warps=2))),
]


def with_tuning(tuning):
    """callable(u, delta, A, B, C, D, z, delta_bias) of the Triton scan under `tuning`."""
    def fn(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, True, None, False, tuning=tuning)

    return fn


def forward_error(fn, dtype):
    """||out - ref|| / ||ref|| of fn at (2, 96, 3000, 16), reference in fp32."""
    args = scan_args(make_inputs(2, 96, 3000, 16, dtype))
    with torch.no_grad():
        out = fn(*args)
    ref = selective_scan_ref(*[a.float() for a in args], delta_softplus=True)
    return ((out.float() - ref).norm() / ref.norm()).item()


def sweep(rows, backward, only):
    shapes = [*SHAPES, (4, 1536, 1024, 16)]
    timer = time_fwd_bwd if backward else time_fwd
    peer = scan_fns().get("mamba_ssm")
    what = "forward + backward" if backward else "forward"
    print(f"\n{what}, ms; last column: the last shape channels-last (the model's layout); error at (2, 96, 3000, 16)")
    print("| variant | dtype | " + " | ".join(str(s) for s in shapes) + " | channels-last | error |")
    print("|---|---|" + "---|" * (len(shapes) + 2))
    for name, dtype in DTYPES.items():
        if peer is not None:
            cells = [f"{timer(peer, make_inputs(*s, dtype, backward)):.3f}" for s in shapes]
            print(f"| mamba_ssm | {name} | " + " | ".join(cells) + " | | |", flush=True)
        for label, tuning in rows:
            if only and not any(label.startswith(p) for p in only.split(",")):
                continue
            fn = with_tuning(tuning)
            cells = [timer(fn, make_inputs(*s, dtype, backward)) for s in shapes]
            inp = channels_last(make_inputs(*shapes[-1], dtype))
            for v in inp.values():
                v.requires_grad_(backward)
            cells.append(timer(fn, inp))
            error = forward_error(fn, dtype)
            print(f"| {label} | {name} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {error:.1e} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward", action="store_true", help="time the forward's rows")
    parser.add_argument("--backward", action="store_true", help="time forward + backward for the backward's rows")
    parser.add_argument("--only", default="", help="only the rows whose label starts so (comma-separated)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_sweeps.py needs a CUDA GPU")
    torch.manual_seed(0)
    if args.forward or not args.backward:
        sweep(FORWARD_ROWS, False, args.only)
    if args.backward:
        sweep(BACKWARD_ROWS, True, args.only)


if __name__ == "__main__":
    main()
