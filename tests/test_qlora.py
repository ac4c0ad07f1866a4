"""QLoRA on CPU: a 4-bit (bitsandbytes nf4) hf_mamba or Falcon Mamba base with LoRA adapters, against the same
model with its weights dequantized into a plain one (`bitsandbytes.functional.dequantize_4bit`); and
scripts/train.py --load-in-4bit, end to end.

Sizes: bitsandbytes' CPU 4-bit layers need every quantized out_features to be a multiple of 32; hidden 64 and
state 14 give in_proj 256, x_proj dt_rank 4 + 2 * 14 = 32, out_proj 64 (lm_head stays unquantized).

Tolerances, relative to the largest |logit| or |gradient|:
- EXACT (1e-6): bitsandbytes dequantizes the weight and multiplies in fp32 (compute dtype fp32): training mode,
  or wherever gradients flow. The plain model runs the same fp32 matmuls, so only summation order can differ.
- Inference (eval mode, no gradients) on a CPU with AVX512-BF16: bitsandbytes swaps in its packed CPU kernel,
  which rounds the layer inputs to bf16 whatever the compute dtype: CPU_BF16 (1e-2) there, EXACT elsewhere.
"""

import math
import re
import shlex
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _scripts import load_script, needs_datasets

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

import hf_mamba  # noqa: E402
from hf_mamba.compat import HAS_ACTIVATION_CHECKPOINTING, enable_activation_checkpointing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXACT = 1e-6
CPU_BF16 = 1e-2
SHAPE = dict(vocab_size=96, hidden_size=64, state_size=14, num_hidden_layers=2)
PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")
QUANTIZED = ("in_proj", "x_proj", "out_proj")  # not dt_proj: 4-bit loading converts exact nn.Linear modules only


def nf4_config():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module", params=["mamba", "falcon_mamba"])
def folder(request, tmp_path_factory):
    """A saved tiny model: hf_mamba's Mamba, or Transformers' FalconMambaForCausalLM (untied lm_head, norms)."""
    torch.manual_seed(0)
    if request.param == "mamba":
        model = hf_mamba.MambaForCausalLM(hf_mamba.MambaConfig(**SHAPE))
    else:
        config = transformers.FalconMambaConfig(**SHAPE, tie_word_embeddings=False, mixer_rms_eps=1e-6)
        model = transformers.FalconMambaForCausalLM(config)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def load_4bit(folder, config=None):
    return hf_mamba.MambaForCausalLM.from_pretrained(folder, quantization_config=config or nf4_config())


def quantized_and_dequantized(folder, config=None):
    """The 4-bit model (nf4_config() unless given) and a plain fp32 model holding its dequantized weights (read
    before any inference, which may repack the 4-bit weights for bitsandbytes' CPU kernel)."""
    quantized = load_4bit(folder, config)
    plain = hf_mamba.MambaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                plain.get_submodule(name).weight.copy_(weight)
    return quantized, plain


def with_lora(model, seed=1, **kwargs):
    # init_lora_weights=False: random A and B, so every adapter changes the output and gets a gradient.
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False, **kwargs))


def copy_adapters(source, target):
    """target's LoRA weights := source's (both PEFT models of the same architecture)."""
    target_params = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "lora_" in name:
                target_params[name].copy_(param)


