"""Causal-LM fine-tuning of an hf_mamba (or Transformers-format Mamba) model with the Hugging Face Trainer.

Offline demo (no arguments): a tiny random hf_mamba model and a byte-level BPE tokenizer trained on a small
built-in text, a few hundred steps on CPU:

    python scripts/train.py --output-dir outputs/demo

Fine-tune a Hub model on a Hub dataset (packing to 1024 tokens, bf16 on a GPU that has it, gradient
checkpointing, eval perplexity):

    python scripts/train.py --model state-spaces/mamba-130m-hf --dataset wikitext --dataset-config wikitext-2-raw-v1 \
        --block-size 1024 --bf16 --gradient-checkpointing --max-steps 1000 --output-dir outputs/mamba-wikitext

Local files (text, json/jsonl, parquet or csv; --text-column names the field), LoRA on every Mamba projection.
The model folder needs its tokenizer files beside the weights, or name one with --tokenizer:

    python scripts/train.py --model ./my-mamba --train-file data/train.jsonl --validation-file data/val.jsonl \
        --lora --lora-r 16 --output-dir outputs/lora

QLoRA: the same LoRA adapters on a frozen 4-bit base (bitsandbytes nf4 with double quantization, computing in
the --bf16 / --fp16 dtype, else fp32); the adapter it saves loads on the 4-bit or the unquantised base:

    python scripts/train.py --model tiiuae/falcon-mamba-7b --dataset wikitext --dataset-config wikitext-2-raw-v1 \
        --load-in-4bit --lora --lora-r 16 --lora-alpha 32 --bf16 --gradient-checkpointing --output-dir outputs/qlora

Interrupt and resume: Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and exits
(130 / 143); a second Ctrl-C stops at once. The same command plus `--resume-from-checkpoint latest` continues
from the newest complete checkpoint in --output-dir (half-written ones are skipped, and said so) with the
losses an uninterrupted run would have had; or give a checkpoint folder:

    python scripts/train.py ... --resume-from-checkpoint latest
    python scripts/train.py ... --resume-from-checkpoint outputs/lora/checkpoint-500

Share on the Hub at the end:

    python scripts/train.py ... --push-to-hub --hub-model-id me/mamba-wikitext

fp16 on a GPU without bf16 (V100, T4): the GradScaler's growth interval and first scale can be set, which the
Trainer has no settings for (docs/reliability.md: with 100, fp16 LoRA followed fp32 LoRA):

    python scripts/train.py ... --fp16 --scaler-growth-interval 100 --scaler-init-scale 512

Several processes (DDP), or FSDP wrapping each MambaBlock (with FSDP's own activation checkpointing, or the
model's --gradient-checkpointing); scripts/benchmark_multi_gpu.py measures their scaling:

    accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...   # also on a CPU-only machine (gloo)
    accelerate launch --multi_gpu --num_processes 8 scripts/train.py ... --fsdp --fsdp-wrap MambaBlock \
        --fsdp-activation-checkpointing

Logs loss, learning rate and tokens/s (the Trainer's progress bar), evaluates perplexity before and after
training, saves a Hub-ready folder with the tokenizer (hf_mamba.hub: safetensors, remote code, model card with
the results; the adapter only with --lora) and prints a short results table. Bad flags and data (an empty
file, rows without text, a tokenizer that encodes the text as nothing, data too short for --block-size) stop
with a one-line error naming the flag, file or row, before any training.
"""

import argparse
import importlib.util
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.utils import is_torch_bf16_gpu_available

import hf_mamba
from hf_mamba.compat import checkpointing_training_args
from hf_mamba.hub import upload_folder, write_model_card
from hf_mamba.integrations import LORA_TARGET_MODULES
from hf_mamba.loading import ModelFolderError, check_tokenizer_fits, is_local_path

