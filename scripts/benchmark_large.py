"""Speed and memory at the largest Mamba-1 shapes on one GPU, with random weights, side by side with mamba_ssm.

    python scripts/benchmark_large.py --shapes 7b --out large_7b.md          # one shape per run
    python scripts/benchmark_large.py --shapes 1.4b --out large_1.4b.md
    source <shared>/peers/activate.sh && python scripts/benchmark_large.py ... # with mamba_ssm side by side
    python scripts/benchmark_large.py --rows decode --shapes 7b              # a subset of rows
    python scripts/benchmark_large.py --tiny                                 # every row on CPU, tiny shapes, seconds

Prefill at 1 x 1K, 1 x 8K and 1 x 64K tokens at the 130M and 1.4B shapes, beside mamba_ssm, in one command:

    python scripts/benchmark_large.py --shapes 130m,1.4b --rows prefill --prefill-lengths 1024,8192,65536

Shapes: 7b is Falcon Mamba 7B (d_model 4096, 64 layers, vocab 65024, d_state 16, expand 2, the mixer's RMS norms
with eps 1e-6, untied lm_head); 1.4b is plain Mamba (d_model 2048, 48 layers, vocab 50280, tied); 130m is plain
Mamba-130M (d_model 768, 24 layers, vocab 50280, tied). Weights are random, built on the GPU in bf16 (A_log, D and
the Δ bias fp32, as from_pretrained keeps them); nothing is saved.

Rows (--rows):
- decode: greedy `model.generate` in bf16 with CUDA graphs at batch 1 and 16, prompt 128, 256 new tokens. The first
  call (kernel compilation, graph capture) is timed apart; the same call again is the measurement. tokens/s counts
  the decode steps only: batch x (new - 1) / (time of the call - time of the same call with one new token, i.e.
  the prefill). The bound is what reading every weight once per step allows: batch / (bytes of the weights read
  per step / device copy bandwidth), the bandwidth measured here by a large copy (bytes read + written / time).
- prefill: one prompt per --prefill-lengths entry (default one of 8192 tokens) through the model with a cache
  (what generate() runs first), logits of the last token only; time and peak memory, a row per length. Each
  length's first call (kernel compilation for that length) is timed apart from the median of the next three.
- train: one step of forward + backward at 1 x 2048 tokens, bf16 weights under bf16 autocast, activation
  checkpointing on every block, no optimizer (AdamW state of a 7B model would not fit beside it).
- qlora: hf_mamba only (mamba_ssm's fused mixer reads the projection weights directly, past any adapter or 4-bit
  layer): one step of forward + backward + AdamW over LoRA adapters (r 16, alpha 32, on in_proj, x_proj, dt_proj,
  out_proj) at 1 x 2048 tokens with activation checkpointing, on a 4-bit base (bitsandbytes nf4 with double
  quantization, bf16 compute; in_proj, x_proj and out_proj quantized in memory, prepared as the QLoRA recipe
  does with peft's prepare_model_for_kbit_training) and, for comparison, on the bf16 base; then greedy decoding
  at batch 1 on the 4-bit model with its adapters, as generate() runs there.

mamba_ssm (when importable) runs decode (its generate(..., cg=True)), prefill and train on the same shapes (its
MambaConfig with d_model, n_layer, vocab_size and d_state of the shape, RMS norms, residual in fp32, fused add +
norm, vocabulary not padded further: at 130m and 1.4b the published checkpoints' configs). It has no Falcon Mamba
mixer (its mamba_inner_fn norms take weights and normalise Δ after dt_proj, and its decode step has none), so at
the 7b shape it is a plain Mamba of the same size, as its rows say.

Peak memory is torch.cuda.max_memory_allocated over the measured calls, the model's weights included. Each row
frees what it made; a row that runs out of memory or fails is reported as such and the others still run. The
table is printed at the end and, with --out, written to that file (after every row, so a cut-off run keeps
what it measured).
"""

import argparse
import contextlib
import gc
import importlib
import os
import statistics
import sys
import traceback
from dataclasses import dataclass, replace

import torch
import torch.utils.checkpoint
import transformers
from hf_mamba.kernels import wait_for_background_compiles
from torch import nn

