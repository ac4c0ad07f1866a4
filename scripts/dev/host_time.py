"""Developer tool: our host Python per kernel call, with every kernel launch stubbed out, on CPU.

    python scripts/dev/host_time.py                  # table of microseconds per call
    python scripts/dev/host_time.py --profile scan_fwd_bwd   # cProfile of one case, by function
    python scripts/dev/host_time.py --record out.pkl # the launches each case makes (kernel, grid, arguments)
    python scripts/dev/host_time.py --compare a.pkl b.pkl   # two recordings launch the same?

What it measures: the Python of our entry points (checks, backend choice, launch sizes, allocations,
autograd Functions) and of `hf_mamba.kernels._launch.launch`, on CPU tensors, as the calls run on CUDA
after their first launch. Triton's own work is replaced by a no-op that records the launch: the first
launch of a kernel (Triton's `JITFunction.run`, which would compile) returns a stand-in compiled kernel,
whose `run` (Triton's C launcher on a GPU) records the call. Not included: that launcher (8-18 us
per launch on the H200's host, docs/kernels.md "Host time"), the CUDA driver, and anything the GPU
does. torch ops here run on CPU, so their time is dispatch plus CPU work on small tensors, not what
a CUDA dispatch costs. To take the Triton paths with CPU tensors, the backend check (`triton_available`)
answers as on CUDA, the multiprocessor count is an H100's (132, for launch sizes), and the stream and
device queries are stubbed. Nothing in the product code changes.

Two columns: meta tensors (no data: each torch op costs its dispatch and shape work, near what a
CUDA op costs the host) and CPU tensors (torch ops also do their CPU work, e.g. zero fills, which on
a GPU are kernels: only the differences between two runs of the same column mean much).

The recorded launches (--record) describe every argument (tensors by dtype, shape, strides; other values
as they are) and every keyword, so that a change to the host code can be checked to launch the same
GPU work (compare two recordings with --compare). A recording also covers the untimed `layout_cases`:
the scan's other paths and inputs (odd lengths, dtypes, layouts, document ids, initial states, the
chunk kernels, spread lanes, segments), forward and backward.
"""

import argparse
import cProfile
import pickle
import pstats
import statistics
import sys
import time

import torch

SM_COUNT = 132  # an H100's multiprocessors: the launch sizes read it
RECORD = []  # launches, while recording


def _describe(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape), v.stride(), v.storage_offset())
    return v


class _StubCompiled:
    """Stands in for Triton's CompiledKernel: `launch` calls its launcher after the first launch."""

    def __init__(self, kernel, options):
        self.kernel, self.options = kernel, options
        self.function = self.packed_metadata = None

    def launch_metadata(self, grid, stream, *values):
        return None

    def run(self, gx, gy, gz, stream, function, packed, metadata, enter, exit_, *values):
        if RECORD is not None and _recording:
            names = self.kernel.arg_names
            RECORD.append((
                self.kernel.fn.__name__, (gx, gy, gz),
                tuple((n, _describe(v)) for n, v in zip(names, values, strict=True)), self.options,
            ))


_recording = False


