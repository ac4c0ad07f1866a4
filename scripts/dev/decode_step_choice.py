"""Developer tool: decode tokens/s with the fused decode step (mamba_step_triton) against the modules' step
(conv update, x_proj, dt_proj, state update), per shape and batch size (CUDA only): the measurement behind
block.fused_step_pays (FUSED_STEP_MAX_D_INNER, FUSED_STEP_MAX_BATCH_D_INNER_SQUARED), each shape and batch forced one
way and then the other.

    python scripts/dev/decode_step_choice.py --shapes 130m,1.4b,7b --batches 1,16
    python scripts/dev/decode_step_choice.py --shapes 48x1024,48x1536    # LAYERSxHIDDEN: Mamba 370M, 790M
    python scripts/dev/decode_step_choice.py --shapes 1.4b --batches 16 --profile   # and each one's kernels
    python scripts/dev/decode_step_choice.py --batches 16 --ungrouped  # and the fused step without step_grouping
    python scripts/dev/decode_step_choice.py --cublas  # and both steps with in_proj, out_proj as cuBLAS's GEMMs
    python scripts/dev/decode_step_choice.py --projections  # first: few_rows_linear against F.linear, per call
    python scripts/dev/decode_step_choice.py --few-rows "num_stages=6;one_row_fma=1"  # and both steps so tuned

Greedy generate() with CUDA graphs, prompt 128; tokens/s of the decode steps alone: (whole call - a call
that generates one token) over batch x (new - 1) tokens, medians of three.
"""

import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _bench_common import print_decode_profile  # noqa: E402
from benchmark_large import SHAPES, HfMamba, Shape, median_time  # noqa: E402
from hf_mamba.kernels import few_rows, mamba_step  # noqa: E402

import hf_mamba.block as block  # noqa: E402
from hf_mamba.decode_graphs import DecodeGraphs  # noqa: E402


def tokens_per_s(impl, model, prompt, new, device):
    impl.generate(model, prompt, new)  # capture at this batch size
    whole = median_time(lambda: impl.generate(model, prompt, new), device, 3)
    one = median_time(lambda: impl.generate(model, prompt, 1), device, 3)
    return prompt.shape[0] * (new - 1) / (whole - one)


def shape_of(name):
    """A SHAPES entry, or LAYERSxHIDDEN (a Mamba of that size, vocab 50280)."""
    if name in SHAPES:
        return SHAPES[name]
    layers, hidden = map(int, name.split("x"))
    return Shape(name, hidden=hidden, layers=layers, vocab=50280)


