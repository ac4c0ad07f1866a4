"""Developer tool: time few_rows_linear (a decode step's in_proj and out_proj) under other launch choices
(FewRowsTuning) than the shipped ones, beside F.linear, as a decode step's CUDA graph runs them: many calls
back to back in one graph, each on a weight the previous calls have pushed out of L2. Prints microseconds per
call and the weight's bytes over that time, next to the device's copy bandwidth (bytes read + written).

    python scripts/dev/few_rows_sweep.py                       # 1.4B and 7B projections, batch 1 and 16
    python scripts/dev/few_rows_sweep.py --batches 1 --only "stages"   # rows whose label starts so

The last line, `best: FIELDS;FIELDS`, names per batch size the choice with the least time summed over the
projections, as FewRowsTuning fields that differ from the shipped ones (`decode_step_choice.py --few-rows`
takes it as it is).
"""

import argparse
import os
import sys
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for the helpers
from benchmark_large import copy_bandwidth  # noqa: E402
from hf_mamba.kernels.few_rows import DEFAULT_TUNING, few_rows_linear  # noqa: E402

# (label, n_out, n_in): in_proj (2 d_inner x hidden) and out_proj (hidden x d_inner), and 7B's LM head
PROJECTIONS = [
    ("1.4B in_proj", 8192, 2048), ("1.4B out_proj", 2048, 4096),
    ("7B in_proj", 16384, 4096), ("7B out_proj", 4096, 8192), ("7B lm_head", 65024, 4096),
]
D = DEFAULT_TUNING
ROWS = [("shipped", D)]
ROWS += [(f"stages {n}", replace(D, num_stages=n)) for n in (3, 6)]
ROWS += [(f"tile {b // 1024}K", replace(D, tile_bytes=b)) for b in (16384, 32768)]
ROWS += [("warps 8", replace(D, num_warps=8))]
ROWS += [(f"programs/SM {p}", replace(D, programs_per_sm=p)) for p in (4, 8)]
ROWS += [(f"split {k}", replace(D, split_k=k)) for k in (2, 4, 8)]
ROWS += [("split 4 tile 16K", replace(D, split_k=4, tile_bytes=16384))]
ROWS += [("fma", replace(D, one_row_fma=True))]
ROWS += [("fma tile 16K", replace(D, one_row_fma=True, tile_bytes=16384))]
ROWS += [("fma stages 6", replace(D, one_row_fma=True, num_stages=6))]
ROWS += [("fma programs/SM 4", replace(D, one_row_fma=True, programs_per_sm=4))]

CALLS = 48  # per graph replay
L2_CLEARING_BYTES = 256 << 20  # the weights the calls cycle through: several times any L2


def time_per_call(fn, weights, x):
    """Microseconds per call of fn(x, weight) over a CUDA graph of CALLS calls cycling through weights."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for weight in weights:
            fn(x, weight)  # compile, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(x, weights[i % len(weights)])
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--only", default="", help="rows whose label starts with this (shipped and F.linear always)")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, bf16; copy bandwidth "
          f"{copy_bandwidth(device) / 1e12:.3f} TB/s (read + written); us per call (GB/s of weight)")
    rows = [(label, tuning) for label, tuning in ROWS if label == "shipped" or label.startswith(args.only)]
    batches = [int(b) for b in args.batches.split(",")]
    columns = [f"{label} b{batch}" for label, _, _ in PROJECTIONS for batch in batches]
    print("| choice | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    cases = []
    for _, n_out, n_in in PROJECTIONS:
        copies = max(2, -(-L2_CLEARING_BYTES // (n_out * n_in * 2)))
        weights = [torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16) / n_in**0.5 for _ in range(copies)]
        for batch in batches:
            cases.append((weights, torch.randn(batch, n_in, device=device, dtype=torch.bfloat16)))
    linear = [("F.linear", torch.nn.functional.linear)]
    ours = [(label, lambda x, w, t=tuning: few_rows_linear(x, w, tuning=t)) for label, tuning in rows]
    totals = {}  # (label, batch) -> microseconds summed over the projections
    for label, fn in linear + ours:
        cells = []
        for i, (weights, x) in enumerate(cases):
            batch = batches[i % len(batches)]
            try:
                us = time_per_call(fn, weights, x)
            except Exception as error:  # a choice that does not compile or launch: say so, go on
                cells.append(type(error).__name__)
                totals[label, batch] = float("inf")
                continue
            totals[label, batch] = totals.get((label, batch), 0.0) + us
            cells.append(f"{us:.1f} ({weights[0].numel() * 2 / us / 1e3:,.0f})")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    # the rounding of each choice against F.linear on the last case (same fp32 sums up to order)
    weights, x = cases[0]
    reference = torch.nn.functional.linear(x, weights[0]).float()
    worst = 0.0
    for _, tuning in rows:
        try:
            out = few_rows_linear(x, weights[0], tuning=tuning).float()
        except Exception:  # reported in the table
            continue
        worst = max(worst, (out - reference).abs().max().item())
    print(f"largest difference from F.linear ({PROJECTIONS[0][0]}): {worst:.2e}")
    tunings, best = dict(rows), []
    for batch in batches:
        label = min((label for label, _ in rows), key=lambda label: totals[label, batch])
        changed = {k: int(v) for k, v in asdict(tunings[label]).items() if v != asdict(DEFAULT_TUNING)[k]}
        print(f"batch {batch}: least in all {label} ({totals[label, batch]:.1f} us against "
              f"{totals['shipped', batch]:.1f} shipped, {totals['F.linear', batch]:.1f} F.linear)")
        if changed and ",".join(f"{k}={v}" for k, v in changed.items()) not in best:
            best.append(",".join(f"{k}={v}" for k, v in changed.items()))
    print("best: " + ";".join(best))


if __name__ == "__main__":
    main()
