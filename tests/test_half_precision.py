"""fp16 / bf16 numerics checkable on CPU: the scan at extreme Δ and A, long sequences, the decode step,
the Triton kernels (under the interpreter without a GPU), the model in half precision and under autocast,
and scripts/precision_training.py run tiny.

The scan takes half-precision u, Δ, B, C, z but computes in fp32 (Δ after bias and softplus, exp(ΔA), the
state); its only half-precision rounding is the output y's. So its fp16 / bf16 result must equal the fp32
scan of the same (rounded) inputs to within one rounding of y, and its final state to fp32 accuracy.
"""

import json

import pytest
import torch
from _scripts import load_script
from hf_mamba.kernels import selective_scan, selective_state_update

from hf_mamba import MambaConfig, MambaForCausalLM

HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
CPU_BACKENDS = [pytest.param("reference", id="reference"), pytest.param("torch", id="torch")]
# Δ bias per channel: softplus underflow to Δ ~ 1e-87 (-200), tiny Δ, both sides of softplus' linear threshold
# (20), Δ = 100. A_log per state: A from -2e-9 (no decay) to -5e8 (exp(ΔA) = 0 at any Δ above 1e-7).
DELTA_BIAS = [-200.0, -30.0, -10.0, 0.0, 10.0, 19.9, 20.1, 30.0, 100.0]
A_LOG = [-20.0, 0.0, 5.0, 20.0]


