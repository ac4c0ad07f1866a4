"""Causal-LM fine-tuning of an hf_mamba (or Transformers-format Mamba) model with the Hugging Face Trainer.

Offline demo (no arguments): a tiny random hf_mamba model and a byte-level BPE tokenizer trained on a small
built-in text, a few hundred steps on CPU:

    python scripts/train.py --output-dir outputs/demo

Fine-tune a Hub model on a Hub dataset (packing to 1024 tokens, bf16, gradient checkpointing, eval perplexity):

    python scripts/train.py --model state-spaces/mamba-130m-hf --dataset wikitext --dataset-config wikitext-2-raw-v1 \
        --block-size 1024 --bf16 --gradient-checkpointing --max-steps 1000 --output-dir outputs/mamba-wikitext

Local files (text, json/jsonl or parquet; --text-column names the field), LoRA on every Mamba projection:

    python scripts/train.py --model ./my-mamba --train-file data/train.jsonl --validation-file data/val.jsonl \
        --lora --lora-r 16 --output-dir outputs/lora

Resume (the latest checkpoint in --output-dir, or a given one), share on the Hub:

    python scripts/train.py ... --resume-from-checkpoint latest
    python scripts/train.py ... --push-to-hub --hub-model-id me/mamba-wikitext

Several processes (DDP), or FSDP wrapping each MambaBlock:

    accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...   # also on a CPU-only machine (gloo)
    accelerate launch --multi_gpu --num_processes 8 scripts/train.py ... --fsdp --fsdp-wrap MambaBlock

Logs loss, learning rate and tokens/s (the Trainer's progress bar), evaluates perplexity before and after
training, saves a Hub-ready folder (hf_mamba.hub: safetensors, remote code, model card with the results; the
adapter only with --lora) and prints a short results table.
"""

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import get_last_checkpoint

import hf_mamba
from hf_mamba.hub import upload_folder, write_model_card
from hf_mamba.integrations import LORA_TARGET_MODULES

# Built-in text for the offline default: a few paragraphs about state space models, repeated.
DEMO_TEXT = [
    "A state space model maps an input sequence to an output sequence through a hidden state.",
    "Mamba makes the state space parameters depend on the input, so the model can select what to remember.",
    "The selective scan runs in time linear in the sequence length and needs no attention cache.",
    "During generation each new token is one recurrent step with a state of fixed size.",
    "The discretisation uses a zero order hold: the state decays by exp(delta A) at every step.",
    "A short causal convolution before the scan mixes neighbouring tokens.",
    "Gating with the SiLU of a second projection controls what leaves the block.",
    "Residual blocks with RMS normalisation stack the mixers into a deep network.",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", help="Hub id or folder; default: a tiny random hf_mamba model (offline demo)")
    data.add_argument("--tokenizer", help="Hub id or folder; default: the model's (or a tiny BPE for the demo)")
    data.add_argument("--trust-remote-code", action="store_true", help="for models saved without hf_mamba")
    data.add_argument("--dataset", help="Hub dataset name or local dataset folder")
    data.add_argument("--dataset-config", help="the dataset's configuration name")
    data.add_argument("--train-file", nargs="+", help="local .txt / .json / .jsonl / .parquet files")
    data.add_argument("--validation-file", nargs="+", help="local validation files (same formats)")
    data.add_argument("--text-column", default="text", help="field holding the text (default: text)")
    data.add_argument("--validation-split-percentage", type=float, default=5.0, help="when there is no split")
    data.add_argument("--block-size", type=int, default=128, help="tokens per training sequence")
    data.add_argument("--no-packing", action="store_true", help="one truncated, padded example per text")
    data.add_argument("--max-train-samples", type=int, help="keep at most this many training sequences")
    data.add_argument("--max-eval-samples", type=int, help="keep at most this many evaluation sequences")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="outputs/train")
    train.add_argument("--max-steps", type=int, default=-1, help="overrides --num-train-epochs when > 0")
    train.add_argument("--num-train-epochs", type=float, default=3.0)
    train.add_argument("--per-device-train-batch-size", type=int, default=8)
    train.add_argument("--per-device-eval-batch-size", type=int, default=8)
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=None, help="default 2e-3 (demo), 1e-4 (lora 1e-3)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--lr-scheduler-type", default="linear")
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=0)
    precision = train.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    precision.add_argument("--fp16", action="store_true", help="fp16 mixed precision (loss scaling)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--resume-from-checkpoint", help='a checkpoint folder, or "latest" in --output-dir')
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: at the end only)")
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--save-total-limit", type=int, default=2)
    train.add_argument("--report-to", default="none", help='"none", "tensorboard", "wandb", ...')
    train.add_argument("--dataloader-num-workers", type=int, default=0)
    train.add_argument("--fsdp", action="store_true", help="shard with FSDP (under accelerate launch / torchrun)")
    train.add_argument("--fsdp-wrap", default="MambaBlock", help="layer class FSDP wraps (default MambaBlock)")
    train.add_argument("--use-cpu", action="store_true", help="train on CPU even when a GPU is present")

    lora = parser.add_argument_group("LoRA (PEFT)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    lora.add_argument("--lora-r", type=int, default=8)
    lora.add_argument("--lora-alpha", type=int, default=16)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora-target-modules", nargs="+", help=f"default: {' '.join(LORA_TARGET_MODULES)} (every projection)"
    )

    hub = parser.add_argument_group("sharing")
    hub.add_argument("--push-to-hub", action="store_true", help="upload the saved folder at the end")
    hub.add_argument("--hub-model-id", help="repo id (default: the output folder's name)")
    hub.add_argument("--hub-private", action="store_true")
    hub.add_argument("--license", default="apache-2.0", help="license in the model card")

    demo = parser.add_argument_group("demo model (no --model)")
    demo.add_argument("--hidden-size", type=int, default=64)
    demo.add_argument("--num-hidden-layers", type=int, default=2)
    demo.add_argument("--state-size", type=int, default=16)
    demo.add_argument("--vocab-size", type=int, default=512, help="size of the demo BPE tokenizer")
    args = parser.parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = 2e-3 if args.model is None else (1e-3 if args.lora else 1e-4)
    if args.fsdp and not torch.cuda.is_available():
        # Accelerate runs CPU processes as plain DDP (MULTI_CPU) and never applies FSDP there.
        parser.error("--fsdp needs CUDA devices; on CPU leave it out (the processes then run DDP over gloo)")
    if args.dataset and args.train_file:
        parser.error("give --dataset or --train-file, not both")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data