def print_projection_times(shapes, batches, device):
    """Microseconds per call (do_bench, L2 flushed) and the weight's bytes over that time, of in_proj's and
    out_proj's products through few_rows_linear and F.linear, per shape and batch size."""
    from hf_mamba.kernels import few_rows_linear
    from triton.testing import do_bench

    print("| shape | projection | batch | few_rows_linear us (GB/s) | F.linear us (GB/s) | F.linear / ours |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        d_inner = 2 * shape.hidden
        for label, n_out, n_in in (("in_proj", 2 * d_inner, shape.hidden), ("out_proj", shape.hidden, d_inner)):
            weight = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16) / n_in**0.5
            for batch in batches:
                x = torch.randn(batch, n_in, device=device, dtype=torch.bfloat16)
                ours = do_bench(lambda x=x, weight=weight: few_rows_linear(x, weight)) * 1e3
                theirs = do_bench(lambda x=x, weight=weight: torch.nn.functional.linear(x, weight)) * 1e3
                gb = weight.numel() * weight.element_size() / 1e9
                print(f"| {shape.name} | {label} | {batch} | {ours:.1f} ({gb / ours * 1e6:,.0f}) | "
                      f"{theirs:.1f} ({gb / theirs * 1e6:,.0f}) | {theirs / ours:.2f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="130m,1.4b,7b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="also print each step's GPU time kernel by kernel")
    parser.add_argument("--ungrouped", action="store_true",
                        help="also time the fused step with no rows or channel blocks sharing a program "
                             "(mamba_step.step_grouping: MIN_PROGRAMS out of reach)")
    parser.add_argument("--cublas", action="store_true",
                        help="also time both steps with in_proj and out_proj as cuBLAS's GEMMs (no few_rows_linear)")
    parser.add_argument("--projections", action="store_true",
                        help="first print in_proj's and out_proj's time per call, few_rows_linear against F.linear")
    parser.add_argument("--few-rows", default="",
                        help="also time both steps with few_rows_linear under these FewRowsTuning fields "
                             "(name=integer,...; several choices separated by ';')")
    args = parser.parse_args()
    device = torch.device("cuda")
    shapes = [shape_of(name) for name in args.shapes.split(",")]
    batches = [int(batch) for batch in args.batches.split(",")]
    if args.projections:
        print_projection_times(shapes, batches, device)
    impl = HfMamba(device, torch.bfloat16)
    few_rows._split_counters(device, 1 << 16)  # split_k's counters, before any capture
    shipped = block.FUSED_STEP_MAX_D_INNER, block.FUSED_STEP_MAX_BATCH_D_INNER_SQUARED
    shipped_min_programs, shipped_rows = mamba_step.MIN_PROGRAMS, block.FEW_ROWS_LINEAR_ROWS
    print(f"{torch.cuda.get_device_name(device)}, bf16, greedy, prompt 128, {args.new} new tokens, tokens/s")
    shipped_tuning = few_rows.DEFAULT_TUNING
    # label, fused, grouping, few_rows_linear (its tuning)
    steps = [("fused step", True, None, shipped_tuning), ("modules' step", False, None, shipped_tuning)]
    if args.ungrouped:
        steps.append(("fused step, ungrouped", True, 1 << 30, shipped_tuning))
    if args.cublas:
        steps += [("fused step, cuBLAS projections", True, None, None),
                  ("modules' step, cuBLAS projections", False, None, None)]
    for choice in filter(None, args.few_rows.split(";")):
        fields = {name: int(value) for name, value in (field.split("=") for field in choice.split(","))}
        tuned = replace(shipped_tuning, **fields)
        steps += [(f"fused step, {choice}", True, None, tuned), (f"modules' step, {choice}", False, None, tuned)]
    print("| shape | batch | " + " | ".join(step[0] for step in steps) + " | fused / modules |")
    print("|---|---|" + "---|" * len(steps) + "---|")
    for shape in shapes:
        name = shape.name
        model = impl.build(shape)
        for batch in batches:
            prompt = torch.randint(1, shape.vocab, (batch, 128), device=device)
            results = []
            for label, fused, min_programs, few_rows_tuning in steps:
                widest = 1 << 30 if fused else 0  # every width one way or the other
                block.FUSED_STEP_MAX_D_INNER = block.FUSED_STEP_MAX_BATCH_D_INNER_SQUARED = widest
                mamba_step.MIN_PROGRAMS = min_programs or shipped_min_programs
                block.FEW_ROWS_LINEAR_ROWS = shipped_rows if few_rows_tuning else range(0)
                few_rows.DEFAULT_TUNING = few_rows_tuning or shipped_tuning
                model._decode_graphs = DecodeGraphs()  # no graph captured with the other step
                results.append(tokens_per_s(impl, model, prompt, args.new, device))
                if args.profile:
                    print_decode_profile(f"{label}, {name}, batch {batch}",
                                         lambda p, n, model=model: impl.generate(model, p, n), prompt)
            block.FUSED_STEP_MAX_D_INNER, block.FUSED_STEP_MAX_BATCH_D_INNER_SQUARED = shipped
            mamba_step.MIN_PROGRAMS, block.FEW_ROWS_LINEAR_ROWS = shipped_min_programs, shipped_rows
            few_rows.DEFAULT_TUNING = shipped_tuning
            cells = " | ".join(f"{r:,.0f}" for r in results)
            print(f"| {name} | {batch} | {cells} | {results[0] / results[1]:.2f} |", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
