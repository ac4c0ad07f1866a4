"""Benchmark the selective-scan kernels against the PyTorch paths and mamba_ssm's CUDA scan.

Run on a CUDA machine (the mamba_ssm columns appear only when it is importable, e.g. after
`source ../shared/peers/activate.sh`):

    python scripts/benchmark_kernels.py                      # tables: scan shapes, conv, L scaling
    python scripts/benchmark_kernels.py --no-torch-path      # skip the (slow) PyTorch scan
    python scripts/benchmark_kernels.py --host-time          # host vs GPU time at the 130M model's shape

Launch-choice sweeps (the kernels' tuning objects) live in scripts/dev/kernel_sweeps.py.

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between repeats). Inputs as
the Mamba block passes them: u, delta, z (batch, d_inner, seqlen); B, C (batch, d_state, seqlen);
A, D, delta_bias fp32; delta_softplus=True. Effective bandwidth counts the bytes that must move in
the forward: u, delta, z, B, C read once and out written once,
(4 x batch x d_inner x L + 2 x batch x d_state x L) x element size, the convention of the peer
figures in ../shared/peers/measurements.md.
"""

import argparse
import math

import torch
import triton
import triton.testing
from hf_mamba.kernels import selective_scan, wait_for_background_compiles

SHAPES = [(8, 1536, 2048, 16), (4, 4096, 4096, 16), (1, 2048, 16384, 16)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The PyTorch chunked scan materialises several (batch, d_inner, seqlen, d_state) fp32 tensors
# (and autograd keeps more): beyond this many state elements it would take too long or not fit.
TORCH_PATH_MAX_ELEMENTS = 2**29


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def make_inputs(batch, d_inner, seqlen, d_state, dtype, requires_grad=False):
    g = dict(device="cuda")
    t = {
        "u": torch.randn(batch, d_inner, seqlen, dtype=dtype, **g),
        "delta": (torch.randn(batch, d_inner, seqlen, **g) * 0.5 - 1.0).to(dtype),
        "A": -torch.exp(torch.randn(d_inner, d_state, **g) * 0.5),
        "B": torch.randn(batch, d_state, seqlen, dtype=dtype, **g),
        "C": torch.randn(batch, d_state, seqlen, dtype=dtype, **g),
        "D": torch.randn(d_inner, **g),
        "z": torch.randn(batch, d_inner, seqlen, dtype=dtype, **g),
        "delta_bias": torch.randn(d_inner, **g) * 0.1,
    }
    for v in t.values():
        v.requires_grad_(requires_grad)
    return t


def scan_args(inp):
    """make_inputs' tensors in the scan's positional order (u, delta, A, B, C, D, z, delta_bias)."""
    return [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]


def channels_last(inp):
    """The same inputs in the model's layout: u, Δ, z, B, C as channels-last views."""
    for k in ("u", "delta", "z", "B", "C"):
        inp[k] = inp[k].transpose(1, 2).contiguous().transpose(1, 2)
    return inp


def scan_fns():
    """name -> callable(u, delta, A, B, C, D, z, delta_bias) for every implementation present."""
    fns = {
        "triton": lambda *a: selective_scan(*a, delta_softplus=True, backend="triton"),
        "torch": lambda *a: selective_scan(*a, delta_softplus=True, backend="torch"),
    }
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        fns["mamba_ssm"] = lambda u, delta, A, B, C, D, z, bias: selective_scan_fn(
            u, delta, A, B, C, D, z, bias, delta_softplus=True
        )
    except ImportError:
        pass
    return fns


def time_fwd(fn, inp):
    args = scan_args(inp)
    with torch.no_grad():
        return bench(lambda: fn(*args))


def time_fwd_bwd(fn, inp):
    args = scan_args(inp)
    dout = torch.randn_like(inp["u"])

    def step():
        fn(*args).backward(dout)

    step()
    wait_for_background_compiles()  # the steady state's kernels, not the ones that run while they compile
    return triton.testing.do_bench(step, warmup=25, rep=100, grad_to_none=args, return_mode="median")


def fwd_bytes(batch, d_inner, seqlen, d_state, dtype):
    return (4 * batch * d_inner * seqlen + 2 * batch * d_state * seqlen) * torch.finfo(dtype).bits // 8


def shape_table(args, bw):
    fns = scan_fns()
    has_peer = "mamba_ssm" in fns
    rows = []
    for shape in SHAPES:
        batch, d_inner, seqlen, d_state = shape
        for dname, dtype in DTYPES.items():
            row = {"shape": shape, "dtype": dname}
            inp = make_inputs(*shape, dtype)
            inp_g = make_inputs(*shape, dtype, requires_grad=True)
            run_torch = args.torch_path and batch * d_inner * seqlen * d_state <= TORCH_PATH_MAX_ELEMENTS
            for name, fn in fns.items():
                if name == "torch" and not run_torch:
                    row[name] = (None, None)
                    continue
                try:
                    fwd = time_fwd(fn, inp)
                    fwd_bwd = time_fwd_bwd(fn, inp_g)
                except torch.OutOfMemoryError:
                    fwd = fwd_bwd = None
                torch.cuda.empty_cache()
                row[name] = (fwd, fwd_bwd)
            row["bytes"] = fwd_bytes(*shape, dtype)
            rows.append(row)
            del inp_g
            torch.cuda.empty_cache()
            print(f"  measured {shape} {dname}", flush=True)

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    print(f"\nSelective scan, {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.3f} TB/s")
    print("torch path: '-' = skipped (more than 2^29 state elements: too slow / too much memory)")
    head = ["shape (b,d,L,N)", "dtype", "fwd ms", "fwd+bwd ms", "eff TB/s", "% copy", "torch fwd ms",
            "x torch fwd", "x torch f+b"]
    if has_peer:
        head += ["mamba_ssm fwd", "mamba_ssm f+b", "x peer fwd", "x peer f+b"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        t_fwd, t_fb = r["triton"]
        tb_s = None if t_fwd is None else r["bytes"] / (t_fwd * 1e-3) / 1e12
        cells = [str(r["shape"]), r["dtype"], fmt(t_fwd), fmt(t_fb), fmt(tb_s), fmt(None if tb_s is None else
                 100 * tb_s * 1e12 / bw, ".1f"), fmt(r["torch"][0], ".2f"), fmt(ratio(r["torch"][0], t_fwd), ".1f"),
                 fmt(ratio(r["torch"][1], t_fb), ".1f")]
        if has_peer:
            p_fwd, p_fb = r["mamba_ssm"]
            cells += [fmt(p_fwd), fmt(p_fb), fmt(ratio(p_fwd, t_fwd), ".2f"), fmt(ratio(p_fb, t_fb), ".2f")]
        print("| " + " | ".join(cells) + " |")


def scaling_table(args):
    fns = scan_fns()
    names = [n for n in ("triton", "mamba_ssm") if n in fns]
    d_inner, d_state = 1536, 16
    print(f"\nForward scaling, batch 1, d_inner {d_inner}, d_state {d_state}, bf16 (ms, and ms per 1K tokens)")
    print("| L | " + " | ".join(f"{n} ms | {n} ms/1K" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for log_l in range(10, 19):
        seqlen = 2**log_l
        inp = make_inputs(1, d_inner, seqlen, d_state, torch.bfloat16)
        cells = [str(seqlen)]
        for n in names:
            ms = time_fwd(fns[n], inp)
            cells += [f"{ms:.3f}", f"{ms / (seqlen / 1024):.4f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def cold_start(args):
    """Wall seconds of the first calls in this process, Triton compiling included: no autotuning, so
    a new shape costs one compile per kernel variant, or nothing when it maps to one already built.
    For a true cold start point TRITON_CACHE_DIR and HF_MAMBA_KERNEL_CACHE at empty folders."""
    import time

    print("\nFirst calls in a fresh process (s): forward, then backward, then both again")
    print("| shape (b,d,L,N) | dtype | first fwd | first bwd | second fwd + bwd |")
    print("|---|---|---|---|---|")
    for shape, dtype in [
        ((8, 1536, 2048, 16), "bf16"), ((3, 1000, 777, 16), "bf16"), ((2, 1536, 4097, 16), "bf16"),
        ((8, 1536, 2048, 16), "fp32"),
    ]:
        inp = make_inputs(*shape, DTYPES[dtype], requires_grad=True)
        args_ = scan_args(inp)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = selective_scan(*args_, delta_softplus=True, backend="triton")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            out.backward(torch.ones_like(out))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start - times[-1])
        print(f"| {shape} | {dtype} | {times[0]:.2f} | {times[1]:.2f} | {times[2] + times[3]:.4f} |", flush=True)


def _time_conv(fn, x, w, b, dout):
    with torch.no_grad():
        fwd = bench(lambda: fn(x, w, b))
    fwd_bwd = triton.testing.do_bench(
        lambda: fn(x, w, b).backward(dout), warmup=25, rep=100, grad_to_none=[x, w, b], return_mode="median"
    )
    return fwd, fwd_bwd


def conv_table(args):
    """Causal conv1d (bias + SiLU) at the Mamba block shapes: Triton kernel vs the PyTorch call vs causal_conv1d."""
    from hf_mamba.kernels import causal_conv1d

    fns = {
        "triton": lambda x, w, b: causal_conv1d(x, w, b, "silu", backend="triton"),
        "torch": lambda x, w, b: causal_conv1d(x, w, b, "silu", backend="torch"),
    }
    try:
        from causal_conv1d import causal_conv1d_fn

        fns["causal_conv1d"] = lambda x, w, b: causal_conv1d_fn(x, w, b, activation="silu")
    except ImportError:
        pass
    print("\nCausal conv1d, d_conv 4, bias + SiLU, bf16 input, fp32 weight: fwd / fwd+bwd ms")
    print("| shape (b,d,L) | " + " | ".join(f"{n} fwd | {n} f+b" for n in fns) + " |")
    print("|---|" + "---|---|" * len(fns))
    for shape in [(4, 1536, 1024), (8, 1536, 2048), (1, 2048, 16384)]:
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(shape[1], 4, device="cuda", requires_grad=True)
        b = torch.randn(shape[1], device="cuda", requires_grad=True)
        dout = torch.randn_like(x)
        cells = []
        for name, fn in fns.items():
            w_ = w if name != "causal_conv1d" else w.detach().bfloat16().requires_grad_()  # it wants one dtype
            b_ = b if name != "causal_conv1d" else b.detach().bfloat16().requires_grad_()
            cells += [f"{ms:.3f}" for ms in _time_conv(fn, x, w_, b_, dout)]
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


def fwd_gpu_time(inp, calls=20):
    """GPU time of one forward call, all its kernels summed (torch.profiler), in microseconds, and
    the kernels' names with their shares: where do_bench reads host time (small shapes) or an
    outlier, this reads only what ran on the GPU."""
    args = scan_args(inp)
    with torch.no_grad():
        for _ in range(3):
            selective_scan(*args, delta_softplus=True, backend="triton")
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                selective_scan(*args, delta_softplus=True, backend="triton")
            torch.cuda.synchronize()
    kernels = {e.key: e.self_device_time_total / calls for e in prof.key_averages() if e.self_device_time_total > 0}
    return sum(kernels.values()), kernels


def gpu_time_table(args):
    """The default forward's GPU time on every shape, and in the model's channels-last layout."""
    shapes = [*SHAPES, (4, 1536, 1024, 16)]
    print("\nForward GPU time per call (torch.profiler, all kernels), us")
    print("| shape | dtype | layout | GPU us | kernels |")
    print("|---|---|---|---|---|")
    for name, dtype in DTYPES.items():
        for shape in shapes:
            layouts = ["as made", "channels-last"] if shape == shapes[-1] else ["as made"]
            for layout in layouts:
                inp = make_inputs(*shape, dtype)
                if layout == "channels-last":
                    inp = channels_last(inp)
                total, kernels = fwd_gpu_time(inp)
                parts = ", ".join(f"{k[:40]} {v:.1f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]))
                print(f"| {shape} | {name} | {layout} | {total:.1f} | {parts} |", flush=True)


def _scan_steps(shape=(4, 1536, 1024, 16)):
    """name -> one forward + backward of the scan at the 130M model's shape, channels-last bf16."""
    steps = {}
    for name, fn in scan_fns().items():
        if name == "torch":
            continue
        inp = channels_last(make_inputs(*shape, torch.bfloat16))
        for v in inp.values():
            v.requires_grad_(True)
        args_ = scan_args(inp)
        dout = torch.randn_like(inp["u"])
        steps[name] = lambda fn=fn, args_=args_, dout=dout: fn(*args_).backward(dout)
    return steps


def _scan_forward_steps(shape=(1, 1536, 1024, 16)):
    """name -> one inference forward of the scan (no autograd) at the 130M model's prefill shape, 1 x 1K,
    channels-last bf16: where the scan's host time shows."""
    steps = {}
    for name, fn in scan_fns().items():
        if name == "torch":
            continue
        args_ = scan_args(channels_last(make_inputs(*shape, torch.bfloat16)))
        steps[name] = torch.no_grad()(lambda fn=fn, args_=args_: fn(*args_))
    return steps


def _mixer_steps(batch=4, seqlen=1024, hidden=768, d_state=16, d_conv=4, device="cuda"):
    """name -> one forward + backward of the 130M model's mixer after in_proj under bf16 autocast:
    hf_mamba's mamba_inner_triton, and mamba_ssm's mamba_inner_fn when it is installed."""
    from hf_mamba.kernels import mamba_inner_triton

    d_inner, dt_rank = 2 * hidden, math.ceil(hidden / 16)
    g = dict(device=device)
    w = {
        "conv_w": torch.randn(d_inner, 1, d_conv, **g) * 0.3, "conv_b": torch.randn(d_inner, **g) * 0.1,
        "x_proj": torch.randn(dt_rank + 2 * d_state, d_inner, **g) / d_inner**0.5,
        "dt_w": torch.randn(d_inner, dt_rank, **g) / dt_rank**0.5, "dt_b": torch.randn(d_inner, **g) * 0.1 - 3,
        "A_log": torch.log(torch.arange(1, d_state + 1, **g).float()).repeat(d_inner, 1),
        "D": torch.ones(d_inner, **g), "out_w": torch.randn(hidden, d_inner, **g) / d_inner**0.5,
    }
    for v in w.values():
        v.requires_grad_(True)
    xz = torch.randn(batch, seqlen, 2 * d_inner, dtype=torch.bfloat16, **g).requires_grad_(True)
    dout = torch.randn(batch, seqlen, hidden, dtype=torch.bfloat16, **g)

    def ours():
        with torch.autocast(device, dtype=torch.bfloat16):
            out = mamba_inner_triton(
                xz, w["conv_w"], w["conv_b"], w["x_proj"], w["dt_w"], w["dt_b"], w["A_log"], w["D"], w["out_w"]
            )
        out.backward(dout)

    steps = {"hf_mamba mamba_inner_triton": ours}
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except ImportError:
        return steps
    xz_peer = xz.detach().transpose(1, 2).contiguous().requires_grad_(True)  # (batch, 2 d_inner, seqlen)

    def peer():
        with torch.autocast(device, dtype=torch.bfloat16):
            out = mamba_inner_fn(
                xz_peer, w["conv_w"], w["conv_b"], w["x_proj"], w["dt_w"], w["out_w"], None,
                -torch.exp(w["A_log"].float()), None, None, w["D"].float(), delta_bias=w["dt_b"].float(),
                delta_softplus=True,
            )
        out.backward(dout)

    steps["mamba_ssm mamba_inner_fn"] = peer
    return steps


def _enqueue_us(fn, calls):
    """Host time per call of fn, in microseconds, enqueued behind a busy GPU so that no waiting counts
    (calls x kernels per call must stay within the GPU's launch queue, about 1024 kernels)."""
    import time

    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # a few hundred ms of GPU work ahead of the timed calls
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return elapsed


def host_time_table(args, calls=20):
    """Forward + backward of the 130M model's scan (channels-last bf16) and of its whole mixer after
    in_proj (bf16 autocast): host time per call (enqueueing behind a busy GPU, so no waiting counts),
    GPU time (torch.profiler, all kernels), and the host's top functions (cProfile). Where host time
    exceeds GPU time, training is host-bound."""
    import cProfile
    import io
    import pstats

    print("\nThe 130M model's scan and mixer: host vs GPU time per call, us")
    print("| what | implementation | host us | GPU us | kernels per call |")
    print("|---|---|---|---|---|")
    profiles = {}
    # The GPU's launch queue holds about 1024 kernels; enqueueing more behind the busy GPU would wait
    # on it (mamba_ssm's mixer, 54 kernels x 20 calls, read 50 ms per call so), hence fewer mixer calls.
    cases = (
        ("scan forward, inference (1, 1536, 1024, 16)", _scan_forward_steps(), calls),
        ("scan (4, 1536, 1024, 16)", _scan_steps(), calls),
        ("mixer after in_proj", _mixer_steps(), calls // 2),
    )
    for what, steps, n_calls in cases:
        for name, step in steps.items():
            for _ in range(3):
                step()
            host_us = _enqueue_us(step, n_calls)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(n_calls):
                    step()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
            gpu_us = sum(e.self_device_time_total for e in events) / n_calls
            launches = sum(e.count for e in events) / n_calls
            print(f"| {what} | {name} | {host_us:.0f} | {gpu_us:.0f} | {launches:.0f} |", flush=True)
            profiler = cProfile.Profile()
            torch.cuda._sleep(2_000_000_000)
            profiler.enable()
            for _ in range(n_calls):
                step()
            profiler.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            profiles[f"{what}, {name}, {n_calls} calls"] = text.getvalue()
    for name, text in profiles.items():
        print(f"\ncProfile, {name}, by own time:\n{text}")


def launch_cost_table(args, repeats=200):
    """Host time per launch of each Triton kernel in the 130M mixer's forward + backward: through
    Triton's JITFunction.run (`kernel[grid](...)`) and through hf_mamba's `_launch.launch`, which
    calls the compiled kernel's launcher once the argument signature has launched. Each launch is
    replayed `repeats` times behind a busy GPU, so no waiting counts."""
    import functools

    from hf_mamba.kernels import _launch
    from triton.runtime.jit import JITFunction

    step = _mixer_steps()["hf_mamba mamba_inner_triton"]
    step()  # compiles
    # One forward + backward with the fast path off records every launch as Triton receives it.
    recorded, run = {}, JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        recorded.setdefault(self.__name__, (self, grid, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = record
    try:
        with _launch.plain_launches():
            step()
    finally:
        JITFunction.run = run
    torch.cuda.synchronize()

    def host_us(launch_once):
        launch_once()  # the fast path's first launch with a signature takes Triton's path
        return _enqueue_us(launch_once, repeats)

    print(f"\nHost time per launch, the 130M mixer's kernels (batch 4 x 1024, bf16), us, {repeats} launches each")
    print("| kernel | arguments | kernel[grid](...) | _launch.launch |")
    print("|---|---|---|---|")
    for name, (kernel, grid, kargs, kwargs) in recorded.items():
        plain = host_us(functools.partial(kernel[grid], *kargs, **kwargs))
        fast = host_us(functools.partial(_launch.launch, kernel, grid, *kargs, **kwargs))
        print(f"| {name} | {len(kargs)} | {plain:.1f} | {fast:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-torch-path", dest="torch_path", action="store_false", help="skip the PyTorch scan")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the L scaling table")
    parser.add_argument("--cold", action="store_true", help="time the first calls (compiles), then stop")
    parser.add_argument("--no-conv", dest="conv", action="store_false", help="skip the causal conv1d table")
    parser.add_argument("--gpu-time", action="store_true", help="the forward's GPU time per call, then stop")
    parser.add_argument("--host-time", action="store_true", help="host vs GPU time at the model's shape, then stop")
    parser.add_argument("--launch-cost", action="store_true", help="host us per launch, both paths, then stop")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmark_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    if args.cold:
        cold_start(args)
        return
    if args.gpu_time:
        gpu_time_table(args)
        return
    if args.launch_cost:
        launch_cost_table(args)
        return
    if args.host_time:
        host_time_table(args)
        return
    bw = copy_bandwidth()
    shape_table(args, bw)
    if args.conv:
        conv_table(args)
    if args.scaling:
        scaling_table(args)
    print(f"\n(L up to {2**18}: time per 1K tokens should stay flat; log2 range {int(math.log2(1024))}..18)")


if __name__ == "__main__":
    main()
