"""Developer tool: decode tokens/s with the fused decode step (mamba_step_triton) against the modules' step
(conv update, x_proj, dt_proj, state update), per shape and batch size (CUDA only): the measurement behind
block.fused_step_pays (FUSED_STEP_MAX_D_INNER, FUSED_STEP_MAX_BATCH_CHANNELS), each shape and batch forced one
way and then the other.

    python scripts/dev/decode_step_choice.py --shapes 130m,1.4b,7b --batches 1,16
    python scripts/dev/decode_step_choice.py --shapes 48x1024,48x1536    # LAYERSxHIDDEN: Mamba 370M, 790M
    python scripts/dev/decode_step_choice.py --shapes 1.4b --batches 16 --profile   # and each one's kernels
    python scripts/dev/decode_step_choice.py --batches 16 --ungrouped  # and the fused step without step_grouping
    python scripts/dev/decode_step_choice.py --batches 1 --mv   # and the fused step with in_proj, out_proj as torch.mv

Greedy generate() with CUDA graphs, prompt 128; tokens/s of the decode steps alone: (whole call - a call
that generates one token) over batch x (new - 1) tokens, medians of three.
"""

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _bench_common import print_decode_profile  # noqa: E402
from benchmark_large import SHAPES, HfMamba, Shape, median_time  # noqa: E402
from hf_mamba.kernels import mamba_step  # noqa: E402

import hf_mamba.block as block  # noqa: E402
from hf_mamba.decode_graphs import DecodeGraphs  # noqa: E402


def tokens_per_s(impl, model, prompt, new, device):
    impl.generate(model, prompt, new)  # capture at this batch size
    whole = median_time(lambda: impl.generate(model, prompt, new), device, 3)
    one = median_time(lambda: impl.generate(model, prompt, 1), device, 3)
    return prompt.shape[0] * (new - 1) / (whole - one)


def matrix_vector_projections(model, on):
    """Every mixer's in_proj and out_proj as torch.mv where a call has one row (a GEMV, where F.linear's GEMM
    with one row may take a split-K kernel and its reduction), or back to nn.Linear's own forward."""
    for layer in model.backbone.layers:
        for linear in (layer.mixer.in_proj, layer.mixer.out_proj):
            if on:
                linear.forward = functools.partial(_mv_forward, linear)
            else:
                linear.__dict__.pop("forward", None)


def _mv_forward(linear, x):
    if x.numel() != x.shape[-1]:
        return torch.nn.functional.linear(x, linear.weight, linear.bias)
    out = torch.mv(linear.weight, x.reshape(-1))
    if linear.bias is not None:
        out = out + linear.bias
    return out.view(*x.shape[:-1], out.shape[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="130m,1.4b,7b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="also print each step's GPU time kernel by kernel")
    parser.add_argument("--ungrouped", action="store_true",
                        help="also time the fused step with no rows or channel blocks sharing a program "
                             "(mamba_step.step_grouping: MIN_PROGRAMS out of reach)")
    parser.add_argument("--mv", action="store_true",
                        help="also time the fused step with in_proj and out_proj as torch.mv at batch 1")
    args = parser.parse_args()
    device = torch.device("cuda")
    impl = HfMamba(device, torch.bfloat16)
    shipped = block.FUSED_STEP_MAX_D_INNER, block.FUSED_STEP_MAX_BATCH_CHANNELS
    shipped_min_programs = mamba_step.MIN_PROGRAMS
    print(f"{torch.cuda.get_device_name(device)}, bf16, greedy, prompt 128, {args.new} new tokens, tokens/s")
    steps = [("fused step", True, None, False), ("modules' step", False, None, False)]  # label, fused, grouping, mv
    if args.ungrouped:
        steps.append(("fused step, ungrouped", True, 1 << 30, False))
    if args.mv:
        steps.append(("fused step, torch.mv projections", True, None, True))
    print("| shape | batch | " + " | ".join(step[0] for step in steps) + " | fused / modules |")
    print("|---|---|" + "---|" * len(steps) + "---|")
    for name in args.shapes.split(","):
        if name in SHAPES:
            shape = SHAPES[name]
        else:
            layers, hidden = map(int, name.split("x"))
            shape = Shape(name, hidden=hidden, layers=layers, vocab=50280)
        model = impl.build(shape)
        for batch in map(int, args.batches.split(",")):
            prompt = torch.randint(1, shape.vocab, (batch, 128), device=device)
            results = []
            for label, fused, min_programs, mv in steps:
                widest = 1 << 30 if fused else 0  # every width one way or the other
                block.FUSED_STEP_MAX_D_INNER = block.FUSED_STEP_MAX_BATCH_CHANNELS = widest
                mamba_step.MIN_PROGRAMS = min_programs or shipped_min_programs
                matrix_vector_projections(model, mv)
                model._decode_graphs = DecodeGraphs()  # no graph captured with the other step
                results.append(tokens_per_s(impl, model, prompt, args.new, device))
                if args.profile:
                    print_decode_profile(f"{label}, {name}, batch {batch}",
                                         lambda p, n, model=model: impl.generate(model, p, n), prompt)
            block.FUSED_STEP_MAX_D_INNER, block.FUSED_STEP_MAX_BATCH_CHANNELS = shipped
            mamba_step.MIN_PROGRAMS = shipped_min_programs
            matrix_vector_projections(model, False)
            cells = " | ".join(f"{r:,.0f}" for r in results)
            print(f"| {name} | {batch} | {cells} | {results[0] / results[1]:.2f} |", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
