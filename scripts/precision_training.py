"""Half precision, measured: the 130M shape trained with the Trainer in fp32, bf16 and fp16 mixed precision
(fp16 with the GradScaler), also with activation checkpointing and with LoRA, on the same generated corpus
with the same seed; then pure fp16 / bf16 inference of the trained model over a long prompt.

Every step's loss and gradient norm is checked for NaN/Inf; each run's smoothed loss curve is compared with
the fp32 run's (LoRA runs with the fp32 LoRA run's), and a table is printed:

    run | final loss | max |Δ loss| vs fp32 (smoothed) | NaN/Inf losses | non-finite grad norms | tokens/s | peak GiB

In fp16 the GradScaler skips the steps whose gradients overflowed (its scale starts at 2^16 and halves on
each); those steps log an infinite grad norm and are counted apart from NaN losses, which should be none.
Where a run has such steps, it also says where the final weights first give a non-finite value on the batch
that began the last run of them (`diagnose`): a forward overflow, or gradients that are not finite even
without loss scaling, is a fault the GradScaler cannot skip past.

    python scripts/precision_training.py --runs fp32,bf16,fp16            # GPU, then:
    python scripts/precision_training.py --runs bf16-ckpt,fp16-ckpt      # reuses the fp32 run saved above
    python scripts/precision_training.py --runs lora-fp32,lora-bf16,lora-fp16
    python scripts/precision_training.py --runs none --long-prompt 65536  # the saved fp32 model in fp16/bf16
    python scripts/precision_training.py                                  # all 8 runs in one go
    python scripts/precision_training.py --tiny                           # CPU smoke test, seconds

Each run's curve goes to --out-dir/results.json (and the fp32 run's model to --out-dir/fp32_model, which
--long-prompt loads); a later invocation with the same settings on the same device keeps those runs, so
the commands above build one table between them, and the same command run again after a time limit cut it
short runs only what is missing (--fresh, or another --out-dir, runs everything again). A run whose reference
(fp32, or lora-fp32 for LoRA runs) is neither listed nor saved gets it added. The corpus is generated (no
network): Zipf-distributed tokens over the whole vocabulary with a fixed sparse bigram structure and copied
spans, so the loss falls from ln(vocab) as on text.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from hf_mamba import MambaCache, MambaConfig, MambaForCausalLM
from hf_mamba.compat import checkpointing_training_args
from hf_mamba.generation import prefill_in_chunks

# train.py (beside this file; scripts/ is sys.path[0] only when run as a script) owns the GradScaler helper.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import positive_float, set_loss_scaling  # noqa: E402

RUNS = ("fp32", "bf16", "fp16", "bf16-ckpt", "fp16-ckpt", "lora-fp32", "lora-bf16", "lora-fp16")
SMOOTH = 20  # steps in the moving average the curves are compared by


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS),
                        help=f"comma-separated, from {', '.join(RUNS)}; 'none': only the saved runs' table "
                             "(and --long-prompt)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=50280)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--scaler-growth-interval", type=int, default=2000,
                        help="fp16 runs: steps without an overflow before the GradScaler doubles its scale "
                             "(2000: torch's and the Trainer's default)")
    parser.add_argument("--scaler-init-scale", type=positive_float, default=65536.0,
                        help="fp16 runs: the GradScaler's first scale (65536: torch's and the Trainer's default)")
    parser.add_argument("--long-prompt", type=int, default=0, help="tokens of the fp16/bf16 inference check (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="outputs/precision_training",
                        help="results.json (and the fp32 run's model) go here; runs saved there by an earlier "
                             "invocation with the same settings are kept, and their references reused")
    parser.add_argument("--fresh", action="store_true", help="ignore runs saved in --out-dir")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, few steps, short prompt")
    args = parser.parse_args(argv)
    if args.tiny:
        args.hidden_size, args.layers, args.vocab, args.seq_len, args.batch_size = 32, 2, 256, 64, 4
        args.steps = min(args.steps, 30)
        args.long_prompt = args.long_prompt and min(args.long_prompt, 2048)
    positive = ("steps", "batch_size", "seq_len", "hidden_size", "layers", "vocab", "lora_r", "scaler_growth_interval")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.long_prompt < 0:
        parser.error(f"--long-prompt must be >= 0, got {args.long_prompt}")
    runs = [run.strip() for run in args.runs.split(",") if run.strip()]
    if runs == ["none"]:  # no training: the table of saved runs, and --long-prompt on the saved fp32 model
        runs = []
    elif not runs or any(run not in RUNS for run in runs):
        parser.error(f"--runs takes names from {', '.join(RUNS)} (or 'none'); got {args.runs!r}")
    args.runs = [run for run in RUNS if run in runs]  # references (fp32, lora-fp32) first
    return args


# What a loss curve depends on: runs from an earlier invocation with the same settings are comparable.
CURVE_SETTINGS = (
    "steps", "batch_size", "seq_len", "lr", "hidden_size", "layers", "vocab", "lora_r", "seed",
    "scaler_growth_interval", "scaler_init_scale",
)


def earlier_runs(path, settings):
    """Runs saved in `path` by an earlier invocation with the same settings (and device), else {}."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    return saved.get("runs", {}) if saved.get("settings") == settings else {}


