"""Developer tool: where the first training step's wall time goes, on a GPU with an empty Triton cache.

    python scripts/dev/first_step_timeline.py            # 130M, batch 4 x 1024, bf16: hf_mamba, then mamba_ssm
    python scripts/dev/first_step_timeline.py --layers 4 --no-peer

Runs what benchmark_model.py times as "first training step" (forward under autocast with labels, backward,
AdamW step) after the same plain-PyTorch warm-up, and records, relative to the step's start: every Triton
compile (thread, kernel, seconds), every launcher build (Triton 3.6 compiles one C module per kernel
signature), every CUDA module load (CompiledKernel._init_handles), hf_mamba's compile-ahead passes, and the
phase ends (forward, backward, optimizer step), each after a device synchronisation. Then the same for
mamba_ssm's step, in the same process. Prints a timeline and a summary per kind of event.
"""

import argparse
import os
import sys
import tempfile
import threading
import time

import torch
import triton
import triton.compiler
import triton.compiler.compiler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # scripts/
import benchmark_model as bench  # noqa: E402
from hf_mamba.kernels import _launch  # noqa: E402

import hf_mamba  # noqa: E402

EVENTS = []  # (kind, name, thread, start, end), perf_counter seconds
_lock = threading.Lock()


def record(kind, name, start):
    with _lock:
        EVENTS.append((kind, name, threading.current_thread().name, start, time.perf_counter()))


def timed_wrapper(kind, fn, name_of):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record(kind, name_of(*args, **kwargs), start)

    return wrapper


def instrument():
    def src_name(src, *args, **kwargs):
        return getattr(getattr(src, "fn", None), "__name__", str(src)[:40])

    compile_fn = timed_wrapper("compile", triton.compiler.compiler.compile, src_name)
    triton.compiler.compile = compile_fn
    triton.compiler.compiler.compile = compile_fn
    driver = triton.runtime.driver.active
    launcher_cls = driver.launcher_cls
    driver.launcher_cls = timed_wrapper("launcher", launcher_cls, lambda src, metadata: getattr(metadata, "name", "?"))
    kernel_cls = triton.compiler.compiler.CompiledKernel
    init_handles = kernel_cls._init_handles

    def timed_init(self):
        if self.module is not None:
            return init_handles(self)
        start = time.perf_counter()
        try:
            return init_handles(self)
        finally:
            record("module load + launcher", self.name, start)

    kernel_cls._init_handles = timed_init
    _launch.compile_ahead = timed_wrapper("compile_ahead pass", _launch.compile_ahead, lambda fn, *a: fn.__name__)
    from hf_mamba.kernels import mamba_inner

    from hf_mamba import modeling_mamba

    modeling_mamba.compile_ahead = mamba_inner.compile_ahead = _launch.compile_ahead


def first_step(model, args, forward):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device="cuda")
    torch.cuda.synchronize()
    EVENTS.clear()
    t0 = time.perf_counter()
    marks = []
    _, loss = bench.logits_and_loss(model, ids, forward, bench.DTYPES[args.dtype])
    torch.cuda.synchronize()
    marks.append(("forward", time.perf_counter()))
    loss.backward()
    torch.cuda.synchronize()
    marks.append(("backward", time.perf_counter()))
    optimizer.step()
    torch.cuda.synchronize()
    marks.append(("optimizer step", time.perf_counter()))
    time.sleep(0.5)  # a background compile still running shows up
    return t0, marks, list(EVENTS)


def report(name, t0, marks, events):
    print(f"\n== {name}: first training step {marks[-1][1] - t0:.2f} s")
    for phase, t in marks:
        print(f"   {phase} done at {t - t0:6.2f} s")
    print(f"   {'start':>6} {'end':>6} {'s':>5}  kind / kernel / thread")
    for kind, kernel, thread, start, end in sorted(events, key=lambda e: e[3]):
        print(f"   {start - t0:6.2f} {end - t0:6.2f} {end - start:5.2f}  {kind} / {kernel} / {thread}")
    kinds = sorted({e[0] for e in events})
    for kind in kinds:
        spans = [(e[3], e[4]) for e in events if e[0] == kind]
        busy = sum(b - a for a, b in spans)
        print(
            f"   {kind}: {len(spans)}, {busy:.2f} s summed, from {min(a for a, _ in spans) - t0:.2f} "
            f"to {max(b for _, b in spans) - t0:.2f} s"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--dtype", choices=sorted(bench.DTYPES), default="bf16", help="the step's autocast dtype")
    parser.add_argument("--no-peer", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp())
    instrument()
    bench.warm_shared_cuda(args)
    torch.manual_seed(0)
    config = hf_mamba.MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers)
    ours = hf_mamba.MambaForCausalLM(config).cuda()
    ours.train()

    def forward_ours(model, ids):
        out = model(ids, labels=ids, use_cache=False)
        return out.logits, out.loss

    report("hf_mamba", *first_step(ours, args, forward_ours))
    peer = None if args.no_peer else bench.load_peer()
    if peer is not None:
        state_dict = {k: v.detach() for k, v in ours.state_dict().items()}
        theirs = bench.peer_model(args, state_dict, peer).cuda()
        theirs.train()
        report("mamba_ssm", *first_step(theirs, args, lambda model, ids: model(ids).logits))


if __name__ == "__main__":
    main()
