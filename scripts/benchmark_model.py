"""Whole-model GPU benchmark: training throughput, peak memory and greedy decoding speed.

    python scripts/benchmark_model.py                       # the 130M shape, all implementations found
    source <shared>/peers/activate.sh && python scripts/benchmark_model.py   # with mamba_ssm side by side
    python scripts/benchmark_model.py --layers 4 --quick    # a smoke run
    python scripts/benchmark_model.py --profile             # also: CPU enqueue vs GPU kernel time per step
    python scripts/benchmark_model.py --no-train --decode-profile   # decoding only, with time per token

Implementations: hf_mamba (Triton kernels; decoding with and without CUDA graphs), Transformers'
built-in MambaForCausalLM (whatever kernels it finds), and mamba_ssm's MambaLMHeadModel when it is
importable (decoding with its CUDA graphs, cg=True). All share one set of weights.

Training: batch x seqlen tokens, bf16 autocast (--dtype fp16: fp16 autocast, without a GradScaler; decoding
then loads every model in fp16), AdamW step included; tokens/s is the median over
--train-steps timed steps, peak memory is torch.cuda.max_memory_allocated over them. The loss is each
model's own where it has one (`labels=`: hf_mamba's reads the bf16 logits in blocks, Transformers' casts them
to fp32); mamba_ssm takes no labels, so its users' cross-entropy on the fp32-cast logits is timed.
--loss-outside computes that same loss outside for every model instead (like for like).
--padded also trains hf_mamba on the same batch with left padding (attention_mask zeros, labels -100 there),
beside its unpadded run in each round: the fused training path reads the mask, so both should match.
Decoding: greedy, prompt --prompt-len, exactly --new-tokens new tokens, tokens/s = batch x new / time.
The first generate() of each batch size (8 new tokens, the warm-up) is timed too: with an empty Triton cache
it includes the compiles a first generate() pays. Before any first call, one step of a plain PyTorch model
sets up what all implementations share (CUDA, cuBLAS, PyTorch's kernels), so that no first-call figure
carries it for the others.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers
from hf_mamba.kernels import wait_for_background_compiles

from hf_mamba import MambaConfig, MambaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, for the shared helpers
from _bench_common import (  # noqa: E402
    hf_generate,
    next_token_loss,
    peer_generate,
    print_decode_profile,
    step_graph_ms,
    timed,
)

CUDA = torch.device("cuda")


def load_peer():
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as PeerConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return None
    return PeerConfig, MambaLMHeadModel


def peer_model(args, state_dict, peer):
    """mamba_ssm's model with our weights (its names: backbone.embedding, otherwise identical)."""
    PeerConfig, MambaLMHeadModel = peer
    config = PeerConfig(
        d_model=args.hidden,
        n_layer=args.layers,
        vocab_size=args.vocab,
        ssm_cfg={"layer": "Mamba1"},
        rms_norm=True,
        residual_in_fp32=True,
        fused_add_norm=True,
        pad_vocab_size_multiple=1,
    )
    model = MambaLMHeadModel(config, device="cuda", dtype=torch.float32)  # the caller moves it
    renamed = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in state_dict.items()}
    model.load_state_dict(renamed, strict=False)
    return model


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def logits_and_loss(model, ids, forward, dtype):
    """The measured training step's forward under autocast to `dtype`: `forward(model, ids)` gives the logits
    and the loss, or the logits only (then next-token cross-entropy in fp32 follows)."""
    with torch.autocast("cuda", dtype=dtype):
        out = forward(model, ids)
    return out if isinstance(out, tuple) else (out, next_token_loss(out, ids))


def warm_shared_cuda(args):
    """One training step of a plain PyTorch model (embedding, linear layers, the LM loss, AdamW, the run's autocast
    dtype) before any timed first call: the set-up both implementations share (CUDA's and cuBLAS's, the first
    loads of PyTorch's own kernels) is then paid by neither's first step. Without it the implementation that runs
    first in the process (hf_mamba) paid it for both."""
    model = torch.nn.Sequential(
        torch.nn.Embedding(args.vocab, args.hidden), torch.nn.Linear(args.hidden, args.hidden),
        torch.nn.Linear(args.hidden, args.vocab, bias=False),
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device="cuda")
    logits, loss = logits_and_loss(model, ids, lambda m, x: m(x), DTYPES[args.dtype])
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    del model, optimizer, logits, loss
    torch.cuda.empty_cache()