def with_references(runs, available):
    """`runs` plus the reference each needs (fp32; lora-fp32 for LoRA runs) unless `available` has it."""
    needed = {reference_of(run) for run in runs} - set(available)
    return [run for run in RUNS if run in set(runs) | needed]


# ---------------------------------------------------------------------------------------------------------------
# Data


def generate_corpus(n_rows, seq_len, vocab, seed):
    """(n_rows, seq_len) token ids that look like text to a language model.

    Each next token is, with probability 0.45, one of 4 fixed successors of the current token (a sparse
    bigram table); with 0.1 the continuation of a span copied from earlier in the row (what induction
    learns); otherwise a draw from a Zipf(1.1) unigram over the whole vocabulary.
    """
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    unigram = ranks.pow(-1.1)
    unigram /= unigram.sum()
    permutation = torch.randperm(vocab, generator=generator)  # which ids are frequent: not just the small ones
    successors = permutation[torch.multinomial(unigram, vocab * 4, replacement=True, generator=generator)]
    successors = successors.view(vocab, 4)
    rows = torch.empty(n_rows, seq_len, dtype=torch.long)
    draws = permutation[torch.multinomial(unigram, n_rows * seq_len, replacement=True, generator=generator)]
    draws = draws.view(n_rows, seq_len)
    choice = torch.rand(n_rows, seq_len, generator=generator)
    which = torch.randint(0, 4, (n_rows, seq_len), generator=generator)
    rows[:, 0] = draws[:, 0]
    copy_from = torch.full((n_rows,), -1, dtype=torch.long)  # position being copied, -1: not copying
    for t in range(1, seq_len):
        start_copy = (choice[:, t] < 0.02) & (copy_from < 0) & (t > 16)
        copy_from = torch.where(start_copy, (torch.rand(n_rows, generator=generator) * (t - 8)).long(), copy_from)
        stop_copy = (choice[:, t] > 0.97) | (copy_from >= t)
        copy_from = torch.where(stop_copy, -1, copy_from)
        bigram = successors[rows[:, t - 1], which[:, t]]
        token = torch.where(choice[:, t] < 0.47, bigram, draws[:, t])
        copying = copy_from >= 0
        token = torch.where(copying, rows[torch.arange(n_rows), copy_from.clamp(min=0)], token)
        copy_from = torch.where(copying, copy_from + 1, copy_from)
        rows[:, t] = token
    return rows


class TokenRows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


# ---------------------------------------------------------------------------------------------------------------
# Training


