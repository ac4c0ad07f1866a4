"""Developer tool: host time of generate()'s decode steps up to the CUDA-graph replay, on CPU.

    python scripts/dev/decode_host_time.py                    # medians of this tree's code
    python scripts/dev/decode_host_time.py --profile          # cProfile from each loop start to the replay
    python scripts/dev/decode_host_time.py --against HEAD~1   # interleaved runs: that revision's src vs this tree's

What it measures: on CUDA, Transformers' generate loop waits for the GPU once per token (the stopping check
in `_has_unfinished_sequences`), so the GPU idles from there until the step's graph replay is launched.
This tool times exactly that stretch on CPU, in Transformers' own loop: from the return of
`_has_unfinished_sequences` to the call of the graph's `replay()` ("to replay": Transformers'
prepare_inputs_for_generation, nn.Module.__call__, our forward's Python, its input checks and the graph's
input copy). It also gives the host time of a whole loop iteration ("per token": the rest, after the
replay, overlaps the GPU on CUDA), and "to replay" of each generate()'s first decode step, which
captures a graph or checks the pooled one's fingerprint (once per generate() call).

What is stubbed: the decode path is forced on CPU (`_cuda_graphs_on` is asked about a CUDA device) and
DecodeGraph captures nothing: its `graph.replay()` only records the time, and its logits are zeros;
`DecodeGraph.__call__` and everything before it run as they are. torch ops run on CPU: their cost is dispatch
plus CPU work on tiny tensors, and a device-to-host read (`.tolist()`, `.item()`) costs no GPU round trip
here, which on CUDA it does (a launch, a copy and a wait, tens of microseconds).

Model: 24 layers, hidden_size 64, vocab 1024, batch 1, greedy, 64 new tokens per generate(), the first
decode steps of each generate() skipped (warm-up).
"""

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROFILER = None  # --profile: a cProfile.Profile enabled from each loop start to the replay
profiling = False
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build():
    """A tiny 24-layer model whose decode steps replay a stub graph; returns (model, events list)."""
    import torch
    from transformers import GenerationMixin

    from hf_mamba import MambaConfig, MambaForCausalLM
    from hf_mamba.decode_graphs import DecodeGraph, DecodeGraphs, Prefill

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = MambaConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=24, state_size=16)
    model = MambaForCausalLM(config).eval()
    model.decode_chunk_size = 1  # Transformers' loop, a forward per token (selecting steps replay no forward)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    events = []  # ("loop" | "replay", perf_counter)
    profiler = PROFILER

    class Replay:
        def replay(self):
            events.append(("replay", time.perf_counter()))
            if profiler is not None:
                profiler.disable()

    class PrefillReplay:  # the prompt's prefill graph: not a decode step
        def replay(self):
            pass

    class StubGraph(DecodeGraph):
        def __init__(self, step, cache, input_ids, kind=None):  # no capture: what a replay reads, zero logits
            self.static_ids = input_ids.clone()
            self.states_ptr = cache.ssm_states[0].data_ptr()
            self.kind = kind
            self.static_out = torch.zeros(input_ids.shape[0], 1, config.vocab_size)
            if isinstance(kind, Prefill):
                self.static_mask = torch.ones_like(input_ids)
                self.graph = PrefillReplay()
            else:
                self.graph = Replay()

    DecodeGraphs.graph_class = StubGraph
    # The real decision, asked about a CUDA device (a torch.device needs no GPU).
    graphs_on, cuda = MambaForCausalLM._cuda_graphs_on, torch.device("cuda", 0)
    MambaForCausalLM._cuda_graphs_on = lambda self, device: graphs_on(self, cuda)
    has_unfinished = GenerationMixin._has_unfinished_sequences

    def timed_has_unfinished(self, *args, **kwargs):
        out = has_unfinished(self, *args, **kwargs)
        events.append(("loop", time.perf_counter()))
        # Iteration 0 of the loop consumes the prefill's output: no replay follows it.
        if profiler is not None and profiling and out and sum(kind == "loop" for kind, _ in events) > 1:
            profiler.enable()
        return out

    GenerationMixin._has_unfinished_sequences = timed_has_unfinished
    return model, events


def run_generates(model, events, generates, new_tokens, skip):
    """Microseconds: [to replay] and [per token] of the decode steps after the first `skip`, and [to replay] of
    each generate()'s first decode step (which captures or checks the graph), over `generates` calls."""
    import torch

    ids = torch.randint(1, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    to_replay, per_token, first = [], [], []
    for _ in range(generates):
        events.clear()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        loops = [t for kind, t in events if kind == "loop"]
        replays = [t for kind, t in events if kind == "replay"]
        # Iteration 0 consumes the prefill; iteration k >= 1 replays once.
        assert len(replays) == new_tokens - 1 and len(loops) >= new_tokens, (len(replays), len(loops))
        first.append((replays[0] - loops[1]) * 1e6)
        for k in range(1 + skip, new_tokens):
            to_replay.append((replays[k - 1] - loops[k]) * 1e6)
            per_token.append((loops[k + 1] - loops[k]) * 1e6)
    return to_replay, per_token, first


def measure(args):
    global PROFILER, profiling
    if args.profile:
        PROFILER = cProfile.Profile()
    model, events = build()
    run_generates(model, events, 2, args.new_tokens, args.skip)  # warm-up
    if args.profile:
        profiling = True
        run_generates(model, events, args.generates, args.new_tokens, args.skip)
        profiling = False
        PROFILER.disable()
        pstats.Stats(PROFILER).sort_stats("tottime").print_stats(40)
        return
    to_replay, per_token, first = run_generates(model, events, args.generates, args.new_tokens, args.skip)
    print(f"to replay / per token / first step's to replay (us, medians): "
          f"{statistics.median(to_replay):.1f} {statistics.median(per_token):.1f} {statistics.median(first):.1f}")


def source_copy(rev, into):
    """src/hf_mamba at `rev`, with this tree's kernels, importable from `into`."""
    os.makedirs(into)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "src/hf_mamba"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", into, "--strip-components=1"], input=archive.stdout, check=True)
    kernels = os.path.join(into, "hf_mamba", "kernels")
    if not os.path.exists(kernels):
        os.symlink(os.path.join(REPO, "kernels"), kernels)


def compare(args):
    """Alternate subprocesses on `args.against`'s src and this tree's; the median of each side's medians."""
    tmp = tempfile.mkdtemp()
    try:
        source_copy(args.against, os.path.join(tmp, "before"))
        sides = {"before": os.path.join(tmp, "before"), "after": None}
        results = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side, path in sides.items():
                env = dict(os.environ)
                if path is not None:
                    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
                cmd = [sys.executable, os.path.abspath(__file__), "--generates", str(args.generates),
                       "--new-tokens", str(args.new_tokens), "--skip", str(args.skip)]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.split()
                results[side].append(tuple(float(x) for x in out[-3:]))
                print(f"round {round_} {side:6s} " + " / ".join(f"{x:7.1f}" for x in results[side][-1]), flush=True)
        print(f"median over {args.rounds} rounds (us): to replay / per token / first step's to replay")
        for side in sides:
            medians = [statistics.median(r[i] for r in results[side]) for i in range(3)]
            name = args.against if side == "before" else "this tree"
            print(f"  {side:6s} ({name}): " + " / ".join(f"{x:.1f}" for x in medians))
    finally:
        shutil.rmtree(tmp)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--generates", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip", type=int, default=3, help="decode steps skipped at the start of each generate()")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--against", help="git revision whose src/hf_mamba to compare with, interleaved")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.against:
        compare(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
