"""The paper's induction-heads task and its length extrapolation (Gu & Dao 2023, section 4.1.2, Table 2).

Each sequence holds random tokens from a vocabulary of 16; somewhere in it a special token is followed by
a key token, and the sequence ends with the special token again: the model must answer with the key. A
2-layer Mamba (d_model 64, d_state 16) is trained at length 256 on freshly generated sequences every step,
then tested at lengths 2^6 ... 2^20; the paper reports perfect accuracy all the way to 2^20, 4096 times
the training length. Long test sequences go through the model in chunks carried by the recurrent cache
(hf_mamba.generation.prefill_in_chunks), so memory stays that of one chunk whatever the length.

    python scripts/induction_heads.py                         # CPU default: test up to 2^14, a few minutes
    python scripts/induction_heads.py --steps 5000 --solved-streak 0   # GPU: longer training, test to 2^20
    python scripts/induction_heads.py --max-test-log2 10 --eval-size 16  # quicker look

Training uses a curriculum (the trigger close to the query at first, anywhere after the first third of
the steps; --curriculum-steps 0 turns it off): without it the task stays at chance for thousands of
steps (the paper trains about 200K steps of batch 8).

Writes a table (stdout and --out-dir/induction_heads.md), the numbers (results.json) and, if matplotlib
is installed (pip install 'hf_mamba[plot]'), a plot of accuracy against test length (induction_heads.png).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import set_seed

from hf_mamba import MambaConfig, MambaForCausalLM
from hf_mamba.generation import prefill_in_chunks

PAPER_CLAIM = "Mamba: 100% accuracy at every test length from 2^6 to 2^20 (trained at 2^8)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="outputs/induction_heads")
    parser.add_argument("--vocab", type=int, default=16, help="number of ordinary tokens (the special one is extra)")
    parser.add_argument("--train-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1500, help="most training steps (stops early once solved)")
    parser.add_argument("--solved-streak", type=int, default=200,
                        help="stop after this many steps in a row at 100%% past the curriculum (0: never)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--state-size", type=int, default=16)
    parser.add_argument("--min-test-log2", type=int, default=6)
    parser.add_argument("--max-test-log2", type=int, default=None, help="default: 20 on a GPU, 14 on CPU")
    parser.add_argument("--eval-size", type=int, default=None, help="test sequences per length (GPU 256, CPU 64)")
    parser.add_argument("--eval-batch", type=int, default=None, help="sequences per forward (GPU 64, CPU 16)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (GPU 65536, CPU 2048)")
    parser.add_argument("--curriculum-steps", type=int, default=None,
                        help="steps over which the trigger-to-query distance grows to the whole sequence "
                             "(default: a third of --steps; 0: the paper's distribution from the start)")
    parser.add_argument("--log-every", type=int, default=None, help="steps between progress lines (default steps/20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    defaults = dict(max_test_log2=20 if gpu else 14, eval_size=256 if gpu else 64, eval_batch=64 if gpu else 16,
                    chunk_size=65536 if gpu else 2048)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("vocab", "train_len", "steps", "batch_size", "hidden_size", "layers", "state_size", "eval_size",
                 "eval_batch", "chunk_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_len < 4 or 2**args.min_test_log2 < 4:
        parser.error("sequences need at least 4 tokens (special, key, ..., special)")
    if args.max_test_log2 < args.min_test_log2 or args.max_test_log2 > 24:
        parser.error(f"--max-test-log2 must lie in [--min-test-log2 ({args.min_test_log2}), 24], got "
                     f"{args.max_test_log2}")
    return args


def induction_batch(batch, seqlen, vocab, generator, device, max_gap=None):
    """(input_ids (batch, seqlen), keys (batch,)): random tokens 0..vocab-1; at a random position the special
    token (id vocab) then the key; the last token is the special token, after which the key is the answer.

    max_gap: the first special token at most this many positions before the last one (None: anywhere)."""
    special = vocab
    ids = torch.randint(0, vocab, (batch, seqlen), generator=generator, device=device)
    keys = torch.randint(0, vocab, (batch,), generator=generator, device=device)
    # The first special token anywhere before the final one (or within max_gap of it), its key right after.
    lowest = 0 if max_gap is None else max(0, seqlen - 1 - max_gap)
    where = torch.randint(lowest, seqlen - 2, (batch,), generator=generator, device=device)
    rows = torch.arange(batch, device=device)
    ids[rows, where] = special
    ids[rows, where + 1] = keys
    ids[:, -1] = special
    return ids, keys


def build_model(args):
    config = MambaConfig(
        vocab_size=args.vocab + 1, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        state_size=args.state_size, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    return MambaForCausalLM(config)


def train(model, args):
    """Fresh sequences every step; loss on the answer only. Stops once args.solved_streak steps in a row past
    the curriculum were all right."""
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    model.train()
    recent, streak, log_every = [], 0, args.log_every or max(1, args.steps // 20)
    started = time.perf_counter()
    curriculum = args.steps // 3 if args.curriculum_steps is None else args.curriculum_steps
    for step in range(1, args.steps + 1):
        # Curriculum: the first trigger within max_gap of the query, max_gap growing from 8 to the whole
        # sequence; short distances give the state a gradient before it has learned to ignore the noise.
        max_gap = None
        if step <= curriculum:
            max_gap = 8 + (args.train_len - 8) * step // curriculum
        ids, keys = induction_batch(args.batch_size, args.train_len, args.vocab, generator, args.device, max_gap)
        logits = model(ids, logits_to_keep=1, use_cache=False).logits[:, -1]  # (batch, vocab + 1)
        loss = F.cross_entropy(logits.float(), keys)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        accuracy = (logits.argmax(-1) == keys).float().mean().item()
        recent = (recent + [accuracy])[-log_every:]
        streak = streak + 1 if accuracy == 1.0 and step > curriculum else 0
        solved = args.solved_streak > 0 and streak == args.solved_streak
        if step % log_every == 0 or solved:
            print(f"  step {step:>6}/{args.steps}  loss {loss.item():.4f}  train accuracy (last {len(recent)}) "
                  f"{sum(recent) / len(recent):.3f}  max gap {max_gap or args.train_len - 1}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        if solved:
            print(f"  solved: {streak} steps in a row at 100% (step {step})")
            break
    return step, time.perf_counter() - started


@torch.no_grad()
def evaluate(model, args, seqlen):
    """Accuracy of the answer at the last position over args.eval_size fresh sequences of `seqlen` tokens."""
    model.eval()
    generator = torch.Generator(device=args.device).manual_seed(args.seed + seqlen)
    correct = 0
    for start in range(0, args.eval_size, args.eval_batch):
        batch = min(args.eval_batch, args.eval_size - start)
        ids, keys = induction_batch(batch, seqlen, args.vocab, generator, args.device)
        logits = prefill_in_chunks(model, ids, chunk_size=args.chunk_size, logits_to_keep=1).logits[:, -1]
        correct += (logits.argmax(-1) == keys).sum().item()
    return correct / args.eval_size


def write_plot(rows, args, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'hf_mamba[plot]')")
        return None
    lengths = [row["length"] for row in rows]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(lengths, [row["accuracy"] for row in rows], marker="o", label="hf_mamba (this run)")
    axes.plot([2**6, 2**20], [1.0, 1.0], linestyle="--", color="gray", label="paper: Mamba, 2^6 to 2^20")
    axes.axhline(1 / args.vocab, color="gray", linestyle=":", label=f"chance (1/{args.vocab})")
    axes.axvline(args.train_len, color="red", linestyle=":", label=f"training length {args.train_len}")
    axes.set_xscale("log", base=2)
    axes.set_ylim(-0.02, 1.05)
    axes.set_xlabel("test sequence length")
    axes.set_ylabel("accuracy")
    axes.set_title(f"Induction heads, {args.layers}-layer Mamba (d_model {args.hidden_size})")
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.device.type == "cpu":
        # A 66k-parameter model gains nothing from intra-op threads, and on a busy machine they cost 10x.
        torch.set_num_threads(1)
    set_seed(args.seed)
    model = build_model(args).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.layers}-layer Mamba, d_model {args.hidden_size}, d_state {args.state_size}, {n_params / 1e3:.1f}k "
          f"parameters, on {args.device}; training at length {args.train_len}, batch {args.batch_size}")
    steps, train_seconds = train(model, args)

    rows = []
    print(f"\nTest lengths 2^{args.min_test_log2} ... 2^{args.max_test_log2}, {args.eval_size} sequences each, "
          f"chunks of {args.chunk_size} tokens")
    for log2 in range(args.min_test_log2, args.max_test_log2 + 1):
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        accuracy = evaluate(model, args, 2**log2)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.type == "cuda" else None
        rows.append({"log2": log2, "length": 2**log2, "accuracy": accuracy, "seconds": seconds, "peak_gib": peak})
        print(f"  2^{log2:<3} accuracy {accuracy:.4f}  ({seconds:.1f} s)", flush=True)

    lines = [
        f"Induction heads: {args.layers}-layer Mamba (d_model {args.hidden_size}, d_state {args.state_size}, "
        f"{n_params / 1e3:.1f}k parameters), vocab {args.vocab} + special token, trained at length {args.train_len} "
        f"for {steps} steps of batch {args.batch_size} ({train_seconds:.0f} s on {args.device}); "
        f"{args.eval_size} test sequences per length.",
        "",
        "| test length | accuracy | seconds |" + (" peak GiB |" if args.device.type == "cuda" else ""),
        "|---:|---:|---:|" + ("---:|" if args.device.type == "cuda" else ""),
    ]
    for row in rows:
        peak = f" {row['peak_gib']:.2f} |" if row["peak_gib"] is not None else ""
        lines.append(f"| 2^{row['log2']} = {row['length']:,} | {row['accuracy']:.4f} | {row['seconds']:.1f} |{peak}")
    lines += ["", f"Paper (Gu & Dao 2023, Table 2): {PAPER_CLAIM}."]
    table = "\n".join(lines)
    print("\n" + table)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "induction_heads.md").write_text(table + "\n")
    summary = {"args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
               "train_steps": steps, "train_seconds": train_seconds, "n_params": n_params, "results": rows}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    plot = write_plot(rows, args, out_dir / "induction_heads.png")
    print(f"\nwrote {out_dir / 'induction_heads.md'}, {out_dir / 'results.json'}" + (f", {plot}" if plot else ""))
    return summary


if __name__ == "__main__":
    main()
