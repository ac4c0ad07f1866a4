"""The main job: train a small Mamba on the paper's selective-copying task, on CPU, in a few minutes.

Selective copying (Gu & Dao 2023, section 4.1.1): a sequence of noise tokens with a few data tokens
scattered at random positions, then a separator; the model must output the data tokens in order.
Solving it needs content-aware selection, which is what the input-dependent Δ, B, C give Mamba.

This script builds a tiny MambaForCausalLM, generates the task with `datasets`, trains with `Trainer`,
prints accuracy before and after, saves with `save_pretrained`, reloads with
`AutoModelForCausalLM.from_pretrained` and generates a few answers.

    python scripts/selective_copying.py                      # offline defaults, CPU, ~2-3 minutes
    python scripts/selective_copying.py --steps 3000 --seq-len 128
    python scripts/selective_copying.py --model state-spaces/mamba-130m-hf --dataset my/copying-dataset
    python scripts/selective_copying.py --save-dataset copying_data   # write the generated task to disk

A --dataset must have `input_ids` and `labels` columns laid out as this script writes them
(use --save-dataset to see one); a --model must have a vocabulary of at least --vocab + 2 tokens.
"""

import argparse
import time

import datasets
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

import hf_mamba  # noqa: F401  (registers the hf_mamba model type with the Auto classes)
from hf_mamba import MambaConfig, MambaForCausalLM


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/selective_copying", help="where the model is saved")
    parser.add_argument("--model", default=None, help="Hub name or folder to start from (default: a fresh tiny Mamba)")
    parser.add_argument("--dataset", default=None, help="Hub name or saved folder with input_ids/labels columns")
    parser.add_argument("--save-dataset", default=None, help="also save the generated dataset to this folder")
    parser.add_argument("--seq-len", type=int, default=64, help="length of the noisy context")
    parser.add_argument("--n-data", type=int, default=8, help="number of data tokens to copy")
    parser.add_argument("--vocab", type=int, default=8, help="number of distinct data tokens")
    parser.add_argument("--train-size", type=int, default=8192)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("seq_len", "n_data", "vocab", "train_size", "eval_size", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_data > args.seq_len:
        parser.error(f"--n-data ({args.n_data}) must be <= --seq-len ({args.seq_len})")
    return args


# Token layout: 0 = noise, 1..vocab = data tokens, vocab + 1 = separator.
NOISE = 0


def make_examples(n, seq_len, n_data, vocab, seed):
    """Rows of input_ids = context + [SEP] + answer, with labels only on the answer."""
    generator = torch.Generator().manual_seed(seed)
    separator = vocab + 1
    data = torch.randint(1, vocab + 1, (n, n_data), generator=generator)
    positions = torch.rand(n, seq_len, generator=generator).argsort(dim=1)[:, :n_data].sort(dim=1).values
    context = torch.full((n, seq_len), NOISE, dtype=torch.long)
    context.scatter_(1, positions, data)
    input_ids = torch.cat([context, torch.full((n, 1), separator), data], dim=1)
    labels = input_ids.clone()
    labels[:, : seq_len + 1] = -100  # score only the copied tokens
    return {"input_ids": input_ids.tolist(), "labels": labels.tolist()}


def load_task(args):
    if args.dataset is not None:
        try:
            loaded = datasets.load_from_disk(args.dataset)
        except FileNotFoundError:
            loaded = datasets.load_dataset(args.dataset)
        return loaded["train"], loaded["test"]
    train = datasets.Dataset.from_dict(
        make_examples(args.train_size, args.seq_len, args.n_data, args.vocab, args.seed)
    )
    test = datasets.Dataset.from_dict(
        make_examples(args.eval_size, args.seq_len, args.n_data, args.vocab, args.seed + 1)
    )
    return train, test


@torch.no_grad()
def copy_accuracy(model, dataset, batch_size=128):
    """Fraction of answer tokens predicted correctly (teacher forcing) and of fully correct answers."""
    model.eval()
    correct = total = exact = 0
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
        predictions = model(ids.to(model.device), use_cache=False).logits[:, :-1].argmax(-1).cpu()
        targets = labels[:, 1:]
        scored = targets != -100
        hits = (predictions == targets) & scored
        correct += hits.sum().item()
        total += scored.sum().item()
        exact += (hits.sum(1) == scored.sum(1)).sum().item()
    return correct / total, exact / len(dataset)


def build_model(args):
    if args.model is not None:
        return AutoModelForCausalLM.from_pretrained(args.model)
    config = MambaConfig(
        vocab_size=args.vocab + 2,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        state_size=16,
        pad_token_id=NOISE,
        bos_token_id=NOISE,
        eos_token_id=NOISE,
    )
    return MambaForCausalLM(config)


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    train, test = load_task(args)
    if args.save_dataset:
        datasets.DatasetDict({"train": train, "test": test}).save_to_disk(args.save_dataset)
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {type(model).__name__}, {n_params / 1e3:.1f}k parameters; task: {len(train)} train / {len(test)} test"
    )

    before = copy_accuracy(model, test)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.1,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    started = time.perf_counter()
    Trainer(model=model, args=training_args, train_dataset=train).train()
    train_seconds = time.perf_counter() - started
    after = copy_accuracy(model, test)

    model.save_pretrained(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    reload_accuracy = copy_accuracy(reloaded, test)

    print("\nSelective copying, answer tokens predicted correctly (teacher forcing) / whole answers exact")
    print(f"{'':<22}{'token acc':>10}{'exact':>10}")
    print(f"{'before training':<22}{before[0]:>10.3f}{before[1]:>10.3f}")
    print(f"{'after training':<22}{after[0]:>10.3f}{after[1]:>10.3f}")
    print(f"{'reloaded from disk':<22}{reload_accuracy[0]:>10.3f}{reload_accuracy[1]:>10.3f}")
    print(
        f"trained {args.steps} steps in {train_seconds:.0f} s; saved to {args.output_dir}; "
        f"reloaded as {type(reloaded).__name__}"
    )

    print("\nGenerated answers (greedy, with the recurrent cache):")
    context_len = len(test[0]["input_ids"]) - sum(label != -100 for label in test[0]["labels"])
    for row in test.select(range(3)):
        prompt = torch.tensor([row["input_ids"][:context_len]])
        output = reloaded.generate(prompt, max_new_tokens=len(row["input_ids"]) - context_len, do_sample=False)
        print(f"  target {row['input_ids'][context_len:]}  generated {output[0, context_len:].tolist()}")


if __name__ == "__main__":
    main()
