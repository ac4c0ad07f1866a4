"""Helpers the benchmark scripts share (benchmark_model.py, benchmark_large.py): timing that waits for the
device, the next-token loss of a training step, greedy decoding with hf_mamba and with mamba_ssm,
and where a decoded token's time goes."""

import time

import torch
import torch.nn.functional as F


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of fn(), with the device idle before and after (kernels run asynchronously)."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def next_token_loss(logits, ids):
    """Cross-entropy of each position's logits against the next token, in fp32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# Sampling settings both sides take (SAMPLING["top_k"] etc.), for --sample.
SAMPLING = dict(top_k=50, top_p=0.9, temperature=0.8)


def hf_generate(model, sample=False):
    """generate(prompt, new_tokens): greedy decoding (or sampling with SAMPLING) of exactly new_tokens tokens
    with a Transformers model."""
    how = dict(do_sample=True, **SAMPLING) if sample else dict(do_sample=False)

    def generate(prompt, new_tokens):
        with torch.no_grad():
            return model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **how,
            )

    return generate


def peer_generate(model, cg, sample=False):
    """generate(prompt, new_tokens) for mamba_ssm's MambaLMHeadModel (greedy, or sampling with SAMPLING; with
    its CUDA graphs where cg), and generate.reset(), which drops its decode graphs."""
    how = SAMPLING if sample else dict(top_k=1)

    def generate(prompt, new_tokens):
        out = model.generate(prompt, max_length=prompt.shape[1] + new_tokens, cg=cg, **how)
        return out if torch.is_tensor(out) else out.sequences

    def reset():
        # mamba_ssm keeps one graph cache per model; going back to an earlier batch size after another
        # fails its capture ("conv_state must have shape ..."), so each measurement starts afresh.
        model._decoding_cache = None

    generate.reset = reset
    return generate


def step_graph_ms(model, batch, replays=200):
    """GPU time of one decode step as generate() runs it, ms: the selecting step's graph captured for `batch`
    rows replayed back to back (the host only enqueues; the launch gaps inside the graph count), or None where
    the model holds no such graph."""
    from hf_mamba.decode_graphs import SelectStep

    for entry in model._decode_graphs.entries:
        graphs = [graph for kind, graph in entry.graphs.items() if isinstance(kind, SelectStep)]
        if entry.key[0] == batch and graphs:
            graph = graphs[-1].graph
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / replays
    return None


def print_decode_profile(name, generate, prompt, new_tokens=64, top=12):
    """Where a decoded token's time goes: wall time against GPU kernel time, kernel count, and the top kernels'
    GPU time per token. generate(prompt, new_tokens) runs once at new_tokens first, so that an implementation
    that keys its decode graphs on the maximum length (mamba_ssm) is warm at the profiled length.

    The profiled call includes the prompt's prefill (one forward), spread over the new tokens.
    """
    device = prompt.device
    generate(prompt, new_tokens)  # compile kernels, capture graphs at this length
    seconds, _ = timed(lambda: generate(prompt, new_tokens), device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        generate(prompt, new_tokens)
        sync(device)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / new_tokens
    count = sum(e.count for e in kernels) / new_tokens
    print(f"{name}: wall {seconds * 1e3 / new_tokens:.3f} ms/token, GPU kernels {gpu_ms:.3f} ms/token, "
          f"{count:.0f} kernels/token")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"    {e.self_device_time_total / new_tokens / 1e3:7.4f} ms  x{e.count / new_tokens:5.1f}  {e.key[:90]}")
    host_ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    print("  host, top by self CPU time per token (profiler-inflated):")
    for e in sorted(host_ops, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"    {e.self_cpu_time_total / new_tokens / 1e3:7.4f} ms  x{e.count / new_tokens:5.1f}  {e.key[:80]}")
