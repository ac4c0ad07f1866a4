"""CPU speed of the PyTorch scan path: against the exact step loop and against Transformers' slow path.

    python scripts/benchmark_cpu.py            # a few minutes on a 2-core machine
    python scripts/benchmark_cpu.py --quick    # smaller shapes, under a minute

Prints two tables: (1) the selective scan alone, hf_mamba "torch" vs "reference" (forward and
forward+backward, median of --repeats runs); (2) the whole model, hf_mamba (torch path) vs
Transformers' built-in MambaForCausalLM on the same weights (its pure-PyTorch path on CPU).
"""

import argparse
import statistics
import tempfile
import time

import torch
import transformers
from hf_mamba.kernels import selective_scan

from hf_mamba import MambaForCausalLM


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scan_inputs(batch, d_inner, seqlen, d_state, requires_grad):
    def make(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).requires_grad_(requires_grad)

    return dict(
        u=make(batch, d_inner, seqlen),
        delta=make(batch, d_inner, seqlen, scale=0.5),
        A=(-torch.rand(d_inner, d_state) * d_state).requires_grad_(requires_grad),
        B=make(batch, d_state, seqlen),
        C=make(batch, d_state, seqlen),
        D=make(d_inner),
        z=make(batch, d_inner, seqlen),
        delta_bias=make(d_inner),
        delta_softplus=True,
    )


def time_scan(shape, backend, repeats):
    fwd_inputs = scan_inputs(*shape, requires_grad=False)
    bwd_inputs = scan_inputs(*shape, requires_grad=True)

    def forward():
        with torch.no_grad():
            selective_scan(**fwd_inputs, backend=backend)

    def forward_backward():
        selective_scan(**bwd_inputs, backend=backend).sum().backward()

    return median_seconds(forward, repeats), median_seconds(forward_backward, repeats)


def time_models(config_kwargs, batch, seqlen, repeats):
    torch.manual_seed(0)
    builtin = transformers.MambaForCausalLM(transformers.MambaConfig(**config_kwargs))
    with tempfile.TemporaryDirectory() as folder:
        builtin.save_pretrained(folder)
        ours = MambaForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, config_kwargs["vocab_size"], (batch, seqlen))
    results = {}
    for name, model in (("transformers (slow path)", builtin), ("hf_mamba (torch path)", ours)):
        def forward(model=model):
            model.eval()  # inference: Transformers' model picks its eval path
            with torch.no_grad():
                model(ids, use_cache=False)

        def train_step(model=model):
            model.train()
            model(ids, labels=ids, use_cache=False).loss.backward()

        results[name] = (median_seconds(forward, repeats), median_seconds(train_step, repeats))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")

    scan_shapes = (
        [(2, 128, 256, 16), (1, 64, 4096, 16)]
        if args.quick
        else [
            (4, 256, 1024, 16),
            (1, 1536, 2048, 16),
            (1, 64, 8192, 16),
        ]
    )
    print("\nSelective scan, fp32, CPU (median seconds)")
    print(
        f"{'(batch, d_inner, seqlen, d_state)':<36}{'ref fwd':>9}{'torch fwd':>11}{'speedup':>9}"
        f"{'ref f+b':>9}{'torch f+b':>11}{'speedup':>9}"
    )
    for shape in scan_shapes:
        ref_f, ref_fb = time_scan(shape, "reference", args.repeats)
        fast_f, fast_fb = time_scan(shape, "torch", args.repeats)
        print(
            f"{str(shape):<36}{ref_f:>9.3f}{fast_f:>11.3f}{ref_f / fast_f:>8.1f}x"
            f"{ref_fb:>9.3f}{fast_fb:>11.3f}{ref_fb / fast_fb:>8.1f}x"
        )

    config = dict(vocab_size=1024, hidden_size=256, state_size=16, num_hidden_layers=4)
    batch, seqlen = (1, 128) if args.quick else (2, 256)
    results = time_models(config, batch, seqlen, args.repeats)
    print(f"\nWhole model (hidden 256, 4 layers, vocab 1024), batch {batch} x {seqlen} tokens, fp32, CPU")
    print("forward: eval mode, no_grad; train step: train mode, forward + backward")
    print(f"{'':<28}{'forward s':>10}{'tok/s':>9}{'train step s':>14}{'tok/s':>9}")
    for name, (fwd, step) in results.items():
        tokens = batch * seqlen
        print(f"{name:<28}{fwd:>10.3f}{tokens / fwd:>9.0f}{step:>14.3f}{tokens / step:>9.0f}")
    slow, fast = results["transformers (slow path)"], results["hf_mamba (torch path)"]
    print(f"hf_mamba speedup: forward {slow[0] / fast[0]:.1f}x, train step {slow[1] / fast[1]:.1f}x")


if __name__ == "__main__":
    main()