def scan_inputs(dtype, seqlen, delta_bias=DELTA_BIAS, a_log=A_LOG, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    d_inner, d_state = len(delta_bias), len(a_log)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    return dict(
        u=randn(batch, d_inner, seqlen),
        delta=randn(batch, d_inner, seqlen),
        A=-torch.exp(torch.tensor(a_log)).expand(d_inner, d_state).contiguous(),
        B=randn(batch, d_state, seqlen),
        C=randn(batch, d_state, seqlen),
        D=torch.ones(d_inner),
        z=randn(batch, d_inner, seqlen),
        delta_bias=torch.tensor(delta_bias),
    )


def widened(inputs):
    """The same values in fp32: the scan a half-precision call must match to within y's rounding."""
    return {name: t.float() for name, t in inputs.items()}


def assert_one_rounding(y, y32):
    """y (fp16/bf16) is y32 rounded: within one unit in the last place, nothing non-finite."""
    assert torch.isfinite(y).all()
    eps = torch.finfo(y.dtype).eps
    error = (y.float() - y32).abs()
    bound = eps * y32.abs() + torch.finfo(y.dtype).tiny
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, max |y| {y32.abs().max().item():.3g}"


def run_scan(inputs, backend, **kwargs):
    return selective_scan(**inputs, delta_softplus=True, return_final_state=True, backend=backend, **kwargs)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scan_at_extreme_delta_and_A(backend, dtype):
    inputs = scan_inputs(dtype, seqlen=63)
    y, state = run_scan(inputs, backend)
    y32, state32 = run_scan(widened(inputs), "reference")
    assert y.dtype == dtype and state.dtype == torch.float32
    assert_one_rounding(y, y32)
    torch.testing.assert_close(state, state32, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softplus_of_the_largest_delta(backend, dtype):
    """Δ at the dtype's largest finite value: softplus is the identity there (no exp overflow), Ā = 0."""
    inputs = scan_inputs(dtype, seqlen=16, delta_bias=[0.0, 5.0, -5.0], a_log=[0.0, 2.0])
    inputs["delta"] = torch.full_like(inputs["delta"], torch.finfo(dtype).max)
    inputs["u"] = inputs["u"] * 1e-5  # keeps y = Δ u (B.C) + D u in range
    y, state = run_scan(inputs, backend)
    y32, state32 = run_scan(widened(inputs), "reference")
    assert torch.isfinite(state).all()
    assert_one_rounding(y, y32)
    torch.testing.assert_close(state, state32, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_overflows_only_in_the_output_rounding(backend):
    """fp16's range ends at 65504: y is inf exactly where the fp32 result is beyond it; the state (fp32)
    and every other position stay finite and exact."""
    inputs = scan_inputs(torch.float16, seqlen=32, delta_bias=[0.0, 100.0, 2000.0, 8000.0])
    inputs["u"] = inputs["u"] * 8  # |y| up to ~2e5 in the last channels
    y, state = run_scan(inputs, backend)
    y32, state32 = run_scan(widened(inputs), "reference")
    beyond = y32.abs() >= 65520  # rounds to inf in fp16
    inside = y32.abs() < 65504
    assert beyond.any() and inside.any()
    assert torch.isinf(y[beyond]).all()
    assert_one_rounding(y[inside], y32[inside])
    torch.testing.assert_close(state, state32, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_long_sequence_in_half_precision(dtype):
    """16,384 steps through the chunked torch scan and 2,048 through the reference: no drift with length.
    Against fp32 inputs (not rounded), the error is that of rounding the inputs: stated per dtype."""
    inputs = scan_inputs(dtype, seqlen=16384, delta_bias=[-10.0, -4.0, 0.0], a_log=[0.0, 1.0, 2.0, 3.0], batch=1)
    y, state = run_scan(inputs, "torch")
    y32, state32 = run_scan(widened(inputs), "torch")
    assert_one_rounding(y, y32)
    torch.testing.assert_close(state, state32, rtol=1e-5, atol=1e-6)
    short = {name: t[..., :2048] if t.dim() == 3 else t for name, t in inputs.items()}
    y_ref, state_ref = run_scan(short, "reference")
    assert_one_rounding(y_ref, run_scan(widened(short), "reference")[0])
    # The two paths' fp32 results differ in the last bits, so their roundings may differ by one unit.
    torch.testing.assert_close(y_ref.float(), y[..., :2048].float(), rtol=torch.finfo(dtype).eps, atol=1e-6)

    # fp32 inputs the half-precision ones were rounded from: the relative error of rounding them.
    exact = scan_inputs(torch.float32, seqlen=16384, delta_bias=[-10.0, -4.0, 0.0], a_log=[0.0, 1.0, 2.0, 3.0],
                        batch=1)
    y_exact, _ = run_scan(exact, "torch")
    relative = ((y.float() - y_exact).abs().max() / y_exact.abs().max()).item()
    assert relative < {torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("dtype", HALF)
def test_decode_steps_match_the_scan(dtype):
    """selective_state_update over 200 steps in half precision (state fp32) gives the scan's outputs."""
    inputs = scan_inputs(dtype, seqlen=200)
    y_scan, state_scan = run_scan(inputs, "torch")
    state = torch.zeros_like(state_scan)
    steps = []
    for t in range(200):
        steps.append(
            selective_state_update(
                state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t],
                inputs["C"][..., t], D=inputs["D"], z=inputs["z"][..., t], dt_bias=inputs["delta_bias"],
                dt_softplus=True,
            )
        )
    assert_one_rounding(torch.stack(steps, dim=-1), run_scan(widened(inputs), "reference")[0])
    torch.testing.assert_close(state, state_scan, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels: on the GPU where there is one, else under the interpreter (small shapes: it is slow).
# Their softplus keeps e^x where 1 + e^x rounds to 1, as torch's does: the same Δ biases as above.
TRITON_DELTA_BIAS = DELTA_BIAS
# The backward's sigmoid, 1 / (1 + e^-x), overflows e^-x (to a right 0) for the most negative biases: under
# the interpreter numpy warns about it.
interpreter_overflow = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@pytest.fixture
def triton_device(monkeypatch):
    """The device the Triton kernels run on here. TRITON_INTERPRET must be set before the kernel modules are
    imported (`@triton.jit` picks the interpreter then); they are imported on the first backend="triton"
    call, so setting it here is early enough (tests/kernels/conftest.py sets it for the whole session)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")


@pytest.mark.parametrize("dtype", HALF)
def test_triton_scan_at_extreme_delta_and_A(triton_device, dtype):
    inputs = scan_inputs(dtype, seqlen=37, delta_bias=TRITON_DELTA_BIAS, batch=1)
    inputs = {name: t.to(triton_device) for name, t in inputs.items()}
    y, state = run_scan(inputs, "triton")
    y32, state32 = run_scan(widened(inputs), "reference")
    assert_one_rounding(y, y32)
    torch.testing.assert_close(state, state32, rtol=1e-5, atol=1e-6)


@interpreter_overflow
def test_triton_scan_backward_fp16(triton_device):
    """Gradients of fp16 inputs at extreme Δ: finite, and the fp32 reference's to fp16 accuracy. (They come
    back in the inputs' dtype: an fp16 gradient beyond 65504 is inf, which the GradScaler handles; the
    output gradient here keeps them in range.)"""
    inputs = scan_inputs(torch.float16, seqlen=19, delta_bias=TRITON_DELTA_BIAS, batch=1)
    inputs = {name: t.to(triton_device) for name, t in inputs.items()}
    grad_names = ("u", "delta", "B", "C", "z")
    dy = torch.randn(1, len(TRITON_DELTA_BIAS), 19, generator=torch.Generator().manual_seed(3)).to(triton_device)

    def grads(values, backend):
        leaves = {name: t.clone().requires_grad_(name in grad_names) for name, t in values.items()}
        y = selective_scan(**leaves, delta_softplus=True, backend=backend)
        (y.float() * dy * 1e-2).sum().backward()
        return {name: leaves[name].grad.float() for name in grad_names}

    got, expected = grads(inputs, "triton"), grads(widened(inputs), "reference")
    for name in grad_names:
        assert torch.isfinite(got[name]).all(), name
        scale = expected[name].abs().max()
        assert (got[name] - expected[name]).abs().max() <= 2e-2 * scale, name


@pytest.mark.parametrize("dtype", HALF)
def test_triton_decode_step(triton_device, dtype):
    inputs = scan_inputs(dtype, seqlen=1, delta_bias=TRITON_DELTA_BIAS, batch=2)
    inputs = {name: t.to(triton_device) for name, t in inputs.items()}
    step = [inputs[name][..., 0] for name in ("u", "delta")]
    B, C, z = (inputs[name][..., 0] for name in ("B", "C", "z"))
    state = torch.randn(2, len(TRITON_DELTA_BIAS), len(A_LOG), device=triton_device)
    expected_state = state.clone()
    kwargs = dict(D=inputs["D"], z=z, dt_bias=inputs["delta_bias"], dt_softplus=True)
    y = selective_state_update(state, *step, inputs["A"], B, C, backend="triton", **kwargs)
    y32 = selective_state_update(expected_state, *(t.float() for t in step), inputs["A"], B.float(), C.float(),
                                 backend="reference", **{**kwargs, "z": z.float()})
    assert_one_rounding(y, y32)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The model


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=97, hidden_size=32, state_size=16, num_hidden_layers=2)
    model = MambaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("half_model")
    model.save_pretrained(folder)
    return model, folder


# Measured on CPU (2,048 tokens, tiny model): fp16 ~6e-4, bf16 ~5e-3 of the largest logit; bounds with margin.
LOGIT_TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@pytest.mark.parametrize("dtype", HALF)
def test_model_in_half_precision_close_to_fp32(saved_model, dtype):
    model, folder = saved_model
    half = MambaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    fp32_names = ("A_log", "mixer.D", "dt_proj.bias")
    kept = {name: p.dtype for name, p in half.named_parameters() if name.endswith(fp32_names)}
    assert set(kept.values()) == {torch.float32}  # the SSM's decay rates stay fp32 under a half-precision load
    assert half.backbone.layers[0].mixer.in_proj.weight.dtype == dtype
    input_ids = torch.randint(0, 97, (1, 2048), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids).logits
        out = half(input_ids, output_hidden_states=True)
    assert out.logits.dtype == dtype
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    assert (out.logits.float() - expected).abs().max() <= LOGIT_TOLERANCE[dtype] * expected.abs().max()


@pytest.mark.parametrize("dtype", HALF)
def test_model_decode_step_in_half_precision(saved_model, dtype):
    """Prefill + decode steps (fp32 SSM state, half-precision conv state) give the full forward's logits."""
    _, folder = saved_model
    half = MambaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    input_ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = half(input_ids).logits.float()
        out = half(input_ids[:, :32], use_cache=True)
        cache = out.cache_params if not hasattr(out, "cache") else out.cache
        assert cache.ssm_states[0].dtype == torch.float32 and cache.conv_states[0].dtype == dtype
        steps = [half(input_ids[:, t : t + 1], cache_params=cache, use_cache=True).logits for t in range(32, 40)]
    stepped = torch.cat(steps, dim=1).float()
    assert torch.isfinite(stepped).all()
    assert (stepped - full[:, 32:]).abs().max() <= LOGIT_TOLERANCE[dtype] * full.abs().max()


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_training_step(saved_model, dtype):
    """One training step under CPU autocast (fp16 with a GradScaler): finite loss and gradients near fp32's."""
    _, folder = saved_model
    input_ids = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(2))

    def step(autocast):
        model = MambaForCausalLM.from_pretrained(folder).train()
        scaler = torch.amp.GradScaler("cpu", enabled=autocast == torch.float16)
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = model(input_ids, labels=input_ids).loss
        scaler.scale(loss).backward()
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        return loss.detach(), {name: p.grad / scale for name, p in model.named_parameters()}

    loss32, grads32 = step(None)
    loss, grads = step(dtype)
    # Measured: loss within 1e-4 relative, every gradient's cosine with fp32's above 0.9999.
    assert torch.isfinite(loss) and abs(loss.item() - loss32.item()) < 1e-3 * loss32.item()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), grads32[name].flatten(), dim=0)
        assert cosine > 0.999, (name, cosine.item())


# ---------------------------------------------------------------------------------------------------------------
# scripts/precision_training.py, tiny


def test_precision_training_script_tiny(tmp_path, capsys):
    script = load_script("precision_training")
    results, long_rows = script.main(
        ["--tiny", "--steps", "4", "--runs", "bf16-ckpt,lora-fp16", "--out-dir", str(tmp_path)]
    )
    assert long_rows == []
    assert list(results) == ["fp32", "bf16-ckpt", "lora-fp32", "lora-fp16"]  # references added, listed first
    for name, result in results.items():
        summary = result["summary"]
        assert len(result["losses"]) == 4 and summary["nan_losses"] == 0 and summary["nonfinite_grads"] == 0, name
        if name not in ("fp32", "lora-fp32"):
            assert summary["max_diff"] < 0.01, name
    assert results["bf16-ckpt"]["checkpointing"] and not results["fp32"]["checkpointing"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["runs"]) == set(results)
    table = capsys.readouterr().out
    assert "max |Δ loss|" in table and "bf16-ckpt" in table

    # A second invocation with the same settings keeps the saved runs, reuses the fp32 reference, and runs
    # the long-prompt check on the fp32 model the first one saved.
    again, long_rows = script.main(
        ["--tiny", "--steps", "4", "--runs", "fp16", "--long-prompt", "96", "--out-dir", str(tmp_path)]
    )
    assert list(again) == ["fp32", "fp16", "bf16-ckpt", "lora-fp32", "lora-fp16"]
    assert again["fp32"]["losses"] == results["fp32"]["losses"]
    assert again["fp16"]["summary"]["max_diff"] < 0.01
    assert [row["dtype"] for row in long_rows] == ["float32", "float16", "bfloat16"]
    assert all(row["hidden_finite"] and row["logits_finite"] and row["decode_finite"] for row in long_rows)
    out = capsys.readouterr().out
    assert "run fp32" not in out and "kept from" in out and "the fp32 run after training" in out
    assert "top-1 agree" in out
    assert script.parse_args(["--runs", "none"]).runs == []

    # The same command again (say, after a time limit cut it short) runs only what is missing.
    script.main(["--tiny", "--steps", "4", "--runs", "fp32,fp16", "--out-dir", str(tmp_path)])
    assert "run fp" not in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_model_normalises_a_residual_beyond_fp16_range(saved_model, backend, monkeypatch):
    """A pure fp16 model whose (fp32) residual stream exceeds 65504 before every norm: the norms read it in
    fp32 and round only their normalised output to fp16, so the logits are finite and close to fp32's (cast
    to fp16 first, it was inf there and the logits NaN). Triton: the blocks' residual add fused with the norm."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, folder = saved_model
    embeds = 2e5 * torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(inputs_embeds=embeds).logits  # fp32 on CPU, whichever backend the half model runs
    monkeypatch.setenv("HF_MAMBA_BACKEND", backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    half = MambaForCausalLM.from_pretrained(folder, dtype=torch.float16).to(device).eval()
    with torch.no_grad():
        out = half(inputs_embeds=embeds.to(device), output_hidden_states=True)
    residual = out.hidden_states[-2]  # the last block's output, before norm_f
    assert residual.dtype == torch.float32 and residual.abs().max() > 65504
    logits = out.logits.float().cpu()
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().max() <= LOGIT_TOLERANCE[torch.float16] * expected.abs().max()


def test_precision_training_diagnosis_names_the_overflowing_module():
    """What the script says of a run with non-finite steps: the module whose fp16 output overflowed (with its
    fp32 size), whether gradients are finite without loss scaling, or the parameters that are not finite."""
    script = load_script("precision_training")
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4, tie_word_embeddings=False)
    model = MambaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    diagnosis = script.diagnose(model, batch, "fp16")
    assert diagnosis.startswith("no-grad forward in fp16: finite;") and "gradients finite" in diagnosis
    with torch.no_grad():
        model.backbone.layers[1].mixer.D.fill_(1e7)  # y beyond fp16's range, reaching out_proj scaled
    where = script.diagnose(model, batch, "fp16").split("largest |y| into out_proj ")[1]
    assert float(where.split(" ")[0]) > 1e6 and where.split(" ")[1] == "(backbone.layers.1.mixer.out_proj);"
    grad_peak = float(where.split("largest |gradient| of a module's output ")[1].split(" ")[0])
    param_peak = float(where.split("of a parameter ")[1].split(" ")[0])
    assert f"loss scales above {65504 / max(grad_peak, param_peak):.3g}" in where
    with torch.no_grad():
        model.backbone.layers[1].mixer.D.fill_(1.0)
        model.lm_head.weight.mul_(1e5)  # logits beyond fp16's 65504
    diagnosis = script.diagnose(model, batch, "fp16")
    assert "first non-finite output lm_head (input finite;" in diagnosis and "gradients NOT finite" in diagnosis
    assert float(diagnosis.split("in fp32 ")[1].split(")")[0]) > 65504
    with torch.no_grad():
        model.backbone.layers[1].mixer.D[0] = float("nan")
    assert script.diagnose(model, batch, "fp16") == "non-finite parameters: backbone.layers.1.mixer.D"


def test_precision_training_sets_the_scalers_growth_interval():
    """--scaler-growth-interval and --scaler-init-scale reach an fp16 run's GradScaler (the Trainer has no
    setting for them); the summary lists where the scale changed."""
    script = load_script("precision_training")
    assert script.parse_args([]).scaler_growth_interval == 2000
    assert script.parse_args(["--scaler-growth-interval", "100"]).scaler_growth_interval == 100
    with pytest.raises(SystemExit):
        script.parse_args(["--scaler-growth-interval", "0"])

    assert script.parse_args(["--scaler-init-scale", "512"]).scaler_init_scale == 512
    with pytest.raises(SystemExit):
        script.parse_args(["--scaler-init-scale", "0"])

    class Accelerator:
        scaler = torch.amp.GradScaler("cpu")

    script.set_loss_scaling(Accelerator, 100, 512)
    assert Accelerator.scaler.get_growth_interval() == 100 and Accelerator.scaler.get_scale() == 512
    script.set_loss_scaling(object(), 100)  # no scaler (bf16, fp32): nothing to set
    assert script.scale_changes([65536.0, 65536.0, 32768.0, 32768.0, 65536.0]) == [(3, 32768.0), (5, 65536.0)]
    assert script.scale_changes([]) == []