def inference_tolerance(model):
    """EXACT, or CPU_BF16 where bitsandbytes' CPU inference kernel rounds inputs to bf16 (see the docstring)."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return CPU_BF16 if any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers) else EXACT


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def token_ids(batch, seqlen, seed=2):
    return torch.randint(1, SHAPE["vocab_size"], (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def test_4bit_load_quantizes_the_projections_and_keeps_ssm_parameters_fp32(folder):
    model = load_4bit(folder)
    mixer = model.backbone.layers[0].mixer
    for name in QUANTIZED:
        assert isinstance(getattr(mixer, name), bnb.nn.Linear4bit), name
    assert type(mixer.dt_proj) is hf_mamba.block.MambaDeltaProjection
    for param in (mixer.A_log, mixer.D, mixer.dt_proj.bias, mixer.dt_proj.weight):
        assert param.dtype == torch.float32
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("batch", [1, 2])
def test_logits_match_the_dequantized_model(folder, batch):
    quantized, plain = quantized_and_dequantized(folder)
    ids = token_ids(batch, 13)
    expected = plain(ids).logits
    # Training mode with gradients: bitsandbytes' fp32 dequantize-and-matmul.
    quantized.train()
    assert relative_error(quantized(ids).logits, expected) <= EXACT
    # Inference: what generate() and evaluation run (the 4-bit layers see x_proj's and out_proj's inputs
    # as channels-last views; a kernel that ignores strides is caught here at batch 1).
    quantized.eval()
    with torch.no_grad():
        assert relative_error(quantized(ids).logits, expected) <= inference_tolerance(quantized)


def test_lora_gradients_match_the_dequantized_model(folder):
    quantized, plain = quantized_and_dequantized(folder)
    quantized = with_lora(prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False))
    plain = with_lora(plain)
    copy_adapters(quantized, plain)
    ids = token_ids(2, 13)
    grads = {}
    for name, model in (("4-bit", quantized), ("plain", plain)):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["4-bit"].keys() == grads["plain"].keys()
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in grads["4-bit"]}
    assert adapted == set(PROJECTIONS)
    for name, grad in grads["4-bit"].items():
        assert grad is not None and grad.abs().max() > 0, name
        assert relative_error(grad, grads["plain"][name]) <= 1e-5, name


def test_fused_training_mixer_runs_on_a_4bit_base_with_adapters(folder, monkeypatch):
    """On the Triton backend (here its interpreter) a QLoRA model trains through the fused mixer: x_proj's
    weight dequantized and its adapter merged into it, in_proj and out_proj as modules around it. The loss
    and every adapter's gradient match the module path's (fp32 compute, 1e-5 relative)."""
    from hf_mamba.block import MambaMixer

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    model = with_lora(prepare_model_for_kbit_training(load_4bit(folder), use_gradient_checkpointing=False))
    model.train()
    ids = token_ids(1, 6)  # small: the interpreter runs every kernel in Python
    calls = []
    real = hf_mamba.block.mamba_inner_triton
    monkeypatch.setattr(hf_mamba.block, "mamba_inner_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(MambaMixer, "_fused_ssm_weights", lambda *args: None)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert len(calls) == SHAPE["num_hidden_layers"]  # every layer fused, then none
    (loss, grads), (ref_loss, ref_grads) = results
    assert relative_error(loss, ref_loss) <= 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * len(PROJECTIONS) * SHAPE["num_hidden_layers"]
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert relative_error(grad, ref_grads[name]) <= 1e-5, name


def test_fused_weight_is_what_a_4bit_layer_and_an_adapter_over_it_multiply_by(folder):
    from hf_mamba.fast_path import fused_weight

    quantized, plain = quantized_and_dequantized(folder)
    x = torch.randn(5, plain.config.intermediate_size)
    x_proj = quantized.backbone.layers[0].mixer.x_proj
    quantized.train()  # bitsandbytes' dequantize-and-matmul (eval mode on CPU may repack the weight)
    torch.testing.assert_close(fused_weight(x_proj, torch.nn.Linear), plain.backbone.layers[0].mixer.x_proj.weight)
    model = with_lora(quantized)
    adapted = model.base_model.model.backbone.layers[0].mixer.x_proj
    weight = fused_weight(adapted, torch.nn.Linear)
    assert weight is not None and weight.requires_grad
    torch.testing.assert_close(torch.nn.functional.linear(x, weight), adapted(x), rtol=1e-5, atol=1e-6)


def test_qlora_steps_lower_the_loss_and_leave_the_base_unchanged(folder):
    model = prepare_model_for_kbit_training(load_4bit(folder), use_gradient_checkpointing=False)
    enable_activation_checkpointing(model)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(2, 16)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.05, losses
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_matches_the_dequantized_model(folder, batch):
    quantized, plain = quantized_and_dequantized(folder)
    quantized, plain = with_lora(quantized), with_lora(plain)
    copy_adapters(quantized, plain)
    prompt = token_ids(batch, 6, seed=3)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    out = {}
    for name, model in (("4-bit", quantized), ("plain", plain)):
        model.eval()
        out[name] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert out["4-bit"].shape == (batch, 14)
    assert torch.equal(out["4-bit"], out["plain"])


def test_saved_adapter_on_a_fresh_4bit_base_gives_the_same_logits(folder, tmp_path):
    model = get_peft_model(prepare_model_for_kbit_training(load_4bit(folder), use_gradient_checkpointing=False),
                           LoraConfig(task_type="CAUSAL_LM", r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(2, 16)
    model.train()
    for _ in range(2):  # trained, so lora_B is no longer zero and the adapter changes the logits
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(folder), tmp_path / "adapter")
    bare = load_4bit(folder)
    for each in (model, reloaded, bare):
        each.eval()  # the same bitsandbytes kernels on every side (see the module docstring)
    with torch.no_grad():
        expected = model(ids).logits
        assert relative_error(reloaded(ids).logits, expected) <= EXACT
        assert relative_error(bare(ids).logits, expected) > 1e-3  # the adapter is in the comparison


def test_recipe_runs_without_warnings(folder):
    """The documented recipe (docs/large_models.md): 4-bit load, kbit preparation, activation checkpointing by the
    installed release's name, LoRA on every projection, a step, generation."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = prepare_model_for_kbit_training(load_4bit(folder), use_gradient_checkpointing=False)
        enable_activation_checkpointing(model)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
        model.train()
        ids = token_ids(1, 16)
        model(input_ids=ids, labels=ids).loss.backward()
        model.eval()
        model.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_benchmark_large_tiny_runs_every_row_and_reports_a_failing_one(tmp_path, monkeypatch):
    """scripts/benchmark_large.py --tiny on CPU: every row measured, a prefill row per --prefill-lengths entry (at
    1/128 of it), one that runs out of memory reported as such while the others still run, the table written to
    --out; the 130m shape runs too."""
    benchmark = load_script("benchmark_large")
    prefill = benchmark.Bench.prefill

    def out_of_memory_at_64(self, impl, model, shape, length):
        if length == 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return prefill(self, impl, model, shape, length)

    monkeypatch.setattr(benchmark.Bench, "prefill", out_of_memory_at_64)
    out = tmp_path / "table.md"
    table = benchmark.main(["--tiny", "--shapes", "7b", "--prefill-lengths", "1024,8192", "--out", str(out)])
    rows = {(row.measurement, row.tokens, row.dtype.split(",")[0]): row for row in table.rows}
    assert [key[:2] for key in rows] == [
        ("prefill", "1 x 8"),
        ("prefill", "1 x 64"),
        ("train step (fwd+bwd, checkpointing)", "1 x 32"),
        ("greedy decode", "1 x 4 new (prompt 8)"),
        ("greedy decode", "2 x 4 new (prompt 8)"),
        ("LoRA step (fwd+bwd+AdamW, checkpointing)", "1 x 32"),
        ("greedy decode, 4-bit base + LoRA", "1 x 4 new (prompt 8)"),
        ("LoRA step (fwd+bwd+AdamW, checkpointing)", "1 x 32"),
    ]
    measured_prefill, failed, *measured = rows.values()
    assert failed.notes == "out of memory" and failed.tokens_per_s is None
    for row in [measured_prefill, *measured]:
        assert row.tokens_per_s > 0 and row.first_s > 0, row
        assert row.shape == "7b-tiny" and row.gpu == "CPU"
    assert [row.dtype.split(",")[0] for row in measured[3:]] == ["nf4 base (double quant)"] * 2 + ["bf16 base"]
    assert "% of bound" in measured[1].notes
    assert out.read_text() == table.markdown()

    table = benchmark.main(["--tiny", "--shapes", "130m", "--rows", "prefill"])
    assert [(row.shape, row.measurement, row.tokens) for row in table.rows] == [("130m-tiny", "prefill", "1 x 64")]
    assert "130m-tiny (Mamba 2 x 64" in table.header_lines[1]


