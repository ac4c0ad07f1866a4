"""Million-token prompts on one GPU: the 130M shape at batch 1, prompts of 2^14 ... 2^20 tokens.

Each prompt goes through the model two ways: prefilled in chunks through the recurrent cache
(hf_mamba.generation.prefill_in_chunks: peak memory that of one chunk, flat in the prompt's length) and
in one forward (activations of every position: memory linear in the length). Per length: peak memory,
tokens/s (each length's first one-forward call, which may compile, untimed), and how far the last
position's logits of the two ways differ. After the chunked runs, generate() continues after the longest
prefill (the cache has seen all but the last prompt token; generate feeds that one and decodes), and its
first token is checked against the chunked prefill's next-token prediction. The one-forward runs come last:
an out-of-memory (or other runtime) error there is reported in the table instead of ending the run.

    python scripts/long_context.py                               # GPU: random-init 130M shape, bf16, 2^14 ... 2^20
    python scripts/long_context.py --model path/to/mamba-130m    # a local checkpoint instead (offline)
    python scripts/long_context.py --tiny                        # CPU smoke test: tiny model, 2^8 ... 2^11

Prompts are random token ids: memory and speed do not depend on the text. Results also go to
--out-dir/results.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from hf_mamba import MambaCache, MambaConfig, MambaForCausalLM
from hf_mamba.generation import prefill_in_chunks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local model folder (default: the 130M shape, random init)")
    parser.add_argument("--min-log2", type=int, default=None, help="shortest prompt 2^N (default 14; --tiny 8)")
    parser.add_argument("--max-log2", type=int, default=None, help="longest prompt 2^N (default 20; --tiny 11)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default 16384; --tiny 256)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generate() adds after the longest prompt")
    parser.add_argument("--no-full", action="store_true", help="skip the one-forward runs")
    parser.add_argument("--hidden-size", type=int, default=None, help="default 768 (130M shape; --tiny 32)")
    parser.add_argument("--layers", type=int, default=None, help="default 24 (--tiny 2)")
    parser.add_argument("--vocab", type=int, default=None, help="default 50280 (--tiny 256)")
    parser.add_argument("--tiny", action="store_true", help="smoke-test presets: tiny model, 2^8 ... 2^11, chunks 256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="outputs/long_context")
    args = parser.parse_args(argv)
    presets = dict(min_log2=8, max_log2=11, chunk_size=256, hidden_size=32, layers=2, vocab=256) if args.tiny else (
        dict(min_log2=14, max_log2=20, chunk_size=16384, hidden_size=768, layers=24, vocab=50280)
    )
    for name, value in presets.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = DTYPES[args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")]
    for name in ("chunk_size", "new_tokens", "hidden_size", "layers", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.min_log2 <= args.max_log2 <= 24:
        parser.error(f"need 1 <= --min-log2 <= --max-log2 <= 24, got {args.min_log2}, {args.max_log2}")
    return args


def build_model(args):
    if args.model is not None:
        return MambaForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    config = MambaConfig(vocab_size=args.vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers)
    torch.manual_seed(args.seed)
    # Through a save/load so that A_log, D and the Δ bias stay fp32, as from_pretrained(dtype=...) keeps them.
    model = MambaForCausalLM(config)
    return model.to(args.dtype) if args.dtype == torch.float32 else _reloaded(model, args.dtype)


def _reloaded(model, dtype):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return MambaForCausalLM.from_pretrained(folder, dtype=dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args, fn, catch=False):
    """(result, seconds, peak GiB or None, error): fn() timed and its peak memory; with `catch`, an
    out-of-memory or other runtime error is returned (first line) instead of raised."""
    device = args.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    started = time.perf_counter()
    try:
        result = fn()
        _sync(device)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not catch:
            raise
        message = "out of memory" if isinstance(error, torch.OutOfMemoryError) else str(error).splitlines()[0]
        del error  # its traceback holds the frames' tensors
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None, None, message
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return result, seconds, peak, None


def last_logits(output):
    return output.logits[:, -1].float()


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    model = build_model(args).to(args.device).eval()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    lengths = [2**k for k in range(args.min_log2, args.max_log2 + 1)]
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, lengths[-1]), generator=generator).to(args.device)
    device_name = torch.cuda.get_device_name() if args.device.type == "cuda" else "CPU"
    dtype_name = str(args.dtype).replace("torch.", "")
    print(f"model: d_model {model.config.hidden_size}, {model.config.num_hidden_layers} layers, vocab "
          f"{model.config.vocab_size}, {dtype_name}, weights {weights_gib:.2f} GiB, on {device_name}; "
          f"chunks of {args.chunk_size} tokens")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, torch.device | torch.dtype) else v for k, v in vars(args).items()}

    def save(rows, continuation):
        results = {"args": settings, "device": device_name, "rows": rows, "generate": continuation}
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))

    # Compile the kernels (first calls) outside the measurements: two chunks, so that a chunk continuing
    # from the cache has run too.
    warm = prompt[:, : min(lengths[-1], 2 * args.chunk_size)]
    prefill_in_chunks(model, warm, chunk_size=args.chunk_size)
    model(warm, use_cache=True, logits_to_keep=1)

    # 1. Chunked prefill at every length.
    rows, chunked_logits = [], {}
    for length in lengths:
        logits, seconds, peak, _ = measure(
            args, lambda length=length: last_logits(prefill_in_chunks(model, prompt[:, :length], args.chunk_size))
        )
        chunked_logits[length] = logits
        rows.append({"length": length, "chunked_s": seconds, "chunked_peak_gib": peak,
                     "chunked_tok_s": length / seconds})
        print(f"  chunked     {length:>9,} tokens: {length / seconds:>12,.0f} tok/s, peak {_gib(peak)} GiB",
              flush=True)
    save(rows, None)

    # 2. generate() after the longest prefill: the cache has seen all but the last token.
    cache = MambaCache(model.config, 1, dtype=model.get_input_embeddings().weight.dtype, device=args.device)
    _, prefill_s, prefill_peak, _ = measure(
        args, lambda: prefill_in_chunks(model, prompt[:, :-1], chunk_size=args.chunk_size, cache=cache)
    )
    generated, generate_s, generate_peak, _ = measure(
        args, lambda: model.generate(prompt, cache=cache, max_new_tokens=args.new_tokens, do_sample=False,
                                     min_new_tokens=args.new_tokens)
    )
    new = generated[0, lengths[-1] :]
    next_token = chunked_logits[lengths[-1]].argmax(-1)  # the full chunked prefill's prediction
    continuation = {
        "prompt_tokens": lengths[-1], "new_tokens": len(new), "decode_tok_s": len(new) / generate_s,
        "prefill_s": prefill_s,
        "peak_gib": max(prefill_peak, generate_peak) if prefill_peak is not None else None,
        "cache_offset": cache.seqlen_offset, "first_token_matches_prefill": bool(new[0] == next_token[0]),
    }
    cache = generated = None  # the 2^20-token runs below need the memory
    save(rows, continuation)

    # 3. One forward per length, last: a length that does not fit reports its error instead of stopping the run.
    show_full = not args.no_full
    for row in rows if show_full else []:
        length = row["length"]

        def one_forward(length=length):
            return last_logits(model(prompt[:, :length], use_cache=True, logits_to_keep=1))

        # Each length's launch plan may differ (segments per channel): its first call compiles, untimed.
        logits, seconds, peak, error = measure(args, one_forward, catch=True)
        if error is None:
            logits, seconds, peak, error = measure(args, one_forward, catch=True)
        row.update(full_s=seconds, full_peak_gib=peak, full_error=error,
                   full_tok_s=length / seconds if seconds else None,
                   max_logit_diff=(chunked_logits[length] - logits).abs().max().item() if logits is not None else None)
        print(f"  one forward {length:>9,} tokens: "
              + (error if error else f"{row['full_tok_s']:>12,.0f} tok/s, peak {_gib(peak)} GiB"), flush=True)
        save(rows, continuation)

    peak_note = (f"peak = torch.cuda.max_memory_allocated, weights ({weights_gib:.2f} GiB) included"
                 if args.device.type == "cuda" else "peak memory: measured on a GPU only")
    print(f"\nPrefill at batch 1, {dtype_name}, {device_name}; {peak_note}")
    header = f"{'tokens':>10} | {'chunked tok/s':>13} {'peak GiB':>9}"
    if show_full:
        header += f" | {'one forward tok/s':>17} {'peak GiB':>9} | {'max |Δ logit|':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['length']:>10,} | {row['chunked_tok_s']:>13,.0f} {_gib(row['chunked_peak_gib']):>9}"
        if show_full:
            if row["full_error"]:
                line += f" | {row['full_error'][:40]}"
            else:
                line += (f" | {row['full_tok_s']:>17,.0f} {_gib(row['full_peak_gib']):>9} | "
                         f"{row['max_logit_diff']:>13.2e}")
        print(line)
    print(f"\ngenerate() after a {lengths[-1]:,}-token chunked prefill ({prefill_s:.1f} s): "
          f"{continuation['new_tokens']} new tokens at {continuation['decode_tok_s']:,.1f} tok/s, peak "
          f"{_gib(continuation['peak_gib'])} GiB; cache offset {continuation['cache_offset']:,} (= prompt + new - 1); "
          f"first token {'matches' if continuation['first_token_matches_prefill'] else 'DIFFERS from'} the "
          f"prefill's prediction")
    print(f"results: {out_dir / 'results.json'}")
    return rows, continuation


def _gib(value):
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