def stub_launches():
    """Patch Triton and the device queries as the module docstring says; import the kernels first."""
    import hf_mamba.kernels  # noqa: F401
    from hf_mamba.kernels import _launch
    from triton.runtime.jit import JITFunction

    scan_pkg = sys.modules["hf_mamba.kernels.selective_scan"]  # the package (its name is also the function's)

    assert _launch._FAST_PATH, "needs Triton >= 3.4 (the launch fast path)"

    def first_launch(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        params = dict(zip(names, args, strict=False))  # args may stop before the defaults
        options = {k: v for k, v in kwargs.items() if k not in names}
        params.update({k: v for k, v in kwargs.items() if k in names})
        compiled = _StubCompiled(self, options)
        # Launched as the stand-in would be: every parameter in signature order, the grid in 3-D.
        values = [params.get(p.name, p.default) for p in self.params]
        g = (*grid, 1, 1)
        compiled.run(g[0], g[1], g[2], 0, None, None, None, None, None, *values)
        return compiled

    JITFunction.run = first_launch
    _launch._current_stream = lambda device: 0
    torch.cuda.current_device = lambda: 0

    def triton_available(device):  # the CUDA branch: Triton importable
        import triton  # noqa: F401

        return True

    scan_pkg.triton_available = triton_available
    # Autocast knows no meta device: answered as for CPU (off).
    is_autocast_enabled, autocast = torch.is_autocast_enabled, torch.autocast
    torch.is_autocast_enabled = lambda *a: is_autocast_enabled(*("cpu" if x == "meta" else x for x in a))
    torch.autocast = lambda device_type, *a, **k: autocast("cpu" if device_type == "meta" else device_type, *a, **k)
    for name, module in list(sys.modules.items()):
        if name.startswith("hf_mamba.kernels") and getattr(module, "sm_count", None) is _launch.sm_count:
            module.sm_count = lambda device: SM_COUNT


# --- the cases: 130M widths (d_model 768, d_inner 1536, d_state 16, dt_rank 48, d_conv 4) ---
D_MODEL, D_INNER, D_STATE, DT_RANK, D_CONV = 768, 1536, 16, 48, 4
BF16, F32 = torch.bfloat16, torch.float32


def _scan_inputs(batch, seqlen, grad, device):
    """The scan's inputs in the model's layout: channels-last views of the projections' outputs."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=BF16):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    xz = rand(batch, seqlen, 2 * D_INNER)
    x_dbl = rand(batch, seqlen, DT_RANK + 2 * D_STATE)
    dt = rand(batch, seqlen, D_INNER)
    u, z = xz[..., :D_INNER].transpose(1, 2), xz[..., D_INNER:].transpose(1, 2)
    B = x_dbl[..., DT_RANK:DT_RANK + D_STATE].transpose(1, 2)
    C = x_dbl[..., DT_RANK + D_STATE:].transpose(1, 2)
    A = -torch.rand(D_INNER, D_STATE, generator=g).to(device).requires_grad_(grad)
    D, dt_bias = rand(D_INNER, dtype=F32), rand(D_INNER, dtype=F32)
    leaves = (xz, x_dbl, dt, A, D, dt_bias)
    return (u, dt.transpose(1, 2), A, B, C, D, z, dt_bias), leaves


def cases(device):
    """name -> (description, function to time), on `device` ("cpu" or "meta")."""
    from hf_mamba.kernels import (
        add_rms_norm,
        causal_conv1d_update,
        mamba_inner_triton,
        selective_scan,
        selective_state_update,
    )

    out = {}
    scan_args, _ = _scan_inputs(1, 1024, False, device)

    def scan_fwd():
        with torch.no_grad():
            selective_scan(*scan_args, delta_softplus=True, return_final_state=True, backend="triton")

    out["scan_fwd"] = ("selective_scan forward, (1, 1536, 1024, 16) bf16, no grad, final state", scan_fwd)

    g_args, g_leaves = _scan_inputs(1, 1024, True, device)
    def rand(*shape, dtype=F32):
        return torch.randn(*shape).to(device, dtype)

    dy = rand(1, D_INNER, 1024, dtype=BF16)

    def scan_fwd_bwd():
        y = selective_scan(*g_args, delta_softplus=True, backend="triton")
        torch.autograd.grad(y, g_leaves, dy)

    out["scan_fwd_bwd"] = ("selective_scan forward + backward (autograd), same shapes", scan_fwd_bwd)

    state = rand(1, D_INNER, D_STATE)
    x1, dt1, z1 = (rand(1, D_INNER, dtype=BF16) for _ in range(3))
    B1, C1 = (rand(1, D_STATE, dtype=BF16) for _ in range(2))
    A1, D1, db1 = -rand(D_INNER, D_STATE).abs(), rand(D_INNER), rand(D_INNER)

    def state_update():
        selective_state_update(state, x1, dt1, A1, B1, C1, D1, z1, db1, True, backend="triton")

    out["state_update"] = ("selective_state_update, batch 1 (decode step)", state_update)

    conv_state = rand(1, D_INNER, D_CONV, dtype=BF16)
    conv_w, conv_b = rand(D_INNER, D_CONV, dtype=BF16), rand(D_INNER, dtype=BF16)

    def conv_update():
        causal_conv1d_update(x1, conv_state, conv_w, conv_b, "silu", backend="triton")

    out["conv_update"] = ("causal_conv1d_update, batch 1", conv_update)

    residual, delta, norm_w = rand(1, 1, D_MODEL), rand(1, 1, D_MODEL, dtype=BF16), rand(D_MODEL)

    def add_norm():
        with torch.no_grad():
            add_rms_norm(residual, delta, norm_w, 1e-5, backend="triton", out_dtype=BF16)

    out["add_rms_norm"] = ("add_rms_norm, (1, 1, 768), no grad (decode)", add_norm)

    # The training mixer: fp32 weights, bf16 input (the casts autocast would make; meta tensors know no
    # autocast); on CPU a short sequence, so that the CPU's matmuls stay small beside the Python.
    seqlen = 8 if device == "cpu" else 1024
    gm = torch.Generator().manual_seed(1)

    def param(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gm) * scale).to(device).requires_grad_(True)

    hidden = torch.randn(1, seqlen, D_MODEL, generator=gm).to(device, BF16).requires_grad_(True)
    weights = dict(
        conv_weight=param(D_INNER, 1, D_CONV),
        conv_bias=param(D_INNER),
        x_proj_weight=param(DT_RANK + 2 * D_STATE, D_INNER),
        dt_proj_weight=param(D_INNER, DT_RANK), dt_proj_bias=param(D_INNER), A_log=param(D_INNER, D_STATE, scale=1.0),
        D=param(D_INNER), out_proj_weight=param(D_MODEL, D_INNER),
    )
    in_w = param(2 * D_INNER, D_MODEL)
    dout = torch.randn(1, seqlen, D_MODEL, generator=gm).to(device, BF16)
    leaves = (hidden, in_w, *weights.values())

    def mixer():
        out = mamba_inner_triton(hidden, **weights, in_proj_weight=in_w)
        torch.autograd.grad(out, leaves, dout)

    out["mixer_fwd_bwd"] = (
        f"mamba_inner_triton forward + backward, 130M layer, (1, {seqlen}) tokens, bf16", mixer,
    )
    return out


def layout_cases(device):
    """Untimed cases for --record: the scan on the paths and inputs the timed cases miss, each forward
    and backward (autograd) or forward only, small widths (d_inner 40, not a power of two)."""
    from hf_mamba.kernels import mamba_inner_triton, selective_scan

    g = torch.Generator().manual_seed(2)

    def scan_case(batch, d_inner, seqlen, d_state, dtype, grad, time_rows=False, seq_idx=False, h0=False):
        def rand(*shape, dt=dtype):
            return torch.randn(*shape, generator=g).to(device, dt).requires_grad_(grad)

        if time_rows:  # (batch, channels, seqlen) contiguous: the kernel benchmark's layout
            u, delta, z, B, C = (rand(batch, n, seqlen) for n in (d_inner, d_inner, d_inner, d_state, d_state))
        else:  # channels-last views, as in the model
            u, delta, z = (rand(batch, seqlen, d_inner).transpose(1, 2) for _ in range(3))
            B, C = (rand(batch, seqlen, d_state).transpose(1, 2) for _ in range(2))
        A = -torch.rand(d_inner, d_state, generator=g).to(device).requires_grad_(grad)
        D, dt_bias = rand(d_inner, dt=F32), rand(d_inner, dt=F32)
        kw = dict(D=D, z=z, delta_bias=dt_bias, delta_softplus=True, backend="triton")
        if seq_idx:
            kw["seq_idx"] = (torch.arange(seqlen) * 3 // seqlen).expand(batch, seqlen).to(device, torch.int32)
        if h0:
            kw["initial_state"] = rand(batch, d_inner, d_state, dt=F32)
        leaves = [t for t in (u, delta, z, B, C, A, D, dt_bias, kw.get("initial_state")) if t is not None]
        dy = torch.randn(batch, d_inner, seqlen, generator=g).to(device, dtype)

        def run():
            if not grad:
                with torch.no_grad():
                    selective_scan(u, delta, A, B, C, return_final_state=True, **kw)
                return
            y = selective_scan(u, delta, A, B, C, **kw)
            torch.autograd.grad(y, leaves, dy)

        return run

    out = {
        "odd_fp32_fwd": scan_case(1, 40, 129, 16, F32, False),
        "odd_fp16_seqidx_h0": scan_case(2, 40, 129, 16, torch.float16, True, seq_idx=True, h0=True),
        "odd_bf16_h0": scan_case(1, 40, 1029, 16, BF16, True, h0=True),  # segments
        "time_rows_bf16": scan_case(2, 40, 129, 16, BF16, True, time_rows=True),
        "spread_lanes_bf16": scan_case(4, D_INNER, 64, 16, BF16, False, time_rows=True),
        "chunk_bwd_d32_fp32": scan_case(1, 40, 129, 32, F32, True),  # recurrent forward, chunk backward
        "chunk_d128_bf16": scan_case(1, 40, 129, 128, BF16, True, seq_idx=True, h0=True),
        "chunk_d128_fp16_fwd": scan_case(2, 40, 129, 128, torch.float16, False, time_rows=True),
    }
    d_model, d_inner, dt_rank = 24, 48, 2
    hidden = torch.randn(1, 129, d_model, generator=g).to(device, BF16).requires_grad_(True)

    def param(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(device).requires_grad_(True)

    weights = dict(
        conv_weight=param(d_inner, 1, D_CONV), conv_bias=param(d_inner),
        x_proj_weight=param(dt_rank + 2 * D_STATE, d_inner),
        dt_proj_weight=param(d_inner, dt_rank), dt_proj_bias=param(d_inner), A_log=param(d_inner, D_STATE),
        D=param(d_inner), out_proj_weight=param(d_model, d_inner), in_proj_weight=param(2 * d_inner, d_model),
    )
    dout = torch.randn(1, 129, d_model, generator=g).to(device, BF16)

    def mixer():
        y = mamba_inner_triton(hidden, **weights)
        torch.autograd.grad(y, (hidden, *weights.values()), dout)

    out["mixer_odd_bf16"] = mixer
    return {name: (name, fn) for name, fn in out.items()}


def time_us(fn, repeats, inner):
    """Median over `repeats` of the mean microseconds of `inner` back-to-back calls (after warm-up)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples), min(samples)