@pytest.mark.parametrize(
    "flags, message",
    [
        pytest.param(["--prefill-lengths", "1024,0"], "--prefill-lengths takes comma-separated positive", id="zero"),
        pytest.param(["--prefill-lengths", "-8"], "--prefill-lengths takes comma-separated positive", id="negative"),
        pytest.param(["--prefill-lengths", "1k,8192"], "--prefill-lengths takes comma-separated positive", id="1k"),
        pytest.param(["--prefill-lengths", ","], "--prefill-lengths takes comma-separated positive", id="empty"),
        pytest.param(["--prefill-lengths", "64,64"], "--prefill-lengths names each length once", id="repeated"),
        pytest.param(
            ["--shapes", "130m,13b"], "--shapes takes a comma-separated subset of 7b, 1.4b, 130m", id="shape"
        ),
    ],
)
def test_benchmark_large_rejects_bad_flags(flags, message, capsys):
    benchmark = load_script("benchmark_large")
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--tiny", *flags])
    assert message in capsys.readouterr().err


def test_benchmark_large_parses_issue_24_prefill_table():
    """The docstring's command for prefill at 1K, 8K and 64K tokens, 130M and 1.4B shapes."""
    benchmark = load_script("benchmark_large")
    command = "--shapes 130m,1.4b --rows prefill --prefill-lengths 1024,8192,65536"
    assert f"python scripts/benchmark_large.py {command}" in benchmark.__doc__
    args = benchmark.parse_args(["--tiny", *command.split()])
    assert (args.shapes, args.rows, args.prefill_lengths) == (["130m", "1.4b"], ["prefill"], (1024, 8192, 65536))
    assert benchmark.parse_args(["--tiny"]).prefill_lengths == (8192,)
    config = benchmark.SHAPES["130m"].config()
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.state_size) == (768, 24, 50280, 16)
    assert config.intermediate_size == 1536 and config.tie_word_embeddings and config.mixer_rms_eps is None