import hf_mamba
from hf_mamba import MambaConfig, MambaForCausalLM
from hf_mamba.compat import disable_activation_checkpointing, enable_activation_checkpointing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, for the shared helpers
from _bench_common import (  # noqa: E402
    hf_generate,
    next_token_loss,
    peer_generate,
    print_decode_profile,
    step_graph_ms,
    sync,
    timed,
)

LORA_TARGETS = ["in_proj", "x_proj", "dt_proj", "out_proj"]
QUANTIZED = ("in_proj", "x_proj", "out_proj")  # dt_proj (256 x 8192 at 7b) stays bf16, as from_pretrained leaves it
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    vocab: int
    state: int = 16
    falcon: bool = False  # the mixer's RMS norms on Δ, B and C (eps 1e-6)
    tied: bool = True

    def config(self):
        return MambaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            state_size=self.state,
            expand=2,
            mixer_rms_eps=1e-6 if self.falcon else None,
            tie_word_embeddings=self.tied,
        )

    def describe(self):
        kind = "Falcon Mamba" if self.falcon else "Mamba"
        return f"{self.name} ({kind} {self.layers} x {self.hidden}, vocab {self.vocab})"


SHAPES = {
    "7b": Shape("7b", hidden=4096, layers=64, vocab=65024, falcon=True, tied=False),
    "1.4b": Shape("1.4b", hidden=2048, layers=48, vocab=50280),
    "130m": Shape("130m", hidden=768, layers=24, vocab=50280),
}
# Every quantized out_features a multiple of 32 (bitsandbytes' CPU 4-bit layers): 256, 4 + 2 * 14, 64.
TINY_SHAPES = {key: replace(shape, name=f"{key}-tiny", hidden=64, layers=2, vocab=96, state=14)
               for key, shape in SHAPES.items()}


@dataclass(frozen=True)
class Sizes:
    prompt: int = 128
    new_tokens: int = 256
    decode_batches: tuple = (1, 16)
    prefill: tuple = (8192,)  # prompt lengths, one prefill row each (--prefill-lengths)
    train: int = 2048
    warmup_steps: int = 1
    steps: int = 3


TINY_SIZES = Sizes(prompt=8, new_tokens=4, decode_batches=(1, 2), train=32, steps=2)
# --tiny runs each --prefill-lengths entry at 1/128 of it (8192 -> 64 tokens, 65536 -> 512): still seconds on CPU.
TINY_PREFILL_DIVISOR = 128


@dataclass
class Row:
    gpu: str
    shape: str
    measurement: str
    implementation: str
    dtype: str
    tokens: str
    first_s: float | None = None
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    notes: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory


def median_time(fn, device, repeats):
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device):
    """Give what the last row held back to the GPU (host memory needs no help, and a collection costs
    a CPU smoke run most of its time)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def copy_bandwidth(device):
    """Bytes read + written per second by a large device-to-device copy."""
    nbytes = 2 << 30 if device.type == "cuda" else 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, 10)


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def decode_weight_bytes(model, embedding, lm_head):
    """Bytes a decode step reads from the weights: all of them, but only one row of an untied input embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied lm_head is counted once
    if embedding is not lm_head:
        total -= embedding.numel() * embedding.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------------
# The implementations: how each builds a model, decodes, prefills, and checkpoints its blocks


class HfMamba:
    name = "hf_mamba"

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    def label(self, shape):
        return self.name

    def build(self, shape):
        # Straight on the device in the model's dtype; A_log, D and the Δ bias are fp32 whatever the default.
        with torch.device(self.device), default_dtype(self.dtype):
            model = MambaForCausalLM(shape.config())
        return model.eval()

    def generate(self, model, prompt, new_tokens):
        return hf_generate(model)(prompt, new_tokens)

    def reset_decoding(self, model):
        pass  # hf_mamba keeps one decode graph per batch size across generate() calls

    def step_graph_ms(self, model, batch):
        return step_graph_ms(model, batch)

    def embedding_and_head(self, model):
        return model.get_input_embeddings().weight, model.get_output_embeddings().weight

    def prefill(self, model, ids):
        with torch.no_grad():
            return model(ids, use_cache=True, logits_to_keep=1).logits

    def logits(self, model, ids):
        return model(ids, use_cache=False).logits

    def checkpointing(self, model, enabled):
        if enabled:
            enable_activation_checkpointing(model)
        else:
            disable_activation_checkpointing(model)