def record(all_cases):
    """name -> the launches one call of it makes (after a warm-up call)."""
    global _recording
    out = {}
    for name, (_, fn) in all_cases.items():
        fn()
        RECORD.clear()
        _recording = True
        try:
            fn()
        finally:
            _recording = False
        out[name] = list(RECORD)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    parser.add_argument("--devices", nargs="+", default=["meta", "cpu"], choices=["meta", "cpu"],
                        help="tensors' device: meta (torch ops cost their dispatch only) and/or cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--profile", help="cProfile one case, sorted by own time")
    parser.add_argument("--record", help="write the launches of every case to this file (pickle)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="check two --record files are equal")
    args = parser.parse_args()
    if args.compare:
        a, b = (pickle.load(open(p, "rb")) for p in args.compare)
        for name in sorted(set(a) | set(b)):
            same = a.get(name) == b.get(name)
            print(f"{name:16s} {len(a.get(name, []))} launches  {'same' if same else 'DIFFERENT'}")
        sys.exit(0 if a == b else 1)
    torch.set_num_threads(1)
    stub_launches()
    devices = {d: cases(d) for d in args.devices}
    names = [n for n in devices[args.devices[0]] if not args.only or n in args.only]
    if args.record:
        recorded = {n: devices[args.devices[0]][n] for n in names}
        if not args.only:
            recorded.update(layout_cases(args.devices[0]))
        with open(args.record, "wb") as f:
            pickle.dump(record(recorded), f)
        print(f"wrote {args.record} ({args.devices[0]} tensors)")
        return
    if args.profile:
        fn = devices[args.devices[0]][args.profile][1]
        for _ in range(3):
            fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(45)
        return
    launches = record({n: devices[args.devices[0]][n] for n in names})
    print("microseconds of host time per call, launches stubbed (median of repeats; min)")
    print(f"{'case':16s} {'launches':>8s}" + "".join(f" {d + ' us':>16s}" for d in args.devices) + "  description")
    for name in names:
        cols = []
        for d in args.devices:
            med, best = time_us(devices[d][name][1], args.repeats, args.inner)
            cols.append(f"{med:8.1f} ({best:5.1f})")
        print(f"{name:16s} {len(launches[name]):8d} " + " ".join(cols) + f"  {devices[args.devices[0]][name][0]}")


if __name__ == "__main__":
    main()