# The data and checkpoint helpers live beside this file (scripts/ is sys.path[0] only when run as a script; the
# tests load it by path). DEMO_TEXT, train_demo_tokenizer and checkpoint_problem: for the tests, which reach them
# here.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train_checkpoints import StopOnSignal, checkpoint_problem, resolve_checkpoint  # noqa: E402, F401
from _train_data import (  # noqa: E402, F401
    DEMO_TEXT,
    check_tokenizer,
    fail,
    load_raw_datasets,
    load_tokenizer,
    tokenize,
    train_demo_tokenizer,
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _looks_like_path(name: str) -> bool:
    """A local path, not a Hub id: hf_mamba.loading's rule, which from_pretrained follows too."""
    return is_local_path(name)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line: the usage of this many flags would bury the message (--help prints it).
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", help="Hub id or folder; default: a tiny random hf_mamba model (offline demo)")
    data.add_argument("--tokenizer", help="Hub id or folder; default: the model's (or a tiny BPE for the demo)")
    data.add_argument("--trust-remote-code", action="store_true", help="for models saved without hf_mamba")
    data.add_argument("--dataset", help="Hub dataset name or local dataset folder")
    data.add_argument("--dataset-config", help="the dataset's configuration name")
    data.add_argument("--train-file", nargs="+", help="local .txt / .json / .jsonl / .parquet / .csv files")
    data.add_argument("--validation-file", nargs="+", help="local validation files (same formats)")
    data.add_argument("--text-column", default="text", help="field holding the text (default: text)")
    data.add_argument("--validation-split-percentage", type=float, default=5.0, help="when there is no split")
    data.add_argument("--block-size", type=positive_int, default=128, help="tokens per training sequence")
    data.add_argument("--no-packing", action="store_true", help="one truncated, padded example per text")
    data.add_argument("--max-train-samples", type=positive_int, help="keep at most this many training sequences")
    data.add_argument("--max-eval-samples", type=positive_int, help="keep at most this many evaluation sequences")

    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="outputs/train")
    train.add_argument("--max-steps", type=int, default=-1, help="overrides --num-train-epochs when > 0")
    train.add_argument("--num-train-epochs", type=float, default=3.0)
    train.add_argument("--per-device-train-batch-size", type=positive_int, default=8)
    train.add_argument("--per-device-eval-batch-size", type=positive_int, default=8)
    train.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    train.add_argument("--learning-rate", type=float, default=None, help="default 2e-3 (demo), 1e-4 (lora 1e-3)")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--lr-scheduler-type", default="linear")
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=0)
    precision = train.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bf16 mixed precision (a GPU with bf16, or --use-cpu)")
    precision.add_argument("--fp16", action="store_true", help="fp16 mixed precision (loss scaling)")
    train.add_argument(
        "--scaler-growth-interval", type=positive_int,
        help="--fp16: steps without an overflow before the loss scale doubles (default the GradScaler's 2000; "
        "100 kept an fp16 LoRA run on its fp32 run's curve, docs/reliability.md)",
    )
    train.add_argument(
        "--scaler-init-scale", type=positive_float,
        help="--fp16: the loss scale to start from (default the GradScaler's 65536); a lower one skips the "
        "first steps' overflows",
    )
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute each block in backward")
    train.add_argument(
        "--resume-from-checkpoint", help='a checkpoint folder, or "latest": the newest complete one in --output-dir'
    )
    train.add_argument("--logging-steps", type=positive_int, default=10)
    train.add_argument("--eval-steps", type=positive_int, help="evaluate every N steps (default: at the end only)")
    train.add_argument("--save-steps", type=positive_int, default=500)
    train.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (0: all)")
    train.add_argument("--report-to", default="none", help='"none", "tensorboard", "wandb", ...')
    train.add_argument("--dataloader-num-workers", type=int, default=0)
    train.add_argument("--fsdp", action="store_true", help="shard with FSDP (under accelerate launch / torchrun)")
    train.add_argument("--fsdp-wrap", default="MambaBlock", help="layer class FSDP wraps (default MambaBlock)")
    train.add_argument(
        "--fsdp-activation-checkpointing", action="store_true",
        help="--fsdp: FSDP's own activation checkpointing of each wrapped block (instead of --gradient-checkpointing)",
    )
    train.add_argument("--use-cpu", action="store_true", help="train on CPU even when a GPU is present")

    lora = parser.add_argument_group("LoRA (PEFT)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
    lora.add_argument("--lora-r", type=positive_int, default=8)
    lora.add_argument("--lora-alpha", type=int, default=16)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument(
        "--lora-target-modules", nargs="+", help=f"default: {' '.join(LORA_TARGET_MODULES)} (every projection)"
    )
    lora.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="QLoRA: load --model's linear layers in 4-bit (bitsandbytes nf4, double quantization; compute dtype "
        "bf16 / fp16 with --bf16 / --fp16, else fp32) and train --lora adapters on that frozen base",
    )

    hub = parser.add_argument_group("sharing")
    hub.add_argument("--push-to-hub", action="store_true", help="upload the saved folder at the end")
    hub.add_argument("--hub-model-id", help="repo id (default: the output folder's name)")
    hub.add_argument("--hub-private", action="store_true")
    hub.add_argument("--license", default="apache-2.0", help="license in the model card")

    demo = parser.add_argument_group("demo model (no --model)")
    demo.add_argument("--hidden-size", type=positive_int, default=64)
    demo.add_argument("--num-hidden-layers", type=positive_int, default=2)
    demo.add_argument("--state-size", type=positive_int, default=16)
    demo.add_argument("--vocab-size", type=positive_int, default=512, help="size of the demo BPE tokenizer")
    args = parser.parse_args(argv)

    if args.learning_rate is None:
        args.learning_rate = 2e-3 if args.model is None else (1e-3 if args.lora else 1e-4)
    if args.load_in_4bit:
        if not args.lora:
            parser.error("--load-in-4bit freezes a 4-bit base and trains LoRA adapters on it: add --lora")
        if args.model is None:
            parser.error("--load-in-4bit quantizes a checkpoint as it loads: give --model (a folder or Hub id)")
        if args.fsdp:
            parser.error("--load-in-4bit does not combine with --fsdp: train the 4-bit base on one GPU, or under DDP")
        if importlib.util.find_spec("bitsandbytes") is None:
            parser.error(
                '--load-in-4bit needs bitsandbytes, which is not installed: pip install bitsandbytes '
                '(or pip install -e ".[qlora]" in this repository)'
            )
    if args.fsdp and not torch.cuda.is_available():
        # Accelerate runs CPU processes as plain DDP (MULTI_CPU) and never applies FSDP there.
        parser.error("--fsdp needs CUDA devices; on CPU leave it out (the processes then run DDP over gloo)")
    if args.fsdp_activation_checkpointing and not args.fsdp:
        parser.error("--fsdp-activation-checkpointing is FSDP's option: it needs --fsdp")
    if args.fsdp_activation_checkpointing and args.gradient_checkpointing:
        # Transformers refuses both, after loading the model; one of them checkpoints each block already.
        parser.error("give --fsdp-activation-checkpointing or --gradient-checkpointing, not both")
    if args.dataset and args.train_file:
        parser.error("give --dataset or --train-file, not both")
    if args.validation_file and not args.train_file:
        parser.error("--validation-file goes with --train-file")
    if not 0 < args.validation_split_percentage < 100:
        parser.error(f"--validation-split-percentage must be in (0, 100), got {args.validation_split_percentage}")
    for flag in ("model", "tokenizer", "dataset"):
        name = getattr(args, flag)
        if name and _looks_like_path(name) and not os.path.exists(os.path.expanduser(name)):
            parser.error(f"--{flag} {name}: no such folder")
    for flag in ("train_file", "validation_file"):
        for name in getattr(args, flag) or []:
            if not any(char in name for char in "*?["):  # a glob pattern is datasets' to expand
                if not os.path.isfile(name):
                    parser.error(f"--{flag.replace('_', '-')} {name}: no such file")
                if os.path.getsize(name) == 0:
                    parser.error(f"--{flag.replace('_', '-')} {name} is empty")
    # Several processes without CUDA (accelerate launch / torchrun on CPU): Accelerate only forms a gloo
    # process group for the Trainer when told the run is on CPU.
    args.use_cpu = args.use_cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    for flag in ("scaler_growth_interval", "scaler_init_scale"):
        if getattr(args, flag) is not None and not args.fp16:
            parser.error(f"--{flag.replace('_', '-')} sets fp16's loss scaling: it needs --fp16")
    if args.bf16 and not args.use_cpu and not is_torch_bf16_gpu_available():
        # Transformers' own message ("Your setup doesn't support bf16/gpu") names neither flag nor way out.
        parser.error(
            "--bf16 needs a GPU with bf16 (NVIDIA Ampere or newer) and this machine has none: leave --bf16 out, "
            "use --fp16 on an older GPU, or add --use-cpu for bf16 autocast on the CPU (slow)"
        )
    return args


