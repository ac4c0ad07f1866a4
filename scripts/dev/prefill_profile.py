"""Developer tool: where a prefill's GPU time goes, ours beside mamba_ssm's, kernel by kernel (CUDA only).

    python scripts/dev/prefill_profile.py                         # 130M shape, 1 x 65536, bf16
    python scripts/dev/prefill_profile.py --shape 1.4b --length 8192

Both models are built as benchmark_large.py builds them (same shape, random weights) and prefill as it times
them (a cache, the last token's logits). After three warm-up calls each, torch.profiler records three calls;
the table gives each kernel's GPU milliseconds per call (grouped by a short name) and its launches per call,
then the sum. The gap between the sum and the wall time of a call is host time the GPU waited for.
"""

import argparse
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmark_large import SHAPES, HfMamba, Peer, median_time  # noqa: E402

CALLS = 3


def short(name):
    name = re.sub(r"<.*", "", name)  # template arguments
    name = re.sub(r"\(.*", "", name)
    return name.rsplit("::", 1)[-1][:60]


def profile(impl, model, ids, device):
    for _ in range(3):
        impl.prefill(model, ids)
    torch.cuda.synchronize(device)
    wall = median_time(lambda: impl.prefill(model, ids), device, 3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            impl.prefill(model, ids)
        torch.cuda.synchronize(device)
    ms, launches = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms[short(event.name)] += event.device_time / 1e3 / CALLS
            launches[short(event.name)] += 1
    return wall * 1e3, ms, {k: v / CALLS for k, v in launches.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="130m", choices=sorted(SHAPES))
    parser.add_argument("--length", type=int, default=65536)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = SHAPES[args.shape]
    ids = torch.randint(0, shape.vocab, (1, args.length), device=device)
    impls = [HfMamba(device, dtype)]
    peer = Peer.load()
    if peer is not None:
        impls.append(Peer(device, dtype, peer))
    print(f"{torch.cuda.get_device_name(device)}, {shape.describe()}, bf16, prefill 1 x {args.length}")
    for impl in impls:
        model = impl.build(shape)
        wall, ms, launches = profile(impl, model, ids, device)
        total = sum(ms.values())
        print(f"\n{impl.name}: wall {wall:.2f} ms per call, GPU kernels {total:.2f} ms, "
              f"{sum(launches.values()):.0f} launches")
        for name, t in sorted(ms.items(), key=lambda kv: -kv[1]):
            print(f"  {t:8.3f} ms  {launches[name]:6.0f}x  {name}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