# docs/large_models.md: its Python blocks, run on a tiny Falcon Mamba folder in place of the Hub checkpoint.
DOC = ROOT / "docs" / "large_models.md"
HUB_ID = "tiiuae/falcon-mamba-7b"
DOC_EDITS = {  # the sizes of a real run -> a smoke run; each must be in the document
    "block_size = 2048": "block_size = 16",
    "max_steps=500": "max_steps=2",
    "gradient_accumulation_steps=8": "gradient_accumulation_steps=1",
}


@needs_datasets
def test_documented_recipes_run_on_a_tiny_falcon_mamba(tmp_path, monkeypatch):
    import datasets
    from transformers.utils import is_torch_bf16_gpu_available

    train_script = load_script("train")
    texts = list(train_script.DEMO_TEXT) * 4
    tokenizer = train_script.train_demo_tokenizer(texts, vocab_size=300)
    config = transformers.FalconMambaConfig(
        **{**SHAPE, "vocab_size": len(tokenizer)}, tie_word_embeddings=False, mixer_rms_eps=1e-6
    )
    transformers.FalconMambaForCausalLM(config).save_pretrained(tmp_path / "falcon-mamba")
    tokenizer.save_pretrained(tmp_path / "falcon-mamba")
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: datasets.Dataset.from_dict({"text": texts}))
    monkeypatch.chdir(tmp_path)

    text = DOC.read_text()
    edits = {HUB_ID: str(tmp_path / "falcon-mamba"), **DOC_EDITS}
    if not is_torch_bf16_gpu_available():
        edits["bf16=True,"] = "bf16=True, use_cpu=True,"  # what the example's comment says
    assert all(old in text for old in edits), [old for old in edits if old not in text]
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)
    assert len(blocks) == 4
    for block in blocks:
        for old, new in edits.items():
            block = block.replace(old, new)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exec(compile(block, str(DOC), "exec"), {})  # each block stands alone, as in a fresh session
    assert (tmp_path / "outputs" / "falcon-mamba-7b-qlora" / "adapter" / "adapter_config.json").is_file()
    merged = hf_mamba.MambaForCausalLM.from_pretrained(tmp_path / "outputs" / "falcon-mamba-7b-merged")
    assert merged.config.mixer_rms_eps == 1e-6