def set_loss_scaling(accelerator, growth_interval=None, init_scale=None):
    """Give an fp16 run's GradScaler a growth interval and an initial scale (None: leave it), which the Trainer
    offers no setting for, through its state dict (the one public way to set the scale before its first step).
    The optimizer takes the accelerator's scaler when `train()` prepares it, so this must come before; a
    resumed run then loads the checkpoint's scaler over it."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    state = scaler.state_dict()
    if growth_interval is not None:
        state["growth_interval"] = growth_interval
    if init_scale is not None:
        state["scale"] = float(init_scale)
    scaler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Model


def quantization_config(args):
    """QLoRA's 4-bit base (--load-in-4bit): nf4 with double quantization, computing in the run's dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32,
    )


def keep_4bit_layers_on_the_training_path(model) -> None:
    """Evaluate the 4-bit layers the way training runs them (dequantize, then matmul in the compute dtype).

    On a CPU with AVX512-BF16, bitsandbytes' Linear4bit switches to its own inference kernel in eval mode
    without gradients: it repacks the weight in place on first use (after which training the same layer gives
    wrong gradients), rounds the inputs to bf16, and fails unless out_features is a multiple of 32. The
    evaluation before and during training would trigger it.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_model(args, tokenizer, device=None):
    """The model to train: the demo model, or --model in fp32 (its linear layers in 4-bit on `device` with
    --load-in-4bit; the rest fp32, the master weights of mixed precision)."""
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
    if isinstance(getattr(config, "vocab_size", None), int):
        check_fits(tokenizer, config, args)  # before the weights load
    kwargs = {"dtype": torch.float32}
    if args.load_in_4bit:
        # Quantized as the weights load, straight onto this process's device (each DDP process its own GPU): the
        # Trainer never moves a quantized model.
        kwargs.update(quantization_config=quantization_config(args), device_map={"": device})
    try:
        if config.model_type in ("mamba", "falcon_mamba"):
            # A Transformers-format Mamba or Falcon Mamba checkpoint (state-spaces/mamba-*-hf, tiiuae/falcon-mamba-*):
            # same weights and config fields, so hf_mamba loads it directly and saves an hf_mamba folder.
            model = hf_mamba.MambaForCausalLM.from_pretrained(args.model, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                args.model, trust_remote_code=args.trust_remote_code, **kwargs
            )
    except ModelFolderError as error:  # hf_mamba's check of the folder (truncated weights, missing shard, ...)
        fail(f"--model {args.model}: {error}")
    if args.load_in_4bit:
        keep_4bit_layers_on_the_training_path(model)
    check_fits(tokenizer, model, args)
    return model


def check_fits(tokenizer, model_or_config, args) -> None:
    """Stop with one line when the tokenizer has ids past the model's embedding."""
    source = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"--model {args.model}'s tokenizer"
    try:
        check_tokenizer_fits(tokenizer, model_or_config, tokenizer_name=source, model_name=f"--model {args.model}")
    except ValueError as error:
        fail(str(error))