class LossKeepingTrainer(Trainer):
    """Keeps each step's loss as computed, and its batch. The Trainer's logged loss is a running sum reset by
    subtracting it from itself, so after one NaN every later logged loss reads NaN whatever the steps did."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        self.last_loss = (out[0] if return_outputs else out).detach().float()
        self.last_batch = inputs
        return out


class StepRecorder(TrainerCallback):
    """Per step: loss and grad norm (logging_steps=1), wall time, and the GradScaler's scale in fp16. Of steps
    whose loss or gradients were not finite: the first, and the batch that began the last run of them (what
    `diagnose` reruns: where that run lasts to the end, no step changed the weights since)."""

    def __init__(self, name, steps, tokens_per_step):
        self.name, self.steps, self.tokens_per_step = name, steps, tokens_per_step
        self.losses, self.grad_norms, self.times, self.scales = [], [], [], []
        self.trainer = None
        self.every = max(1, steps // 10)
        self.first_bad_step, self.last_streak_step, self.last_streak_batch = None, None, None

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())
        scaler = getattr(self.trainer.accelerator, "scaler", None) if self.trainer is not None else None
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))

    def step_finite(self, i):
        return math.isfinite(self.losses[i]) and math.isfinite(self.grad_norms[i])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.losses.append(self.trainer.last_loss.item())
        self.grad_norms.append(float(logs.get("grad_norm", float("nan"))))
        step = state.global_step
        if not self.step_finite(-1) and (len(self.losses) == 1 or self.step_finite(-2)):  # a run of bad steps begins
            self.first_bad_step = self.first_bad_step or step
            self.last_streak_step = step
            self.last_streak_batch = {k: v.detach().clone() for k, v in self.trainer.last_batch.items()}
        if step % self.every == 0 or step == self.steps:
            print(f"  {self.name:<10} step {step:>5}/{self.steps}  loss {self.losses[-1]:.4f}  "
                  f"grad norm {self.grad_norms[-1]:.3g}", flush=True)


def build_model(args):
    config = MambaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden_size, num_hidden_layers=args.layers, state_size=16,
        use_cache=False,
    )
    set_seed(args.seed)  # the same initial weights for every run
    return MambaForCausalLM(config)


def train_run(name, args, dataset, device_is_cuda):
    precision = name.split("-")[-1] if name.startswith("lora") else name.split("-")[0]
    checkpointing = name.endswith("-ckpt")
    model = build_model(args)
    if name.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        # target_modules: PEFT's default for the model type, which hf_mamba registers (every projection).
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=2 * args.lora_r))
    training_args = TrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "precision_training", name),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=1,
        logging_nan_inf_filter=False,  # the Trainer would otherwise log a NaN loss as the running mean
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not device_is_cuda,
        dataloader_num_workers=0,
        **(checkpointing_training_args(True) if checkpointing else {}),
    )
    recorder = StepRecorder(name, args.steps, args.batch_size * args.seq_len)
    trainer = LossKeepingTrainer(model=model, args=training_args, train_dataset=dataset, callbacks=[recorder])
    trainer.remove_callback(ProgressCallback)  # one line per logged step otherwise (logging_steps=1)
    trainer.remove_callback(PrinterCallback)
    recorder.trainer = trainer
    set_loss_scaling(trainer.accelerator, args.scaler_growth_interval, args.scaler_init_scale)
    if device_is_cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    # Throughput after the first 10% of steps (the first calls compile the Triton kernels).
    skip = min(len(recorder.times) - 1, max(1, args.steps // 10))
    timed = recorder.times[-1] - recorder.times[skip - 1] if len(recorder.times) > 1 else wall
    tokens_per_s = (len(recorder.times) - skip) * recorder.tokens_per_step / timed if timed > 0 else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device_is_cuda else float("nan")
    result = {
        "run": name, "losses": recorder.losses, "grad_norms": recorder.grad_norms, "scales": recorder.scales,
        "tokens_per_s": tokens_per_s, "peak_gib": peak, "wall_s": wall,
        "checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "first_bad_step": recorder.first_bad_step,
        "last_bad_run_from": recorder.last_streak_step,
    }
    if recorder.first_bad_step is not None:
        result["diagnosis"] = diagnose(model, recorder.last_streak_batch, precision)
        to_end = "to the end" if not recorder.step_finite(-1) else "then steps were finite again"
        print(f"  {name}: first non-finite step {recorder.first_bad_step}; the last run of them began at step "
              f"{recorder.last_streak_step} ({to_end}); its batch on the final weights: {result['diagnosis']}",
              flush=True)
    if name.startswith("lora"):
        model = model.merge_and_unload()
    return result, model


def scale_changes(scales):
    """[(step, new scale)] wherever the GradScaler's scale changed (steps counted from 1)."""
    return [(step, new) for step, (old, new) in enumerate(itertools.pairwise(scales), start=2) if new != old]