class Peer:
    """mamba_ssm's MambaLMHeadModel (a plain Mamba: it has no Falcon Mamba mixer)."""

    name = "mamba_ssm"

    def __init__(self, device, dtype, modules):
        self.device, self.dtype = device, dtype
        self.config_class, self.model_class, self.inference_params = modules

    @staticmethod
    def load():
        try:
            from mamba_ssm.models.config_mamba import MambaConfig as PeerConfig
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
            from mamba_ssm.utils.generation import InferenceParams
        except Exception:  # noqa: BLE001 - any import failure means "not available here"
            return None
        return PeerConfig, MambaLMHeadModel, InferenceParams

    def label(self, shape):
        return f"{self.name} (plain Mamba, no norms)" if shape.falcon else self.name

    def build(self, shape):
        config = self.config_class(
            d_model=shape.hidden,
            n_layer=shape.layers,
            vocab_size=shape.vocab,
            ssm_cfg={"layer": "Mamba1", "d_state": shape.state},
            rms_norm=True,
            residual_in_fp32=True,
            fused_add_norm=True,
            pad_vocab_size_multiple=1,
            tie_embeddings=shape.tied,
        )
        return self.model_class(config, device=self.device, dtype=self.dtype).eval()

    def generate(self, model, prompt, new_tokens):
        return peer_generate(model, cg=True)(prompt, new_tokens)

    def reset_decoding(self, model):
        # One graph cache per model; going back to a smaller batch after a larger one fails its capture.
        model._decoding_cache = None

    def embedding_and_head(self, model):
        return model.backbone.embedding.weight, model.lm_head.weight

    def prefill(self, model, ids):
        params = self.inference_params(max_seqlen=ids.shape[1] + 1, max_batch_size=ids.shape[0])
        with torch.no_grad():
            return model(ids, inference_params=params, num_last_tokens=1).logits

    def logits(self, model, ids):
        return model(ids).logits

    def checkpointing(self, model, enabled):
        """It has no activation checkpointing of its own: each block's forward is wrapped (non-reentrant)."""
        for block in model.backbone.layers:
            if not enabled:
                block.__dict__.pop("forward", None)
                continue

            def forward(hidden_states, residual=None, inference_params=None, _forward=block.forward, **kwargs):
                return torch.utils.checkpoint.checkpoint(
                    _forward, hidden_states, residual, inference_params, use_reentrant=False, **kwargs
                )

            block.forward = forward


# ----------------------------------------------------------------------------------------------------------------
# Rows