def wrap_lora(model, args):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.load_in_4bit:
        # Freezes the base and upcasts what is not 4-bit to fp32. Activation checkpointing is the Trainer's
        # (checkpointing_training_args: the installed release's names, use_reentrant=False); PEFT's own would call
        # gradient_checkpointing_enable, which Transformers 5.25 deprecates, and leave use_reentrant unset.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

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
    """Adds the throughput since the previous log line (`tokens_per_second`) to every training log. Tokens are
    all processes' (the Trainer sums them), so the figure is the run's, not one process's."""

    def __init__(self):
        self.points = []  # (time, tokens seen): the start of training, then each training log

    def on_train_begin(self, args, state, control, **kwargs):
        self.points = [(time.perf_counter(), state.num_input_tokens_seen)]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.points:
            return
        self.points.append((time.perf_counter(), state.num_input_tokens_seen))
        logs["tokens_per_second"] = round(self._rate(-2, -1), 1)

    def _rate(self, first, last):
        (t0, n0), (t1, n1) = self.points[first], self.points[last]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def mean_of_logs(self):
        """The mean of the logged tokens/s figures (0 without a log)."""
        rates = [self._rate(i, i + 1) for i in range(len(self.points) - 1)]
        return sum(rates) / max(len(rates), 1)

    def steady(self):
        """Tokens/s from the first log to the last (the first interval holds the kernels' compiles), or None."""
        return self._rate(1, -1) if len(self.points) >= 3 else None


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    transformers.set_seed(args.seed)
    training_args = TrainingArguments(
        **checkpointing_training_args(args.gradient_checkpointing),
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
        # Pinned memory only speeds up copies to a GPU; without one torch warns that it is set.
        dataloader_pin_memory=torch.cuda.is_available() and not args.use_cpu,
        include_num_input_tokens_seen="non_padding" if args.no_packing else "all",
        fsdp=True if args.fsdp else None,
        fsdp_config=(
            {
                "transformer_layer_cls_to_wrap": [args.fsdp_wrap],
                "activation_checkpointing": args.fsdp_activation_checkpointing,
            }
            if args.fsdp
            else None
        ),
        use_cpu=args.use_cpu,
        ddp_find_unused_parameters=False,
    )
    main_process = training_args.process_index == 0
    # Checked before any data or model is loaded: a wrong flag should not cost a tokenization pass.
    resume = resolve_checkpoint(args, log=print if main_process else lambda line: None)

    raw = load_raw_datasets(args)
    tokenizer = load_tokenizer(args, raw)
    check_tokenizer(tokenizer, raw, args)
    # Weights load in fp32: --bf16 / --fp16 are mixed precision (autocast) with fp32 master weights.
    model = load_model(args, tokenizer, device=training_args.device)
    data = tokenize(raw, tokenizer, args, training_args)
    base_config, num_parameters = model.config, model.num_parameters()
    if args.lora:
        model = wrap_lora(model, args)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False) if args.no_packing else default_data_collator
    tokens_per_second, stop_on_signal = TokensPerSecondCallback(), StopOnSignal()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[tokens_per_second, stop_on_signal],
    )

    set_loss_scaling(trainer.accelerator, args.scaler_growth_interval, args.scaler_init_scale)
    eval_before = trainer.evaluate()["eval_loss"] if resume is None else None
    start = time.perf_counter()
    with stop_on_signal:
        train_result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    if stop_on_signal.stopped:
        number = stop_on_signal.signal or signal.SIGTERM  # None: another process was signalled
        checkpoint = Path(args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        if main_process:
            name, step = signal.Signals(number).name, trainer.state.global_step
            print(
                f"\n{name}: stopped at step {step} and saved {checkpoint}; "
                "continue with the same command plus --resume-from-checkpoint latest"
            )
        raise SystemExit(128 + number)

    # Saved (with the tokenizer, the Trainer's processing_class) before the final evaluation, which a user may
    # interrupt.
    trainer.save_model(args.output_dir)
    eval_after = trainer.evaluate()["eval_loss"]
    dataset_names = [args.dataset] if args.dataset else None
    results = {"eval_loss": eval_after, "perplexity": perplexity(eval_after)}
    # Every process's peak (a collective: each process reaches it); the table gives the largest.
    peaks = None
    if torch.cuda.is_available():
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=training_args.device)
        peaks = trainer.accelerator.gather(peak)
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
            ("tokens/s (mean of logs)", f"{tokens_per_second.mean_of_logs():,.0f}"),
            *(
                [("tokens/s after the first log", f"{tokens_per_second.steady():,.0f}")]
                if tokens_per_second.steady() is not None
                else []
            ),
            ("train time", f"{train_seconds:.1f} s"),
            *(
                [("peak CUDA memory (largest process)", f"{peaks.max().item():.2f} GiB")]
                if peaks is not None
                else []
            ),
            ("saved to", args.output_dir + (" (adapter)" if args.lora else "")),
        ]
        if args.load_in_4bit:
            dtype = str(quantization_config(args).bnb_4bit_compute_dtype).removeprefix("torch.")
            rows.insert(1, ("base weights", f"4-bit nf4 (bitsandbytes), computing in {dtype}"))
        if resume is not None:
            rows.insert(1, ("resumed from", resume))
        if args.fsdp:
            wrapped = [m for m in trainer.model_wrapped.modules() if type(m).__name__ == f"FSDP{args.fsdp_wrap}"]
            rows.insert(1, ("FSDP-wrapped blocks", f"{len(wrapped)} x {args.fsdp_wrap}"))
        width = max(len(name) for name, _ in rows)
        print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    return {"eval_loss_before": eval_before, "eval_loss_after": eval_after, "trainer": trainer}


def end_process_group():
    """Under `accelerate launch`: every process done, the process group ended before the interpreter's
    teardown. Left to that teardown, a gloo run once aborted a process at exit ("terminate called without
    an active exception") after it had trained and saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_process_group()