def load_raw_datasets(args) -> datasets.DatasetDict:
    """{"train", "validation"} text datasets from the Hub, local files, or the built-in demo text."""
    if args.dataset:
        if os.path.isdir(args.dataset) and (Path(args.dataset) / "dataset_dict.json").exists():
            raw = datasets.load_from_disk(args.dataset)
        else:
            raw = datasets.load_dataset(args.dataset, args.dataset_config)
    elif args.train_file:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        extension = Path(args.train_file[0]).suffix.lstrip(".")
        builder = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(extension)
        if builder is None:
            raise ValueError(f"--train-file must be .txt, .json, .jsonl, .parquet or .csv, got {args.train_file[0]}")
        raw = datasets.load_dataset(builder, data_files=files)
    else:
        train = [line for _ in range(40) for line in DEMO_TEXT]
        raw = datasets.DatasetDict(
            train=datasets.Dataset.from_dict({args.text_column: train}),
            validation=datasets.Dataset.from_dict({args.text_column: DEMO_TEXT * 4}),
        )
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        raw = datasets.DatasetDict(train=split["train"], validation=split["test"])
    if args.text_column not in raw["train"].column_names:
        raise ValueError(f"--text-column {args.text_column!r} is not among {raw['train'].column_names}")
    return raw


def tokenize(raw: datasets.DatasetDict, tokenizer, args, training_args) -> datasets.DatasetDict:
    """Token ids, packed into block_size chunks (each text followed by EOS) or truncated one per text."""
    column = args.text_column
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(batch):
        ids = tokenizer(batch[column], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    def pack(batch):
        # Concatenate the batch and cut it into block_size pieces; the remainder of each map batch is dropped.
        stream = [token for row in batch["input_ids"] for token in row]
        usable = len(stream) // args.block_size * args.block_size
        blocks = [stream[i : i + args.block_size] for i in range(0, usable, args.block_size)]
        return {"input_ids": blocks, "labels": [list(block) for block in blocks]}

    def truncate(batch):
        return {"input_ids": [row[: args.block_size] for row in batch["input_ids"]]}

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(encode, batched=True, remove_columns=raw["train"].column_names, desc="tokenizing")
        if args.no_packing:
            tokenized = tokenized.map(truncate, batched=True, desc="truncating")
        else:
            tokenized = tokenized.map(pack, batched=True, batch_size=1000, desc=f"packing to {args.block_size}")
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit is not None:
            tokenized[split] = tokenized[split].select(range(min(limit, len(tokenized[split]))))
    if len(tokenized["train"]) == 0:
        raise ValueError(f"no training sequence of {args.block_size} tokens: lower --block-size or add data")
    return tokenized


# ---------------------------------------------------------------------------------------------------------------
# Model and tokenizer


def train_demo_tokenizer(texts, vocab_size: int):
    """A byte-level BPE trained on `texts`: enough for the offline demo and the tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def load_tokenizer(args, raw):
    if args.tokenizer or args.model:
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer or args.model, trust_remote_code=args.trust_remote_code
        )
    else:
        tokenizer = train_demo_tokenizer(raw["train"][args.text_column], args.vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-NeoX-style tokenizers of the Mamba checkpoints have none
    return tokenizer


def load_model(args, tokenizer):
    if args.model is None:
        config = hf_mamba.MambaConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            state_size=args.state_size,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return hf_mamba.MambaForCausalLM(config)
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if config.model_type == "mamba":
        # A Transformers-format Mamba checkpoint (state-spaces/mamba-*-hf): same weights and config fields, so
        # hf_mamba loads it directly and saves an hf_mamba folder.
        return hf_mamba.MambaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code
    )


def wrap_lora(model, args):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        # None: PEFT's per-model-type default, which hf_mamba registers as every Mamba projection.
        target_modules=args.lora_target_modules,
    )
    model = get_peft_model(model, config)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    return model


# ---------------------------------------------------------------------------------------------------------------
# Logging


class TokensPerSecondCallback(TrainerCallback):
    """Adds the throughput since the previous log line (`tokens_per_second`) to every training log."""

    def __init__(self):
        self.last_time, self.last_tokens, self.history = None, 0, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.last_time is None:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        logs["tokens_per_second"] = round((tokens - self.last_tokens) / max(now - self.last_time, 1e-9), 1)
        self.history.append(logs["tokens_per_second"])
        self.last_time, self.last_tokens = now, tokens


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    transformers.set_seed(args.seed)
    # Transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns).
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    training_args = TrainingArguments(
        **{checkpointing: args.gradient_checkpointing},
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        max_grad_norm=args.max_grad_norm,
        bf16=args.bf16,
        fp16=args.fp16,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps else "no",
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        report_to=args.report_to,
        seed=args.seed,
        dataloader_num_workers=args.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding" if args.no_packing else "all",
        fsdp=True if args.fsdp else None,
        fsdp_config={"transformer_layer_cls_to_wrap": [args.fsdp_wrap]} if args.fsdp else None,
        # Several processes without CUDA (accelerate launch / torchrun on CPU): Accelerate only forms a gloo
        # process group for the Trainer when told the run is on CPU.
        use_cpu=args.use_cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()),
        ddp_find_unused_parameters=False,
    )

    raw = load_raw_datasets(args)
    tokenizer = load_tokenizer(args, raw)
    data = tokenize(raw, tokenizer, args, training_args)
    # Weights load in fp32: --bf16 / --fp16 are mixed precision (autocast) with fp32 master weights.
    model = load_model(args, tokenizer)
    base_config, num_parameters = model.config, model.num_parameters()
    if args.lora:
        model = wrap_lora(model, args)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False) if args.no_packing else default_data_collator
    tokens_per_second = TokensPerSecondCallback()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[tokens_per_second],
    )

    resume = args.resume_from_checkpoint
    if resume == "latest":
        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    eval_before = trainer.evaluate()["eval_loss"] if resume is None else None
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    eval_after = trainer.evaluate()["eval_loss"]

    trainer.save_model(args.output_dir)
    dataset_names = [args.dataset] if args.dataset else None
    results = {"eval_loss": eval_after, "perplexity": perplexity(eval_after)}
    if trainer.is_world_process_zero():
        if not args.lora:  # the adapter folder gets PEFT's own card
            write_model_card(
                args.output_dir,
                base_config,
                model_name=Path(args.hub_model_id or args.output_dir).name,
                repo_id=args.hub_model_id,
                base_model=args.model if args.model and not os.path.isdir(args.model) else None,
                datasets=dataset_names,
                license=args.license,
                eval_results=results,
                num_parameters=num_parameters,
            )
        if args.push_to_hub:
            upload_folder(
                args.output_dir,
                args.hub_model_id or Path(args.output_dir).name,
                private=args.hub_private,
                commit_message="Upload fine-tuned hf_mamba model",
                ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.bin"],
            )

        metrics = train_result.metrics
        rows = [
            ("processes", f"{training_args.world_size}"),
            ("train steps", f"{trainer.state.global_step}"),
            ("train loss", f"{metrics.get('train_loss', float('nan')):.4f}"),
            ("eval perplexity before", f"{perplexity(eval_before):.3f}" if eval_before is not None else "(resumed)"),
            ("eval perplexity after", f"{perplexity(eval_after):.3f}"),
            ("tokens seen", f"{trainer.state.num_input_tokens_seen:,}"),
            (
                "tokens/s (mean of logs)",
                f"{sum(tokens_per_second.history) / max(len(tokens_per_second.history), 1):,.0f}",
            ),
            ("train time", f"{train_seconds:.1f} s"),
            *(
                [("peak CUDA memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")]
                if torch.cuda.is_available()
                else []
            ),
            ("saved to", args.output_dir + (" (adapter)" if args.lora else "")),
        ]
        if args.fsdp:
            wrapped = [m for m in trainer.model_wrapped.modules() if type(m).__name__ == f"FSDP{args.fsdp_wrap}"]
            rows.insert(1, ("FSDP-wrapped blocks", f"{len(wrapped)} x {args.fsdp_wrap}"))
        width = max(len(name) for name, _ in rows)
        print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    return {"eval_loss_before": eval_before, "eval_loss_after": eval_after, "trainer": trainer}


if __name__ == "__main__":
    main()