class Bench:
    """The rows: each measures one thing on a model and returns its table rows."""

    def __init__(self, device, dtype, sizes, gpu, bandwidth, table, decode_profile=False):
        self.device = device
        self.dtype = dtype
        self.dtype_name = DTYPE_NAMES[dtype]
        self.sizes = sizes
        self.gpu = gpu
        self.bandwidth = bandwidth  # bytes read + written per second, for the decode bound
        self.table = table
        self.decode_profile = decode_profile  # print each decode row's kernels (print_decode_profile)

    def row(self, shape, measurement, implementation, tokens, dtype=None, **fields):
        return Row(self.gpu, shape.name, measurement, implementation, dtype or self.dtype_name, tokens, **fields)

    def ids(self, shape, batch, seqlen):
        return torch.randint(1, shape.vocab, (batch, seqlen), device=self.device)

    def prefill(self, impl, model, shape, length):
        ids = self.ids(shape, 1, length)
        first, _ = timed(lambda: impl.prefill(model, ids), self.device)
        reset_peak(self.device)
        seconds = median_time(lambda: impl.prefill(model, ids), self.device, 3)
        return [self.row(shape, "prefill", impl.label(shape), f"1 x {ids.shape[1]}", first_s=first,
                         tokens_per_s=ids.shape[1] / seconds, peak_gib=peak_gib(self.device),
                         notes=f"{seconds * 1e3:.0f} ms")]

    def train(self, impl, model, shape):
        ids = self.ids(shape, 1, self.sizes.train)
        impl.checkpointing(model, True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            with torch.autocast(self.device.type, dtype=self.dtype):
                logits = impl.logits(model, ids)
            next_token_loss(logits, ids).backward()
            for p in params:
                p.grad = None

        try:
            first, _ = timed(step, self.device)
            wait_for_background_compiles()  # the warm-up steps run the steady state's kernels
            for _ in range(self.sizes.warmup_steps):
                step()
            reset_peak(self.device)
            seconds = median_time(step, self.device, self.sizes.steps)
        finally:
            model.eval()
            impl.checkpointing(model, False)
        return [self.row(shape, "train step (fwd+bwd, checkpointing)", impl.label(shape), f"1 x {ids.shape[1]}",
                         first_s=first, tokens_per_s=ids.shape[1] / seconds, peak_gib=peak_gib(self.device),
                         notes=f"{seconds * 1e3:.0f} ms per step")]

    def decode(self, impl, model, shape, batches=None, measurement=None, implementation=None, dtype=None):
        weight_bytes = decode_weight_bytes(model, *impl.embedding_and_head(model))
        graphs = ", CUDA graphs" if self.device.type == "cuda" else ""
        measurement = measurement or f"greedy decode{graphs}"
        rows = []
        new = self.sizes.new_tokens
        for batch in batches or self.sizes.decode_batches:
            prompt = self.ids(shape, batch, self.sizes.prompt)

            def generate(new_tokens, prompt=prompt):
                return impl.generate(model, prompt, new_tokens)

            impl.reset_decoding(model)
            first, out = timed(lambda: generate(new), self.device)
            expected = (batch, prompt.shape[1] + new)
            if tuple(out.shape) != expected:
                raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {expected}")
            reset_peak(self.device)
            whole = median_time(lambda: generate(new), self.device, 2)  # the first call's max length again
            prefill_only = median_time(lambda: generate(1), self.device, 3)
            tokens_per_s = batch * (new - 1) / (whole - prefill_only)
            bound = batch * self.bandwidth / weight_bytes
            tokens = f"{batch} x {new} new (prompt {prompt.shape[1]})"
            step_ms = impl.step_graph_ms(model, batch) if hasattr(impl, "step_graph_ms") else None
            per_step = (f"; wall {batch * 1e3 / tokens_per_s:.3f} ms per step against {step_ms:.3f} ms of the "
                        "step's graph replayed back to back" if step_ms else "")
            rows.append(self.row(
                shape, measurement, implementation or impl.label(shape), tokens, dtype=dtype,
                first_s=first, tokens_per_s=tokens_per_s, peak_gib=peak_gib(self.device),
                notes=(f"{100 * tokens_per_s / bound:.0f}% of bound {bound:,.0f} tok/s "
                       f"({weight_bytes / 1e9:.2f} GB weights); whole call {batch * new / whole:,.0f} tok/s"
                       + per_step),
            ))
            if self.decode_profile:
                print_decode_profile(f"{implementation or impl.label(shape)}, {shape.name}, batch {batch}",
                                     lambda p, n: impl.generate(model, p, n), prompt)
        return rows

    def lora_step(self, shape, base):
        """One LoRA step (forward + backward + AdamW on the adapters) on a 4-bit ("nf4") or bf16 base."""
        from peft import LoraConfig, get_peft_model

        model = HfMamba(self.device, self.dtype).build(shape)
        if base == "nf4":
            from peft import prepare_model_for_kbit_training

            quantize_projections(model, self.dtype)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        enable_activation_checkpointing(model)
        lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = get_peft_model(model, lora)
        model.train()
        sync(self.device)
        resident = torch.cuda.memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        adapters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(adapters, lr=1e-4)
        ids = self.ids(shape, 1, self.sizes.train)

        def step():
            with torch.autocast(self.device.type, dtype=self.dtype):
                logits = model(input_ids=ids, use_cache=False).logits
            next_token_loss(logits, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        first, _ = timed(step, self.device)
        wait_for_background_compiles()
        for _ in range(self.sizes.warmup_steps):
            step()
        reset_peak(self.device)
        seconds = median_time(step, self.device, self.sizes.steps)
        dtype = (f"nf4 base (double quant), {self.dtype_name} compute" if base == "nf4"
                 else f"{self.dtype_name} base") + f", LoRA {DTYPE_NAMES[adapters[0].dtype]}"
        rows = [self.row(
            shape, "LoRA step (fwd+bwd+AdamW, checkpointing)", "hf_mamba + PEFT", f"1 x {ids.shape[1]}",
            dtype=dtype, first_s=first, tokens_per_s=ids.shape[1] / seconds, peak_gib=peak_gib(self.device),
            notes=(f"{'QLoRA' if base == 'nf4' else 'LoRA'} r16 on {'/'.join(LORA_TARGETS)}, "
                   f"{sum(p.numel() for p in adapters) / 1e6:.1f}M adapter params, "
                   + (f"{resident:.2f} GiB resident before the first step, " if resident is not None else "")
                   + f"{seconds * 1e3:.0f} ms per step"),
        )]
        if base == "nf4":  # what generate() gives on the 4-bit model with its adapters, at batch 1
            del optimizer, adapters
            model.eval()
            measurement = "greedy decode, 4-bit base + LoRA"
            describe = self.row(shape, measurement, "hf_mamba + PEFT", "-", dtype=dtype)
            rows += self.attempt(describe, self.decode, HfMamba(self.device, self.dtype), model, shape, (1,),
                                 measurement, "hf_mamba + PEFT", dtype)
        return rows

    @staticmethod
    def attempt(describe, fn, *args):
        """fn(*args) -> rows; on OOM or an error, the row `describe` saying so."""
        try:
            return fn(*args)
        except torch.OutOfMemoryError:
            return [replace(describe, notes="out of memory")]
        except Exception as exc:  # noqa: BLE001 - one failing row must not stop the others
            traceback.print_exc()
            return [replace(describe, notes=f"failed: {type(exc).__name__}: {first_line(exc)}")]

    def guarded(self, describe, fn, *args):
        """The rows of fn(*args) (or the failure row), added to the table; frees what fn made either way."""
        rows = self.attempt(describe, fn, *args)
        free_memory(self.device)
        for row in rows:
            self.table.add(row)

    def built(self, impl, shape):
        """impl's model of `shape`, or None after a row saying why it could not be built."""
        models = []

        def build():
            models.append(impl.build(shape))
            return []  # no row of its own when it works

        self.guarded(self.row(shape, "build", impl.label(shape), "-"), build)
        return models[0] if models else None


def first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0][:150] if text else ""


def quantize_projections(model, compute_dtype):
    """Replace each mixer's in_proj, x_proj and out_proj by a bitsandbytes nf4 Linear4bit (double quantization),
    quantized from the weights in memory, as from_pretrained(quantization_config=...) does when loading."""
    import bitsandbytes as bnb

    for layer in model.backbone.layers:
        mixer = layer.mixer
        for name in QUANTIZED:
            linear = getattr(mixer, name)
            quantized = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=True, quant_type="nf4", device="meta",
            )
            weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4")
            quantized.weight = weight.to(linear.weight.device)  # quantizes
            if linear.bias is not None:
                quantized.bias = nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(mixer, name, quantized)
    model.is_loaded_in_4bit = True  # what Transformers' 4-bit loading sets; PEFT then wraps the layers for 4-bit
    free_memory(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------------------------
# The table


class Table:
    COLUMNS = ("GPU", "shape", "measurement", "implementation", "dtype", "batch x tokens", "first call s",
               "tokens/s", "peak GiB", "notes")

    def __init__(self, header_lines, out):
        self.header_lines, self.out, self.rows = header_lines, out, []

    def add(self, row):
        self.rows.append(row)
        cells = self.cells(row)
        print(" | ".join(cells), flush=True)
        if self.out:
            with open(self.out, "w") as f:
                f.write(self.markdown())

    @staticmethod
    def cells(row):
        def number(value, fmt):
            return "-" if value is None else format(value, fmt)

        return [row.gpu, row.shape, row.measurement, row.implementation, row.dtype, row.tokens,
                number(row.first_s, ".1f"), number(row.tokens_per_s, ",.0f"), number(row.peak_gib, ".2f"), row.notes]

    def markdown(self):
        lines = [*self.header_lines, "", "| " + " | ".join(self.COLUMNS) + " |",
                 "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(self.cells(row)) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------


def version_of(package):
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="decode,prefill,train,qlora",
                        help="comma-separated: decode, prefill, train, qlora (default: all)")
    parser.add_argument("--shapes", default="7b,1.4b",
                        help=f"comma-separated: {', '.join(SHAPES)} (default: 7b,1.4b)")
    parser.add_argument("--prefill-lengths", default=",".join(map(str, Sizes.prefill)),
                        help="comma-separated prompt lengths in tokens, one prefill row per length and implementation "
                             "(default: %(default)s; issue 24's table: --shapes 130m,1.4b --rows prefill "
                             f"--prefill-lengths 1024,8192,65536); --tiny divides each by {TINY_PREFILL_DIVISOR}")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and sizes on the CPU: a smoke run in seconds")
    parser.add_argument("--no-peer", action="store_true", help="skip mamba_ssm even where it is importable")
    parser.add_argument("--decode-profile", action="store_true",
                        help="after each decode row, print where a decoded token's GPU time goes, kernel by kernel")
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for name, given, known in (("--rows", args.rows, ("decode", "prefill", "train", "qlora")),
                               ("--shapes", args.shapes, tuple(SHAPES))):
        unknown = [v for v in given if v not in known]
        if unknown or not given:
            parser.error(f"{name} takes a comma-separated subset of {', '.join(known)}; got {given}")
    args.prefill_lengths = parse_lengths(parser, "--prefill-lengths", args.prefill_lengths)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (or --tiny for a CPU smoke run)")
    return args


def parse_lengths(parser, name, text):
    """The distinct positive token counts of a comma-separated list, in order, or a parser error naming `name`."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    lengths = [int(v) for v in values if v.isascii() and v.isdigit() and int(v) > 0]
    if not values or len(lengths) != len(values):
        parser.error(f"{name} takes comma-separated positive whole token counts, e.g. 1024,8192,65536; got {text!r}")
    if len(set(lengths)) != len(lengths):
        parser.error(f"{name} names each length once; got {text!r}")
    return tuple(lengths)


def model_rows(rows, sizes):
    """(row, extra arguments) of each measurement on a built model, in order; decode last: its graphs stay."""
    calls = [("prefill", (length,)) for length in sizes.prefill] if "prefill" in rows else []
    return calls + [(name, ()) for name in ("train", "decode") if name in rows]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and lose much on a busy machine
    dtype = torch.bfloat16
    shapes = [(TINY_SHAPES if args.tiny else SHAPES)[name] for name in args.shapes]
    lengths = args.prefill_lengths
    if args.tiny:
        lengths = tuple(dict.fromkeys(max(1, n // TINY_PREFILL_DIVISOR) for n in lengths))
    sizes = replace(TINY_SIZES if args.tiny else Sizes(), prefill=lengths)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peer_modules = None if args.no_peer or device.type != "cuda" else Peer.load()
    implementations = [HfMamba(device, dtype)] + ([Peer(device, dtype, peer_modules)] if peer_modules else [])
    bnb_version, peft_version = version_of("bitsandbytes"), version_of("peft")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    header = [
        f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft_version or 'not installed'}, bitsandbytes {bnb_version or 'not installed'}, "
        f"hf_mamba {hf_mamba.__version__}, "
        f"mamba_ssm {'side by side' if peer_modules else 'not run'}",
        f"device copy bandwidth {bandwidth / 1e12:.3f} TB/s (bytes read + written); shapes: "
        + "; ".join(shape.describe() for shape in shapes),
    ]
    print("\n".join(header), flush=True)
    table = Table(header, args.out)
    bench = Bench(device, dtype, sizes, gpu, bandwidth, table, args.decode_profile and device.type == "cuda")

    for shape in shapes:
        calls = model_rows(args.rows, sizes)
        for impl in implementations if calls else []:
            model = bench.built(impl, shape)
            if model is None:
                continue
            for name, extra in calls:  # each length its own row: one that runs out of memory leaves the others
                tokens = f"1 x {extra[0]}" if name == "prefill" else "-"
                describe = bench.row(shape, name, impl.label(shape), tokens)
                bench.guarded(describe, getattr(bench, name), impl, model, shape, *extra)
            del model
            free_memory(device)
        if "qlora" in args.rows:
            for base in ("nf4", "bf16"):
                describe = bench.row(shape, "LoRA step", "hf_mamba + PEFT", "-", dtype=f"{base} base")
                missing = [name for name, version in (("peft", peft_version), ("bitsandbytes", bnb_version))
                           if version is None and (name == "peft" or base == "nf4")]
                if missing:
                    table.add(replace(describe, notes=f"{' and '.join(missing)} not installed"))
                else:
                    bench.guarded(describe, bench.lora_step, shape, base)

    print()
    print(table.markdown())
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