# scripts/train.py --load-in-4bit: QLoRA from the command line.
SCRIPT_NF4 = BitsAndBytesConfig(  # what train.py builds for a run without --bf16 / --fp16
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
)
# The adapter on the unquantized fp32 base, against the 4-bit model it was trained on: off by what nf4 does to the
# base (16 levels per block of 64 weights), so compared with the bare fp32 base against the bare 4-bit one. On the
# test's model both are 4.7e-2 of the largest |logit|; the trained adapter itself moves the logits by 0.27.
NF4_BASE_RATIO = 1.25


@pytest.fixture(scope="module")
def train_script():
    return load_script("train")


@pytest.fixture(scope="module")
def script_model(train_script, tmp_path_factory):
    """A saved tiny hf_mamba model with its tokenizer. Its x_proj has 2 + 2 * 8 = 18 outputs, no multiple of 32:
    bitsandbytes' CPU inference kernel would refuse it, so evaluating in train.py shows that kernel stays off."""
    folder = tmp_path_factory.mktemp("script-model")
    tokenizer = train_script.train_demo_tokenizer(list(train_script.DEMO_TEXT) * 4, vocab_size=300)
    tokenizer.save_pretrained(folder)
    config = hf_mamba.MambaConfig(
        vocab_size=len(tokenizer), hidden_size=32, state_size=8, num_hidden_layers=2, eos_token_id=0, pad_token_id=0
    )
    torch.manual_seed(0)
    hf_mamba.MambaForCausalLM(config).save_pretrained(folder)
    return folder


