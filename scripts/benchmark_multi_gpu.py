"""Data-parallel training, measured: scripts/train.py under `accelerate launch` on several processes (DDP, or
FSDP2 with each MambaBlock a unit), the global batch fixed, beside one process.

    python scripts/benchmark_multi_gpu.py --bf16                        # 1, 2, 4, 8 GPUs (those there are), 130M
    python scripts/benchmark_multi_gpu.py --bf16 --shape 1.4b --gradient-checkpointing
    python scripts/benchmark_multi_gpu.py --bf16 --modes fsdp --fsdp-activation-checkpointing
    python scripts/benchmark_multi_gpu.py --shape tiny --processes 1,2  # CPU processes over gloo (DDP only)
    python scripts/benchmark_multi_gpu.py --bf16 --modes fsdp --resume-check   # + resume on another count

Every run trains the same random-weight model (one folder, written first, with a small BPE tokenizer: the
model keeps its full vocabulary, so the LM head costs what it does) on the same generated text, with the same
seed and --global-batch sequences per step split evenly over the processes. Per run, from train.py's results:
the final train loss, tokens/s of all processes (from the first log to the last: the first interval holds
the kernels' compiles), per process, its share of one process's (scaling efficiency), and the largest
process's peak CUDA memory. train.py needs `datasets` (carry its wheel where it is not installed).

--resume-check: the runs also save a checkpoint halfway; the run on the most processes is then resumed from
it on the fewest (the same global batch), and its final evaluation compared with the uninterrupted run's: a
checkpoint (FSDP: sharded) must resume on another number of processes where it left off.
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from _train_data import train_demo_tokenizer  # noqa: E402

SHAPES = {  # (hidden size, layers, vocabulary)
    "tiny": (32, 2, 512),
    "130m": (768, 24, 50280),
    "1.4b": (2048, 48, 50280),
}
# The results rows of train.py read here, by their names in its table.
ROWS = {
    "processes": "world_size",
    "train steps": "steps",
    "tokens seen": "tokens_seen",
    "eval perplexity after": "perplexity",
    "train loss": "loss",
    "tokens/s after the first log": "tokens_per_s",
    "peak CUDA memory (largest process)": "peak",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpus = torch.cuda.device_count()
    default_processes = [n for n in (1, 2, 4, 8) if n <= max(gpus, 1)] if gpus else [1, 2]
    parser.add_argument("--processes", default=",".join(map(str, default_processes)),
                        help="process counts, comma-separated (default: 1, 2, 4, 8 up to the GPUs there are)")
    parser.add_argument("--modes", default="ddp,fsdp" if gpus else "ddp", help="ddp, fsdp or both (fsdp: CUDA)")
    parser.add_argument("--shape", choices=SHAPES, default="130m" if gpus else "tiny")
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, all processes")
    parser.add_argument("--block-size", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="the model's activation checkpointing")
    parser.add_argument("--fsdp-activation-checkpointing", action="store_true",
                        help="FSDP's own activation checkpointing in the fsdp runs (the ddp runs then checkpoint "
                             "through the model, so both modes recompute the same)")
    parser.add_argument("--resume-check", action="store_true",
                        help="resume the run on the most processes from its halfway checkpoint on the fewest")
    parser.add_argument("--keep", help="keep the model folder, data and run outputs in this folder")
    args = parser.parse_args(argv)
    args.processes = [int(n) for n in args.processes.split(",")]
    args.modes = args.modes.split(",")
    for n in args.processes:
        if n < 1 or args.global_batch % n:
            parser.error(f"--global-batch {args.global_batch} must split evenly over {n} processes")
    if set(args.modes) - {"ddp", "fsdp"}:
        parser.error(f"--modes takes ddp and fsdp, got {','.join(args.modes)}")
    if "fsdp" in args.modes and not torch.cuda.is_available():
        parser.error("--modes fsdp needs CUDA devices (on CPU, Accelerate runs the processes as DDP)")
    if args.resume_check and (len(set(args.processes)) < 2 or args.max_steps < 2):
        parser.error("--resume-check needs two process counts in --processes and --max-steps of 2 or more")
    if gpus and max(args.processes) > gpus:
        parser.error(f"--processes {max(args.processes)}: this machine has {gpus} GPU(s)")
    return args


def write_model_and_data(folder: Path, shape: str, block_size: int, sequences: int, seed: int = 0):
    """A random-weight model of `shape` with a small BPE tokenizer beside it, and a text file of about `sequences`
    blocks of generated words (the same for every run)."""
    import hf_mamba

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(500)]
    # About one token per word: enough lines for the training blocks and a validation split.
    lines = [" ".join(rng.choice(words) for _ in range(64)) for _ in range(sequences * block_size // 48 + 64)]
    text = folder / "train.txt"
    text.write_text("\n".join(lines) + "\n")
    hidden, layers, vocab = SHAPES[shape]
    tokenizer = train_demo_tokenizer(lines[:200], min(vocab, 1024))
    config = hf_mamba.MambaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model_folder = folder / "model"
    hf_mamba.MambaForCausalLM(config).save_pretrained(model_folder)
    tokenizer.save_pretrained(model_folder)
    return model_folder, text


def launch_command(args, mode, processes, model, text, out, resume_from=None):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        command.append("--multi_gpu")
    command += [
        str(SCRIPTS / "train.py"), "--model", str(model), "--train-file", str(text),
        "--block-size", str(args.block_size), "--max-steps", str(args.max_steps),
        "--per-device-train-batch-size", str(args.global_batch // processes),
        "--logging-steps", str(args.logging_steps),
        "--save-steps", str(args.max_steps // 2 if args.resume_check else 10 * args.max_steps),
        "--max-eval-samples", str(args.global_batch), "--output-dir", str(out), "--seed", "0",
    ]  # fmt: skip
    if args.bf16:
        command.append("--bf16")
    if mode == "fsdp":
        command.append("--fsdp")
        if args.fsdp_activation_checkpointing:
            command.append("--fsdp-activation-checkpointing")
    if args.gradient_checkpointing or (mode == "ddp" and args.fsdp_activation_checkpointing):
        command.append("--gradient-checkpointing")
    if resume_from is not None:
        command += ["--resume-from-checkpoint", str(resume_from)]
    return command


def parse_results(stdout: str) -> dict:
    """train.py's results table (name, two or more spaces, value) as numbers, by ROWS' keys."""
    found = {}
    for line in stdout.splitlines():
        name, _, value = line.partition("  ")
        if name.strip() in ROWS:
            number = re.match(r"[\d,.]+", value.strip())
            if number:
                found[ROWS[name.strip()]] = float(number.group().replace(",", ""))
    return found


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="multi_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    model, text = write_model_and_data(work, args.shape, args.block_size, args.global_batch * args.max_steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    def run(mode, processes, out, resume_from=None):
        """One launch: its row (train.py's results, or why it failed)."""
        what = f"resumed on {processes} from {resume_from.name}" if resume_from else f"{processes} process(es)"
        print(f"== {mode}, {what}", flush=True)
        result = subprocess.run(launch_command(args, mode, processes, model, text, out, resume_from),
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return dict(mode=mode, processes=processes, failed=f"exit status {result.returncode}")
        found = parse_results(result.stdout)
        if found.get("world_size") != processes:
            ran = found.get("world_size")
            raise RuntimeError(f"train.py ran {ran} process(es), not {processes}:\n{result.stdout}")
        return dict(mode=mode, processes=processes, **found)

    rows, resumed = [], []
    for mode in args.modes:
        for processes in args.processes:
            rows.append(run(mode, processes, work / f"{mode}-{processes}"))
        if args.resume_check:
            most, fewest = max(args.processes), min(args.processes)
            checkpoint = work / f"{mode}-{most}" / f"checkpoint-{args.max_steps // 2}"
            row = run(mode, fewest, work / f"{mode}-{most}-resumed-on-{fewest}", resume_from=checkpoint)
            uninterrupted = next(r for r in rows if r["mode"] == mode and r["processes"] == most)
            resumed.append(dict(row, saved_on=most, uninterrupted=uninterrupted.get("perplexity")))
        if not args.keep:
            for out in work.glob(f"{mode}-*"):
                shutil.rmtree(out, ignore_errors=True)
    print_table(args, rows)
    print_resumed(args, resumed)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows + resumed


def print_resumed(args, resumed):
    if not resumed:
        return
    print(f"\nResumed from the checkpoint at step {args.max_steps // 2} on another number of processes; eval "
          "perplexity after the last step")
    print("| mode | saved on | resumed on | resumed | uninterrupted |")
    print("|---|---|---|---|---|")
    for row in resumed:
        mine = row.get("failed") or f"{row.get('perplexity', float('nan')):.4f}"
        print(f"| {row['mode']} | {row['saved_on']} | {row['processes']} | {mine} | {row['uninterrupted'] or '-'} |")


def print_table(args, rows):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
    hidden, layers, vocab = SHAPES[args.shape]
    checkpointing = (
        "the model's" if args.gradient_checkpointing else "FSDP's" if args.fsdp_activation_checkpointing else "none"
    )
    print(f"\n{device}; {args.shape} shape ({layers} x {hidden}, vocab {vocab}), random weights; global batch "
          f"{args.global_batch} x {args.block_size} tokens, {args.max_steps} steps, "
          f"{'bf16' if args.bf16 else 'fp32'}; activation checkpointing: {checkpointing}")
    if args.resume_check:
        print("(tokens/s include the write of the halfway checkpoint that --resume-check resumes from)")
    print("| mode | processes | batch per process | train loss | tokens/s | per process | scaling | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['mode']} | {row['processes']} | | {row['failed']} | | | | |")
            continue
        one = next((r for r in rows if r["mode"] == row["mode"] and r["processes"] == 1 and "tokens_per_s" in r), None)
        per = row.get("tokens_per_s", float("nan")) / row["processes"]
        scaling = f"{per / one['tokens_per_s']:.0%}" if one else "-"
        peak = f"{row['peak']:.2f}" if "peak" in row else "-"
        print(f"| {row['mode']} | {row['processes']} | {args.global_batch // row['processes']} | "
              f"{row.get('loss', float('nan')):.4f} | {row.get('tokens_per_s', float('nan')):,.0f} | {per:,.0f} | "
              f"{scaling} | {peak} |")


if __name__ == "__main__":
    main()