def left_padding_mask(args):
    """attention_mask (batch, seqlen) on the GPU: each row left-padded by 0 to seqlen / 2 tokens (seeded)."""
    pads = torch.randint(0, args.seqlen // 2 + 1, (args.batch, 1), generator=torch.Generator().manual_seed(1))
    return (torch.arange(args.seqlen)[None, :] >= pads).long().cuda()


def train_throughput(name, model, args, logits_of, warmup_steps=None, steps=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device="cuda")
    model.train()

    def step():
        # logits kept through the backward, as usual
        logits, loss = logits_and_loss(model, ids, logits_of, DTYPES[args.dtype])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first_step = timed(step, CUDA)[0]  # compiles every kernel the model needs on its first use
    wait_for_background_compiles()  # then the warm-up steps run the steady state's kernels
    for _ in range((args.warmup_steps if warmup_steps is None else warmup_steps) - 1):
        step()
    torch.cuda.reset_peak_memory_stats()
    times = [timed(step, CUDA)[0] for _ in range(args.train_steps if steps is None else steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"{name}: first training step {first_step:.1f} s")
    if args.profile:
        print_step_profile(name, step, statistics.median(times))

    return args.batch * args.seqlen / statistics.median(times), peak


def print_memory_breakdown(name, model, args, logits_of):
    """Where a training step's peak memory sits: the resident state, what autograd saves, the loss, the
    backward's transients. Saved bytes count each storage once and leave out the parameters."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seqlen), device="cuda")
    model.train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if tensor.is_cuda and storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    for _ in range(2):  # the first step creates the optimizer state; the second is measured
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits, loss = logits_and_loss(model, ids, logits_of, DTYPES[args.dtype])
        after_forward = torch.cuda.memory_allocated()
        peak_forward = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        del logits
        loss.backward()
        del loss
        peak_backward = torch.cuda.max_memory_allocated()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    mib = 2**20
    print(
        f"{name} memory (MiB): resident {resident / mib:,.0f}, saved for backward {sum(saved.values()) / mib:,.0f} "
        f"in {len(saved)} storages, after forward + loss {after_forward / mib:,.0f}, "
        f"peak forward {peak_forward / mib:,.0f}, peak backward {peak_backward / mib:,.0f}"
    )
    sizes = {}
    for nbytes in saved.values():
        sizes[nbytes] = sizes.get(nbytes, 0) + 1
    top = sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:10]
    print("  saved storages by size: " + ", ".join(f"{n} x {b / mib:.2f}" for b, n in top))


def print_step_profile(name, step, wall_seconds, steps=3):
    """Where a training step's time goes: CPU time to enqueue it, GPU kernel time, the top kernels.

    When the enqueue time is close to the wall time the step is bound by the CPU issuing kernels,
    and faster kernels do not show in tokens/s.
    """
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    enqueue = time.perf_counter() - start
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not the ops launching them
    gpu_ms = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    print(
        f"{name} step: wall {wall_seconds * 1e3:.1f} ms, CPU enqueue {enqueue * 1e3:.1f} ms, "
        f"GPU kernels {gpu_ms:.1f} ms"
    )
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:10]:
        print(f"    {e.self_device_time_total / steps / 1e3:7.2f} ms  x{e.count // steps:4d}  {e.key[:80]}")
    # Host side (profiler-inflated, for comparison between implementations): ops launched per step.
    host_ops = [e for e in events if e.self_cpu_time_total > 0]
    print(f"  host: {sum(e.count for e in host_ops) // steps} profiled calls per step; top by self CPU time:")
    for e in sorted(host_ops, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"    {e.self_cpu_time_total / steps / 1e3:7.2f} ms  x{e.count // steps:4d}  {e.key[:80]}")


def decode_throughput(generate, args, batch):
    """(steady-state tokens/s, first call at a new length tokens/s, warm-up seconds) of generate() calls.

    Both sides are warmed the same way: a short generate (8 new tokens, timed: the first generate() of
    this batch size, which compiles the kernels it needs where the Triton cache lacks them and captures
    graphs); the first call at the timed length then pays whatever a new length costs (mamba_ssm keys its
    CUDA graphs on the maximum length and captures again; hf_mamba's graph does not depend on it); the
    steady state is the next call at that same length, warmed at exactly the length it is timed at.
    """
    prompt = torch.randint(1, args.vocab, (batch, args.prompt_len), device="cuda")
    getattr(generate, "reset", lambda: None)()
    warmup_seconds, _ = timed(lambda: generate(prompt, 8), CUDA)
    first_seconds, _ = timed(lambda: generate(prompt, args.new_tokens), CUDA)
    seconds, out = timed(lambda: generate(prompt, args.new_tokens), CUDA)
    assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape
    return batch * args.new_tokens / seconds, batch * args.new_tokens / first_seconds, warmup_seconds


def loop_ms_per_token(generate, args, batch, device=CUDA, repeats=3):
    """Wall milliseconds per decoded token without the prompt's prefill and the call's set-up: (a call of
    args.new_tokens - a call of one new token) / (args.new_tokens - 1), medians of `repeats` calls each."""
    prompt = torch.randint(1, args.vocab, (batch, args.prompt_len), device=device)
    whole = statistics.median(timed(lambda: generate(prompt, args.new_tokens), device)[0] for _ in range(repeats))
    one = statistics.median(timed(lambda: generate(prompt, 1), device)[0] for _ in range(repeats))
    return (whole - one) * 1e3 / (args.new_tokens - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip-builtin-train", action="store_true", help="skip Transformers' training run")
    parser.add_argument("--skip-builtin-decode", action="store_true", help="skip Transformers' decoding run")
    parser.add_argument("--builtin-train-steps", type=int, default=2, help="timed steps for Transformers' model")
    parser.add_argument("--rounds", type=int, default=1, help="alternating hf_mamba / mamba_ssm training runs")
    parser.add_argument("--no-decode", action="store_true", help="training only")
    parser.add_argument("--no-train", action="store_true", help="decoding only")
    parser.add_argument("--sample", action="store_true",
                        help="decode by sampling (top-k 50, top-p 0.9, temperature 0.8) instead of greedily")
    parser.add_argument("--loss-outside", action="store_true",
                        help="every model's loss as cross-entropy on fp32-cast logits (default: labels= where taken)")
    parser.add_argument("--padded", action="store_true",
                        help="also train hf_mamba on the same batch left-padded (attention_mask with zeros, a quarter "
                             "of the tokens on average; labels -100 there), beside its unpadded run")
    parser.add_argument("--falcon", action="store_true",
                        help="also train the same weights as a Falcon Mamba (its three norms in every mixer) and "
                             "report what the norms cost")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="training's autocast dtype and the decoding models' weights (default bf16)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens")
    parser.add_argument("--profile", action="store_true", help="per training step: CPU enqueue vs GPU kernel time")
    parser.add_argument("--memory", action="store_true", help="training memory breakdown, then stop")
    parser.add_argument(
        "--decode-profile", action="store_true", help="per decoded token: wall vs GPU kernel time, kernel count"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    if args.quick:
        args.warmup_steps, args.train_steps, args.new_tokens = 1, 3, 32

    torch.manual_seed(0)
    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers)
    # Every model waits on the CPU and only the one being measured sits on the GPU, so each peak
    # memory figure is that model's own (parameters, gradients, optimizer state, activations).
    ours = MambaForCausalLM(config)
    state_dict = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    folder = tempfile.mkdtemp()
    ours.save_pretrained(folder)
    shared_fields = ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "conv_kernel")
    builtin_config = transformers.MambaConfig(**{k: getattr(config, k) for k in shared_fields})
    builtin = transformers.MambaForCausalLM(builtin_config)
    builtin.load_state_dict(state_dict)
    peer = load_peer()
    print(
        f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"mamba_ssm {'found' if peer else 'not installed'}"
    )
    print(
        f"model: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
        f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters"
    )

    def logits_hf(model, ids):
        if args.loss_outside:
            return model(ids, use_cache=False).logits
        out = model(ids, labels=ids, use_cache=False)
        return out.logits, out.loss

    def logits_peer(model, ids):
        return model(ids).logits

    mask = left_padding_mask(args) if args.padded else None

    def logits_hf_padded(model, ids):
        out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
        return out.logits, out.loss

    def on_gpu_only_while(model, measure):
        torch.cuda.empty_cache()
        result = measure(model.cuda())
        model.cpu()
        torch.cuda.empty_cache()
        return result

    if args.memory:
        on_gpu_only_while(ours, lambda m: print_memory_breakdown("hf_mamba (Triton)", m, args, logits_hf))
        if peer:
            on_gpu_only_while(
                peer_model(args, state_dict, peer).cpu(),
                lambda m: print_memory_breakdown("mamba_ssm", m, args, logits_peer),
            )
        return

    warm_shared_cuda(args)
    falcon = None
    if args.falcon:  # the same weights with Falcon Mamba's norms (they have none of their own)
        falcon = MambaForCausalLM(MambaConfig(**{**config.to_dict(), "mixer_rms_eps": 1e-6}))
        falcon.load_state_dict(state_dict)

    rows = []
    ratios = []
    padded_ratios = []  # (tokens/s, peak) of the padded run over the unpadded one, per round
    falcon_ratios = []  # tokens/s of the Falcon Mamba run over the plain one, per round
    # The step is bound by the host enqueueing kernels (docs/kernels.md, "Host time"), whose speed drifts during a
    # run: --rounds alternates hf_mamba and mamba_ssm and reports the ratio of each adjacent pair.
    for round_ in range(0 if args.no_train else args.rounds):
        tps, peak = on_gpu_only_while(ours, lambda m: train_throughput("hf_mamba (Triton)", m, args, logits_hf))
        rows.append((f"hf_mamba (Triton), round {round_ + 1}", tps, peak))
        if args.padded:
            padded_tps, padded_peak = on_gpu_only_while(
                ours, lambda m: train_throughput("hf_mamba (Triton), padded", m, args, logits_hf_padded)
            )
            rows.append((f"hf_mamba (Triton), padded, round {round_ + 1}", padded_tps, padded_peak))
            padded_ratios.append((padded_tps / tps, padded_peak / peak))
        if falcon is not None:
            falcon_tps, falcon_peak = on_gpu_only_while(
                falcon, lambda m: train_throughput("hf_mamba (Triton), Falcon Mamba", m, args, logits_hf)
            )
            rows.append((f"hf_mamba, Falcon Mamba, round {round_ + 1}", falcon_tps, falcon_peak))
            falcon_ratios.append(falcon_tps / tps)
        if peer:
            peer_tps, peer_peak = on_gpu_only_while(
                peer_model(args, state_dict, peer).cpu(),
                lambda m: train_throughput("mamba_ssm", m, args, logits_peer),
            )
            rows.append((f"mamba_ssm, round {round_ + 1}", peer_tps, peer_peak))
            ratios.append(tps / peer_tps)
    if not args.skip_builtin_train and not args.no_train:
        # Its pure-PyTorch fallback runs ~100 tokens/s at this shape: time few steps.
        tps, peak = on_gpu_only_while(builtin, lambda m: train_throughput(
            "transformers built-in", m, args, logits_hf, warmup_steps=1, steps=args.builtin_train_steps
        ))
        rows.append(("transformers built-in", tps, peak))
    loss = "cross-entropy on fp32 logits for all" if args.loss_outside else "labels= (mamba_ssm: on fp32 logits)"
    print(f"\nTraining, batch {args.batch} x {args.seqlen}, {args.dtype} autocast, AdamW, loss {loss}")
    print(f"{'implementation':<34}{'tokens/s':>12}{'peak GiB':>10}")
    for name, tps, peak in rows:
        print(f"{name:<34}{tps:>12,.0f}{peak:>10.2f}")
    if ratios:
        print("hf_mamba / mamba_ssm tokens/s per round: " + ", ".join(f"{r:.2f}" for r in ratios)
              + f"; median {statistics.median(ratios):.2f}")

    if padded_ratios:
        print("hf_mamba padded / unpadded per round, tokens/s and peak: "
              + ", ".join(f"{speed:.3f} / {memory:.3f}" for speed, memory in padded_ratios))

    if falcon_ratios:
        print("hf_mamba Falcon Mamba / plain tokens/s per round (the norms' cost is 1 - ratio): "
              + ", ".join(f"{r:.3f}" for r in falcon_ratios))

    if args.no_decode:
        return
    del ours, falcon
    builtin.cuda().eval()
    # from_pretrained keeps A_log, D and the Δ bias in fp32 (a plain .to(bfloat16) would not).
    dtype = DTYPES[args.dtype]
    ours_half = MambaForCausalLM.from_pretrained(folder, dtype=dtype).cuda().eval()
    decoders = []

    def ours_graphs(prompt, new_tokens):
        ours_half.config.use_cuda_graph = True
        return hf_generate(ours_half, args.sample)(prompt, new_tokens)

    def ours_graph_per_token(prompt, new_tokens):  # Transformers' loop, one graph replay per token
        ours_half.config.use_cuda_graph, ours_half.decode_chunk_size = True, 1
        try:
            return hf_generate(ours_half, args.sample)(prompt, new_tokens)
        finally:
            del ours_half.decode_chunk_size

    def ours_eager(prompt, new_tokens):
        ours_half.config.use_cuda_graph = False
        return hf_generate(ours_half, args.sample)(prompt, new_tokens)

    decoders += [
        ("hf_mamba, CUDA graphs", ours_graphs),
        ("hf_mamba, graph per token", ours_graph_per_token),
        ("hf_mamba, no graphs", ours_eager),
    ]
    if not args.skip_builtin_decode:
        decoders.append(("transformers built-in", hf_generate(builtin.to(dtype))))
    if peer:
        model = peer_model(args, state_dict, peer).to(dtype).eval()
        decoders += [
            ("mamba_ssm, cg=True", peer_generate(model, True, args.sample)),
            ("mamba_ssm, cg=False", peer_generate(model, False, args.sample)),
        ]
    if args.decode_profile:
        print(f"\nDecode profile, {args.dtype}, prompt {args.prompt_len}, 64 new tokens")
        for name, generate in decoders:
            if name in ("hf_mamba, CUDA graphs", "hf_mamba, graph per token", "mamba_ssm, cg=True"):
                for batch in args.decode_batches:
                    prompt = torch.randint(1, args.vocab, (batch, args.prompt_len), device="cuda")
                    getattr(generate, "reset", lambda: None)()
                    print_decode_profile(f"{name}, batch {batch}", generate, prompt)
    # batch -> (wall ms per token, the same without the prefill, ms of the step graph) of hf_mamba with CUDA graphs
    rows, per_step = [], {}
    for name, generate in decoders:
        rows.append((name, [decode_throughput(generate, args, batch) for batch in args.decode_batches]))
        if generate is ours_graphs:  # its graphs, before other decoders' captures evict them
            for batch, speed in zip(args.decode_batches, rows[-1][1], strict=True):
                per_step[batch] = (batch * 1e3 / speed[0], loop_ms_per_token(generate, args, batch),
                                   step_graph_ms(ours_half, batch))
    for title, column in (("steady state, warmed at the timed length", 0), ("first call at a new length", 1)):
        how = "Sampled (top-k 50, top-p 0.9, temperature 0.8)" if args.sample else "Greedy"
        print(f"\n{how} decoding, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens (tokens/s), "
              f"{title}")
        print(f"{'implementation':<26}" + "".join(f"{'batch ' + str(b):>12}" for b in args.decode_batches))
        for name, speeds in rows:
            print(f"{name:<26}" + "".join(f"{s[column]:>12,.0f}" for s in speeds))
    print("\nhf_mamba, CUDA graphs: wall time per decoded token (steady state above; the prompt's prefill spread "
          "over the new tokens), the same without the prefill and the call's set-up, against the GPU time of "
          "one step (its graph replayed back to back), ms")
    for batch, (wall_ms, loop_ms, step_ms) in per_step.items():
        if step_ms:
            print(f"  batch {batch}: wall {wall_ms:.3f}, without the prefill {loop_ms:.3f}, step {step_ms:.3f}, "
                  f"wall / step {wall_ms / step_ms:.2f}, without the prefill / step {loop_ms / step_ms:.2f}")
    # Where the Triton cache starts empty (scripts/dev/device_round.sh gives each run its own), the first
    # batch size's call compiles what generate() needs: hf_mamba's prefill and step kernels, mamba_ssm's
    # Triton norms (its CUDA kernels come compiled). With --decode-profile, the profile ran first.
    print(f"\nFirst generate() per batch size in this process (prompt {args.prompt_len}, 8 new tokens), seconds")
    print(f"{'implementation':<26}" + "".join(f"{'batch ' + str(b):>12}" for b in args.decode_batches))
    for name, speeds in rows:
        print(f"{name:<26}" + "".join(f"{s[2]:>12.2f}" for s in speeds))


if __name__ == "__main__":
    main()