@needs_datasets
def test_train_script_qlora_trains_a_4bit_base_and_saves_an_adapter_for_either_base(
    train_script, script_model, tmp_path, monkeypatch
):
    ran_in_training = set()  # the 4-bit layers that ran a forward with gradients in training mode
    forward = bnb.nn.Linear4bit.forward

    def recording_forward(self, x):
        if self.training and torch.is_grad_enabled():
            ran_in_training.add(self)
        return forward(self, x)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", recording_forward)
    out = tmp_path / "qlora"
    argv = [
        "--model", str(script_model),
        "--load-in-4bit", "--lora", "--lora-r", "4",
        "--gradient-checkpointing",
        "--learning-rate", "3e-2",  # so that 3 steps move the adapter well clear of the comparisons' tolerances
        "--max-steps", "3",
        "--block-size", "16",
        "--per-device-train-batch-size", "2",
        "--per-device-eval-batch-size", "4",
        "--max-eval-samples", "4",
        "--logging-steps", "1",
        "--output-dir", str(out),
        "--use-cpu",
    ]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_script.main(argv)
    assert [str(w.message) for w in caught] == []  # no FutureWarning for the checkpointing names, nor any other

    trainer = result["trainer"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 3 and len(losses) == 3
    assert all(math.isfinite(loss) for loss in [*losses, result["eval_loss_before"], result["eval_loss_after"]])
    trained = trainer.model
    assert isinstance(trained, PeftModel)
    base = trained.get_base_model()
    assert base.is_loaded_in_4bit
    # --gradient-checkpointing reaches the 4-bit base (the Trainer's, by the installed release's names).
    assert base.is_activation_checkpointing if HAS_ACTIVATION_CHECKPOINTING else base.is_gradient_checkpointing
    quantized = {name for name, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == {f"backbone.layers.{i}.mixer.{p}.base_layer" for i in range(2) for p in QUANTIZED}
    assert {name for name, m in base.named_modules() if m in ran_in_training} == quantized
    for name in quantized:
        layer = base.get_submodule(name)
        quant_state = layer.weight.quant_state
        assert (quant_state.quant_type, quant_state.nested, layer.compute_dtype) == ("nf4", True, torch.float32), name
    assert [n for n, p in trained.named_parameters() if p.requires_grad and "lora_" not in n] == []

    # The adapter alone: LoRA weights, none of the 4-bit base.
    assert not (out / "model.safetensors").exists()
    with safe_open(out / "adapter_model.safetensors", "pt") as saved:
        keys = list(saved.keys())
    assert keys and all(".lora_A." in key or ".lora_B." in key for key in keys), keys
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forward)  # training is over

    ids = token_ids(2, 12)
    fresh_4bit, dequantized = quantized_and_dequantized(script_model, SCRIPT_NF4)
    models = {
        "trained": trained,
        "on a fresh 4-bit base": PeftModel.from_pretrained(fresh_4bit, out),
        "on the dequantized base": PeftModel.from_pretrained(dequantized, out),
        "on the fp32 base": PeftModel.from_pretrained(hf_mamba.MambaForCausalLM.from_pretrained(script_model), out),
        "bare 4-bit base": hf_mamba.MambaForCausalLM.from_pretrained(script_model, quantization_config=SCRIPT_NF4),
        "bare fp32 base": hf_mamba.MambaForCausalLM.from_pretrained(script_model),
    }
    logits = {}
    with torch.no_grad():
        for name, model in models.items():
            # Training mode (dropout 0): bitsandbytes' fp32 dequantize-and-matmul on every 4-bit side, on any CPU.
            model.train()
            logits[name] = model(ids).logits
    errors = {name: relative_error(logits[name], logits["trained"]) for name in list(models)[1:-1]}
    nf4_error = relative_error(logits["bare fp32 base"], logits["bare 4-bit base"])
    assert errors["on a fresh 4-bit base"] <= EXACT, errors
    assert errors["on the dequantized base"] <= EXACT, errors
    assert errors["on the fp32 base"] <= NF4_BASE_RATIO * nf4_error, (errors, nf4_error)
    assert errors["bare 4-bit base"] > 3 * nf4_error, (errors, nf4_error)  # the adapter weighs in each comparison


@pytest.mark.parametrize(
    "flags, installed, message",
    [
        pytest.param(["MODEL", "--load-in-4bit"], True,
                     "--load-in-4bit freezes a 4-bit base and trains LoRA adapters on it: add --lora", id="no-lora"),
        pytest.param(["--load-in-4bit", "--lora"], True,
                     "--load-in-4bit quantizes a checkpoint as it loads: give --model", id="no-model"),
        pytest.param(["MODEL", "--load-in-4bit", "--lora", "--fsdp"], True,
                     "--load-in-4bit does not combine with --fsdp", id="fsdp"),
        pytest.param(["MODEL", "--load-in-4bit", "--lora"], False,
                     "--load-in-4bit needs bitsandbytes, which is not installed: pip install bitsandbytes",
                     id="no-bitsandbytes"),
    ],
)  # fmt: skip
def test_train_script_load_in_4bit_refuses_what_it_cannot_run(
    train_script, script_model, flags, installed, message, monkeypatch, capsys
):
    if not installed:
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importlib then finds no bitsandbytes
    argv = [arg for flag in flags for arg in (["--model", str(script_model)] if flag == "MODEL" else [flag])]
    with pytest.raises(SystemExit) as exit_info:
        train_script.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_documented_train_commands_parse_as_on_a_bf16_gpu(train_script, monkeypatch):
    """docs/large_models.md's scripts/train.py commands (Hub model and data, a GPU): train.py accepts their flags."""
    commands = [
        argv
        for body in re.findall(r"^```bash\n(.*?)^```", DOC.read_text(), re.M | re.S)
        for line in body.replace("\\\n", " ").splitlines()
        if (argv := shlex.split(line, comments=True))[1:2] == ["scripts/train.py"]
    ]
    assert len(commands) == 1, commands
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_script, "is_torch_bf16_gpu_available", lambda: True)
    args = train_script.parse_args(commands[0][2:])
    assert args.load_in_4bit and args.lora and args.bf16 and args.gradient_checkpointing
    assert train_script.quantization_config(args).bnb_4bit_compute_dtype == torch.bfloat16