def diagnose(model, batch, precision):
    """Where the final weights first give a value that is not finite, on the batch of the first bad step, in
    the run's autocast dtype: parameters, then a no-grad forward (modules hooked; the first to finish with a
    non-finite output, whether its input was finite, and its largest |output| in fp32), then the loss and
    gradients of a forward and backward with no loss scaling (a GradScaler cannot help where these are not
    finite: the fault is not the scale). Where every later step was skipped, the final weights are the
    weights of that step."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad_params:
        return f"non-finite parameters: {', '.join(bad_params[:5])}{' ...' if len(bad_params) > 5 else ''}"
    report = []
    with _module_peaks(model) as fp32_peaks, torch.no_grad():
        model(**batch)  # the sizes in fp32 (y too: in fp16 out_proj reads it scaled into range)
    first = _first_nonfinite_module(model, batch, dtype)
    if first is None:
        report.append(f"no-grad forward in {precision}: finite")
    else:
        name, input_finite = first
        peak = fp32_peaks["out"].get(name, float("nan"))
        report.append(f"no-grad forward in {precision}: first non-finite output {name} (input "
                      f"{'finite' if input_finite else 'not finite'}; its largest |output| in fp32 {peak:.3g})")
    model.train()
    with _module_peaks(model) as peaks, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(**batch).loss
        loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    p_peak, p_name = max(((p.grad.abs().max().item(), n) for n, p in model.named_parameters() if p.grad is not None),
                         default=(float("nan"), "-"))
    model.zero_grad(set_to_none=True)
    report.append(f"unscaled loss {loss.item():.4g}, gradients {'finite' if grads_finite else 'NOT finite'}")
    # Where the range goes: a GradScaler's scale times the largest gradient must stay below 65504 (fp16).
    y_name, y_peak = max(fp32_peaks["y"].items(), key=lambda item: item[1], default=("-", float("nan")))
    g_name, g_peak = max(peaks["grad"].items(), key=lambda item: item[1], default=("-", float("nan")))
    peak = max(g_peak, p_peak)
    fits = f", so fp16 overflows at loss scales above {65504 / peak:.3g}" if 0 < peak < math.inf else ""
    report.append(f"largest |y| into out_proj {y_peak:.3g} ({y_name}); largest |gradient| of a module's output "
                  f"{g_peak:.3g} ({g_name}), of a parameter {p_peak:.3g} ({p_name}){fits}")
    return "; ".join(report)


@contextlib.contextmanager
def _module_peaks(model):
    """{"y": {out_proj: largest |input|}, "out": {module: largest |tensor output|}, "grad": {module: largest
    |gradient of its output|}} of what runs, the backward included (hooked, the mixers take their module path
    rather than the fused one)."""
    peaks = {"y": {}, "out": {}, "grad": {}}

    def keep(kind, name, tensor):
        peak = tensor.detach().float().abs().max().item()
        peaks[kind][name] = max(peaks[kind].get(name, 0.0), math.inf if math.isnan(peak) else peak)

    def on_y(name):
        return lambda module, args: keep("y", name, args[0])

    def on_output(name):
        def hook(module, inputs, output):
            if not torch.is_tensor(output):
                return
            keep("out", name, output)
            if output.requires_grad:
                output.register_hook(lambda grad: keep("grad", name, grad))
        return hook

    modules = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_pre_hook(on_y(n)) for n, m in modules if n.endswith("out_proj")]
    handles += [m.register_forward_hook(on_output(n)) for n, m in modules]
    try:
        yield peaks
    finally:
        for handle in handles:
            handle.remove()


def _first_nonfinite_module(model, batch, dtype):
    """(name, input finite) of the first module to finish with a non-finite tensor output, or None."""
    found = []

    def check(name):
        def hook(module, inputs, output):
            if found or not torch.is_tensor(output) or torch.isfinite(output).all():
                return
            first_input = next((t for t in inputs if torch.is_tensor(t) and t.is_floating_point()), None)
            found.append((name, first_input is None or bool(torch.isfinite(first_input).all())))
        return hook

    handles = [m.register_forward_hook(check(n)) for n, m in model.named_modules() if n]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def smooth(values, window=SMOOTH):
    """Trailing moving average (the first window-1 points average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def reference_of(run):
    """The run another run's curve is compared with: lora-fp32 for LoRA runs, else fp32."""
    return "lora-fp32" if run.startswith("lora") else "fp32"


def summarize(result, reference):
    losses, grads = result["losses"], result["grad_norms"]
    finite = [v for v in losses if math.isfinite(v)]
    summary = {
        "final_loss": sum(finite[-SMOOTH:]) / len(finite[-SMOOTH:]) if finite else float("nan"),
        "nan_losses": sum(not math.isfinite(v) for v in losses),
        "nonfinite_grads": sum(not math.isfinite(v) for v in grads),
        "max_diff": float("nan"),
    }
    if reference is not None and reference is not result and summary["nan_losses"] == 0:
        ours, theirs = smooth(losses), smooth(reference["losses"])
        summary["max_diff"] = max(abs(a - b) for a, b in zip(ours, theirs, strict=False))
    # The fp32 curve's own step-to-step noise around its moving average: what "within noise" is measured by.
    summary["noise"] = _residual_std(losses) if summary["nan_losses"] == 0 else float("nan")
    return summary


def _residual_std(losses):
    tail = losses[len(losses) // 2 :]
    smoothed = smooth(losses)[len(losses) // 2 :]
    if len(tail) < 2:
        return float("nan")
    return (sum((a - b) ** 2 for a, b in zip(tail, smoothed, strict=True)) / (len(tail) - 1)) ** 0.5


# ---------------------------------------------------------------------------------------------------------------
# Inference over a long prompt in pure fp16 / bf16


@torch.no_grad()
def long_prompt_check(model, args, device):
    """The trained model saved and loaded back in fp32, fp16 and bf16 (`from_pretrained(dtype=...)`, which
    keeps A_log, D and the Δ bias in fp32), over one prompt of args.long_prompt tokens: whether every
    hidden state and logit is finite, the largest residual value (fp16 overflows at 65504), and the last
    1024 positions' logits against fp32. A dtype that fails gets its error in the table."""
    prompt = generate_corpus(1, args.long_prompt, args.vocab, args.seed + 7).to(device)
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            try:
                row, logits = _long_prompt_row(folder, dtype, prompt, args, device)
            except Exception as error:  # unattended: report it, go on with the other dtypes
                traceback.print_exc()
                rows.append({"dtype": name, "error": f"{type(error).__name__}: {error}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if reference is None:
                reference = logits
            row["max_logit_diff"] = (logits - reference).abs().max().item() if dtype != torch.float32 else float("nan")
            row["top1_agree"] = (
                (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
                if dtype != torch.float32 else float("nan")
            )
            rows.append({"dtype": name, **row})
    return rows


def _long_prompt_row(folder, dtype, prompt, args, device):
    half = MambaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    half(prompt[:, :256], logits_to_keep=1)  # compiles this dtype's kernels outside the timing
    _sync(device)
    started = time.perf_counter()
    out = half(prompt, output_hidden_states=True, logits_to_keep=min(1024, args.long_prompt), use_cache=True)
    _sync(device)
    seconds = time.perf_counter() - started
    residuals = out.hidden_states[1:-1]  # the residual stream between blocks (the last one is normed)
    # The same prompt prefilled in chunks, then 16 greedy tokens through the decode step.
    cache = MambaCache(half.config, 1, dtype=half.dtype, device=device)
    prefill_in_chunks(half, prompt[:, :-1], chunk_size=min(8192, args.long_prompt), cache=cache)
    generated = half.generate(prompt, cache=cache, max_new_tokens=16, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)
    row = {
        "seconds": seconds,
        "hidden_finite": all(bool(torch.isfinite(h).all()) for h in out.hidden_states),
        "logits_finite": bool(torch.isfinite(out.logits).all()),
        "residual_max": max((h.float().abs().max().item() for h in residuals), default=0.0),
        "decode_finite": all(bool(torch.isfinite(scores).all()) for scores in generated.scores),
    }
    return row, out.logits.float()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device_is_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if device_is_cuda else "cpu")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {name: getattr(args, name) for name in CURVE_SETTINGS}
    settings["device"] = torch.cuda.get_device_name() if device_is_cuda else "cpu"
    earlier = {} if args.fresh else earlier_runs(out_dir / "results.json", settings)
    # Saved runs are kept, listed or not: a command cut short by a time limit continues where it stopped.
    runs = [run for run in with_references(args.runs, earlier) if run not in earlier]
    if earlier:
        print(f"kept from {out_dir / 'results.json'}: {', '.join(sorted(earlier))}")
    if runs:
        n_rows = args.steps * args.batch_size
        print(f"corpus: {n_rows} rows x {args.seq_len} tokens, vocab {args.vocab} (generated, seed {args.seed})")
        started = time.perf_counter()
        dataset = TokenRows(generate_corpus(n_rows, args.seq_len, args.vocab, args.seed))
        print(f"  generated in {time.perf_counter() - started:.1f} s")

    results, failed = dict(earlier), {}
    for name in runs:
        print(f"run {name}", flush=True)
        try:
            results[name], model = train_run(name, args, dataset, device_is_cuda)
        except Exception as error:  # unattended: one failing run must not lose the others
            # e.g. fp16 mixed precision on a device without fp16 autocast
            traceback.print_exc()
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"  failed: {failed[name]}")
            if device_is_cuda:
                torch.cuda.empty_cache()
            continue
        # each run's line as it ends: a call cut short by a time limit still shows the runs it finished
        done = {**results[name], **summarize(results[name], results.get(reference_of(name)))}
        print(f"  {name}: {done['wall_s']:.0f} s, final loss {done['final_loss']:.4f}, max |Δ loss| vs "
              f"{reference_of(name)} {_fmt(done['max_diff'], '.4f')}, NaN/Inf losses {done['nan_losses']}, inf grad "
              f"norms {done['nonfinite_grads']}, {done['tokens_per_s']:,.0f} tokens/s, "
              f"{_fmt(done['peak_gib'], '.2f')} GiB", flush=True)
        if name == "fp32":  # the model the long-prompt check loads in fp16 / bf16
            model.save_pretrained(out_dir / "fp32_model")
        del model
        _save(out_dir, settings, args, results, failed, [])
    results = {name: results[name] for name in RUNS if name in results}

    n_params = sum(p.numel() for p in build_model(args).parameters())
    print(f"\nTraining, {n_params / 1e6:.2f}M parameters (d_model {args.hidden_size}, {args.layers} layers, vocab "
          f"{args.vocab}), {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
          f"{'GPU ' + torch.cuda.get_device_name() if device_is_cuda else 'CPU'}")
    print(f"max |Δ loss| compares {SMOOTH}-step moving averages with the fp32 run (LoRA: lora-fp32); "
          f"noise = std of the loss around its moving average (second half)")
    header = (f"{'run':<11}{'final loss':>11}{'max |Δ loss|':>14}{'noise':>8}{'NaN/Inf loss':>14}"
              f"{'inf grad norm':>15}{'tokens/s':>11}{'peak GiB':>10}")
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        summary = summarize(result, results.get(reference_of(name)))
        result["summary"] = summary
        print(f"{name:<11}{summary['final_loss']:>11.4f}{_fmt(summary['max_diff'], '.4f'):>14}"
              f"{_fmt(summary['noise'], '.3f'):>8}{summary['nan_losses']:>14}{summary['nonfinite_grads']:>15}"
              f"{result['tokens_per_s']:>11,.0f}{_fmt(result['peak_gib'], '.2f'):>10}")
    for name, reason in failed.items():
        print(f"{name:<11}failed: {reason}")
    for name, result in results.items():
        if result["scales"]:
            skipped_steps = result["summary"]["nonfinite_grads"]
            changes = ", ".join(f"{scale:g} at {step}" for step, scale in scale_changes(result["scales"])[:24])
            print(f"{name}: GradScaler scale {result['scales'][0]:.0f} -> {result['scales'][-1]:.0f}; "
                  f"{skipped_steps} steps skipped for overflowing gradients"
                  f"{f' (scale, step: {changes})' if changes else ''}")

    long_rows = []
    if args.long_prompt:
        trained = (out_dir / "fp32_model").exists() and "fp32" in results
        model = MambaForCausalLM.from_pretrained(out_dir / "fp32_model") if trained else build_model(args)
        print(f"\nInference over one {args.long_prompt}-token prompt, model loaded with from_pretrained(dtype=...) "
              f"({'the fp32 run after training' if trained else 'untrained: no fp32 run'}); logits of the last "
              f"{min(1024, args.long_prompt)} positions compared with fp32")
        long_rows = long_prompt_check(model.to(device), args, device)
        print(f"{'dtype':<10}{'hidden finite':>14}{'logits finite':>14}{'max |residual|':>16}"
              f"{'max |Δ logit|':>15}{'top-1 agree':>12}{'decode finite':>15}{'seconds':>9}")
        for row in long_rows:
            if "error" in row:
                print(f"{row['dtype']:<10}failed: {row['error'].splitlines()[0][:100]}")
                continue
            print(f"{row['dtype']:<10}{row['hidden_finite']!s:>14}{row['logits_finite']!s:>14}"
                  f"{row['residual_max']:>16.1f}{_fmt(row['max_logit_diff'], '.4f'):>15}"
                  f"{_fmt(row['top1_agree'], '.4f'):>12}{row['decode_finite']!s:>15}{row['seconds']:>9.2f}")
    _save(out_dir, settings, args, results, failed, long_rows)
    print(f"\nresults: {out_dir / 'results.json'}")
    return results, long_rows


def _save(out_dir, settings, args, results, failed, long_rows):
    saved = {"settings": settings, "args": vars(args), "runs": results, "failed": failed, "long_prompt": long_rows}
    (out_dir / "results.json").write_text(json.dumps(saved, indent=1))


def _fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


if __name__ == "__main__":
    main()
