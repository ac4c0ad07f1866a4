"""In fp16 the gated scan output y (out_proj's input) can pass 65504 where the same weights in fp32 do not
overflow: y is then kept in fp32 and scaled into range for out_proj (`hf_mamba.kernels.fp16_range`), so the
forward, the decode steps and the gradients stay finite and follow fp32's. On CPU the Triton kernels run under
the interpreter (tests/conftest.py) and autocast runs the matmuls in fp16, so the shapes are tiny."""

import pytest
import torch
import torch.nn.functional as F
from hf_mamba.kernels import (
    fp16_range_scale,
    mamba_inner_triton,
    selective_scan,
    selective_state_update,
    to_fp16_range,
)
from hf_mamba.kernels.fp16_range import to_fp16_range_triton

from hf_mamba import MambaConfig, MambaForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = dict(vocab_size=53, hidden_size=8, state_size=4, num_hidden_layers=2)
BIG_D = 3e5  # the D skip makes y about D * u: far beyond fp16's 65504 for |u| above 0.2


def test_fp16_range_scale_is_a_power_of_two_bringing_y_into_range():
    assert fp16_range_scale(torch.tensor([3.0, -200.0])).item() == 1.0
    for peak in (257.0, 1e5, 3.3e9):
        scale = fp16_range_scale(torch.tensor([1.0, -peak])).item()
        assert scale == 2.0 ** round(torch.log2(torch.tensor(scale)).item())
        assert 128 < peak / scale <= 512


def test_to_fp16_range_scales_each_row_by_its_own_power_of_two():
    """Per row: s = 1 where max |y| <= 256, else the power of two bringing it to (128, 512]; y / s in fp16 is y
    rounded once. The Triton kernel (one program per row) gives the same bits as the PyTorch ops."""
    peaks = torch.tensor([0.0, 1.0, 256.0, 300.0, 1e5, 3e9])
    y = torch.randn(len(peaks), 70, generator=torch.Generator().manual_seed(0))
    y = y / y.abs().amax(-1, keepdim=True) * peaks[:, None]
    y_in_range, scale = to_fp16_range(y)
    assert y_in_range.dtype == torch.float16 and scale.shape == (len(peaks), 1)
    assert scale[:3].flatten().tolist() == [1.0, 1.0, 1.0]
    assert ((peaks[3:] / scale[3:].flatten() > 128) & (peaks[3:] / scale[3:].flatten() <= 512)).all()
    torch.testing.assert_close(y_in_range.float() * scale, y, rtol=torch.finfo(torch.float16).eps, atol=0)
    pytest.importorskip("triton")
    y_in_range_t, scale_t = to_fp16_range_triton(y.to(DEVICE))
    assert torch.equal(scale_t.cpu(), scale) and torch.equal(y_in_range_t.cpu(), y_in_range)
    # a strided view (the decode step's y is contiguous, but any 2-d y is read by its strides)
    y_in_range_t, _ = to_fp16_range_triton(y.t().contiguous().t().to(DEVICE))
    assert torch.equal(y_in_range_t.cpu(), y_in_range)
    # 3-d, as a prefill's y (batch, seqlen, d_inner) is a transposed view of the scan's output: rows are tokens
    y3 = y.view(2, 3, 70).transpose(1, 2).contiguous().transpose(1, 2)
    y_in_range_t, scale_t = to_fp16_range_triton(y3.to(DEVICE))
    assert y_in_range_t.shape == (2, 3, 70) and y_in_range_t.is_contiguous() and scale_t.shape == (2, 3, 1)
    assert torch.equal(y_in_range_t.cpu().view(6, 70), y_in_range) and torch.equal(scale_t.cpu().view(6, 1), scale)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_scan_and_decode_step_write_fp32_y_of_fp16_inputs(backend):
    """out_dtype=float32: y beyond 65504 comes back finite and equal to the fp32 scan of the same inputs (fp16
    y is inf there); gradients through the fp32 y are the fp32 scan's (up to the kernels' summation order)."""
    if backend == "triton":
        pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(0)
    batch, d_inner, d_state, seqlen = 2, 6, 4, 9
    inputs = dict(
        u=(300 * torch.randn(batch, d_inner, seqlen, generator=generator)).half(),
        delta=torch.randn(batch, d_inner, seqlen, generator=generator).half(),
        A=-torch.rand(d_inner, d_state, generator=generator) - 0.5,
        B=torch.randn(batch, d_state, seqlen, generator=generator).half(),
        C=torch.randn(batch, d_state, seqlen, generator=generator).half(),
        D=torch.full((d_inner,), 400.0),
        z=(3 + torch.randn(batch, d_inner, seqlen, generator=generator)).half(),
    )
    inputs = {name: t.to(DEVICE).requires_grad_() for name, t in inputs.items()}
    wide = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    y = selective_scan(**inputs, delta_softplus=True, backend=backend, out_dtype=torch.float32)
    y32 = selective_scan(**wide, delta_softplus=True, backend="reference")
    assert y.dtype == torch.float32 and y.detach().abs().max() > 65504
    torch.testing.assert_close(y.cpu(), y32.cpu(), rtol=1e-5, atol=1e-5 * y32.abs().max().item())
    grad = torch.randn(y.shape, generator=generator).to(DEVICE) * 1e-3
    y.backward(grad)
    y32.backward(grad.float())
    for name, t in inputs.items():
        torch.testing.assert_close(t.grad.float().cpu(), wide[name].grad.cpu(), rtol=2e-3,
                                   atol=2e-3 * wide[name].grad.abs().max().item(), msg=name)

    step = {name: t.detach()[..., 0] for name, t in inputs.items() if name not in ("A", "D")}
    state = torch.zeros(batch, d_inner, d_state, device=DEVICE)
    y_step = selective_state_update(
        state, step["u"], step["delta"], inputs["A"].detach(), step["B"], step["C"], D=inputs["D"].detach(),
        z=step["z"], dt_softplus=True, backend=backend, out_dtype=torch.float32,
    )
    assert y_step.dtype == torch.float32
    torch.testing.assert_close(y_step.cpu(), y32.detach()[..., 0].cpu(), rtol=1e-5, atol=1e-5 * y32.abs().max().item())
    with pytest.raises(ValueError, match="out_dtype"):
        selective_scan(**inputs, backend=backend, out_dtype=torch.int32)


def _weights(mixer):
    return (
        mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
        mixer.A_log, mixer.D,
    )


def _fused_mixer_fp16_and_fp32(D, out_proj_inside):
    """The fused mixer's output and gradients (input first, then the parameters') under fp16 autocast and
    in fp32, with every D set to `D`, and the peak of y where out_proj runs outside."""
    torch.manual_seed(0)
    mixer = MambaForCausalLM(MambaConfig(**SIZES)).backbone.layers[0].mixer.to(DEVICE)
    with torch.no_grad():
        mixer.D.fill_(D)
    hidden = torch.randn(2, 13, SIZES["hidden_size"], device=DEVICE)
    # Output gradients of a size a GradScaler would leave: du = D dy stays within fp16, nothing underflows.
    grad_out = 1e-2 * torch.randn(2, 13, SIZES["hidden_size"], device=DEVICE)
    params = list(mixer.parameters())

    def run(autocast):
        x = hidden.clone().requires_grad_()
        for p in params:
            p.grad = None
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
            xz = F.linear(x, mixer.in_proj.weight)
            out = mamba_inner_triton(xz, *_weights(mixer), mixer.out_proj.weight if out_proj_inside else None)
        peak = None
        if not out_proj_inside:
            assert out.dtype == (torch.float32 if autocast else x.dtype)  # y itself, kept in fp32
            peak = out.detach().abs().max()
            out = F.linear(out, mixer.out_proj.weight)  # fp32, as the model's scaled out_proj gives
        out.float().backward(grad_out)
        return out.detach().float(), [x.grad] + [p.grad for p in params if p.grad is not None], peak

    (out16, grads16, peak), (out32, grads32, _) = run(True), run(False)
    return out16, out32, grads16, grads32, peak


def _cosines(grads16, grads32):
    assert len(grads16) == len(grads32)
    return [F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
            for a, b in zip(grads16, grads32, strict=True)]


@pytest.mark.parametrize("out_proj_inside", [True, False], ids=["out-proj-inside", "out-proj-outside"])
def test_fused_mixer_in_fp16_keeps_a_y_beyond_fp16_range(out_proj_inside):
    """Output and gradients under fp16 autocast: finite, the output within fp16's rounding of the fp32 run's,
    and every gradient as close to fp32's as it is for the same mixer with an ordinary D (y within range).
    The baseline matters: fp16's rounding of the Δ path alone leaves dt_proj.weight's gradient at a cosine
    of 0.9995 to fp32's on CPU, whatever D is (0.992 on an H100 with the large D)."""
    out16, out32, grads16, grads32, peak = _fused_mixer_fp16_and_fp32(BIG_D, out_proj_inside)
    if peak is not None:
        assert peak > 65504
    assert torch.isfinite(out16).all()
    torch.testing.assert_close(out16, out32, rtol=2e-2, atol=2e-2 * out32.abs().max().item())
    assert all(torch.isfinite(g).all() for g in grads16)
    baseline = _cosines(*_fused_mixer_fp16_and_fp32(1.0, out_proj_inside)[2:4])
    for cosine, ordinary in zip(_cosines(grads16, grads32), baseline, strict=True):
        assert cosine > 0.98 and 1 - cosine <= 2 * (1 - ordinary) + 1e-4, (cosine, ordinary)


@pytest.mark.parametrize("variant", ["fused", "out-proj-hooked", "lora"])
def test_fp16_training_step_stays_finite_where_y_passes_fp16_range(variant, monkeypatch):
    """A model whose first mixer's y passes 65504: its fp16-autocast training step (the fused mixer; out_proj
    outside it where hooked or under a LoRA adapter) gives a finite loss and gradients, the loss within fp16's
    rounding of fp32's."""
    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).to(DEVICE).train()
    with torch.no_grad():
        model.backbone.layers[0].mixer.D.fill_(BIG_D)
        model.backbone.layers[0].mixer.out_proj.weight.mul_(1e-3)  # the residual stays moderate
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4))
    y_peaks = []  # what out_proj reads
    if variant == "out-proj-hooked":  # a hooked out_proj runs outside the fused mixer, as under an adapter
        model.backbone.layers[0].mixer.out_proj.register_forward_pre_hook(
            lambda module, args: y_peaks.append(args[0].detach().float().abs().max().item())
        )
    ids = torch.randint(0, SIZES["vocab_size"], (2, 11), device=DEVICE)

    def step(autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), [p.grad for p in model.parameters() if p.grad is not None]

    loss16, grads16 = step(True)
    loss32, grads32 = step(False)
    assert torch.isfinite(loss16) and all(torch.isfinite(g).all() for g in grads16)
    torch.testing.assert_close(loss16, loss32, rtol=5e-3, atol=0)
    if y_peaks:
        assert max(y_peaks[:1]) <= 512 < max(y_peaks[1:])  # in fp16 out_proj saw y / s, in fp32 y itself


def _model_with_y_beyond_fp16_range(folder):
    """A saved 2-layer model whose first mixer's y passes 65504 (large D), with weights that fp16 holds exactly,
    so that an fp16 load differs from the fp32 model only in its activations' rounding."""
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(**SIZES)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        model.backbone.layers[0].mixer.D.fill_(BIG_D)
        model.backbone.layers[0].mixer.out_proj.weight.mul_(2.0**-10)  # the residual stays moderate
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("precision", ["fp16-weights", "fp16-autocast"])
def test_fp16_inference_keeps_a_y_beyond_fp16_range(backend, precision, tmp_path, monkeypatch):
    """Without gradients (evaluation, prefill, reentrant checkpointing's first pass) and in decode steps, a y
    beyond 65504 reaches out_proj scaled into range: logits finite and within fp16's rounding of fp32's, for a
    model loaded in fp16 and for fp32 weights under fp16 autocast (a Trainer's fp16 evaluation)."""
    if backend == "triton":
        pytest.importorskip("triton")
    model = _model_with_y_beyond_fp16_range(tmp_path)
    y_peaks = []
    model.backbone.layers[0].mixer.out_proj.register_forward_pre_hook(
        lambda module, args: y_peaks.append(args[0].abs().max().item())
    )
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits  # fp32 on CPU, whichever backend the half model runs below
    assert max(y_peaks) > 65504
    monkeypatch.setenv("HF_MAMBA_BACKEND", backend)
    if precision == "fp16-weights":
        half = MambaForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).to(DEVICE).eval()
    else:
        half = MambaForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
    ids = ids.to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16, enabled=precision == "fp16-autocast"):
        full = half(ids).logits.float().cpu()
        prefill = half(ids[:, :8], use_cache=True)
        steps = [prefill.logits]
        for t in range(8, 12):
            steps.append(half(ids[:, t : t + 1], cache=prefill.cache, use_cache=True).logits)
    stepped = torch.cat(steps, dim=1).float().cpu()
    bound = 3e-3 * expected.abs().max().item()
    for logits in (full, stepped):
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, expected, rtol=0, atol=bound)


@pytest.mark.parametrize("residual_in_fp32", [True, False], ids=["fp32-stream", "fp16-stream"])
def test_fp16_mixer_leaves_its_scale_to_the_residual_add(residual_in_fp32, tmp_path, monkeypatch):
    """In fp16 without gradients the model's fused residual adds multiply the mixers' out_proj results by their
    scales (`ScaledOutput`, one launch fewer per layer): prefill and decode logits are bit for bit those of
    mixers that multiply themselves (a forward hook on every mixer makes the model call them without deferring),
    while y passes 65504."""
    pytest.importorskip("triton")
    model = _model_with_y_beyond_fp16_range(tmp_path)
    model.config.residual_in_fp32 = residual_in_fp32
    model.save_pretrained(tmp_path)
    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    half = MambaForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).to(DEVICE).eval()
    ids = torch.randint(0, SIZES["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    deferring = []  # each mixer call's defer_scale

    def run():
        with torch.no_grad():
            prefill = half(ids[:, :8], use_cache=True)
            steps = [prefill.logits]
            for t in range(8, 10):
                steps.append(half(ids[:, t : t + 1], cache=prefill.cache, use_cache=True).logits)
        return torch.cat(steps, dim=1)

    mixer_cls = type(half.backbone.layers[0].mixer)
    forward = mixer_cls.forward

    def recording_forward(self, *args, **kwargs):
        deferring.append(kwargs.get("defer_scale", False))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mixer_cls, "forward", recording_forward)
    deferred = run()
    assert len(deferring) == 3 * SIZES["num_hidden_layers"] and all(deferring)
    hooks = [block.mixer.register_forward_hook(lambda *args: None) for block in half.backbone.layers]
    deferring.clear()
    multiplied = run()
    assert len(deferring) == 3 * SIZES["num_hidden_layers"] and not any(deferring)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(deferred).all() and torch.equal(deferred, multiplied)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_residual_stream_keeps_its_dtype(backend, tmp_path, monkeypatch):
    """With residual_in_fp32=False a model loaded in fp16 keeps an fp16 residual stream: the mixer's fp32 result
    (from the scaled y) is rounded to fp16 as out_proj's own output would be; with the default fp32 stream it
    is added unrounded."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("HF_MAMBA_BACKEND", backend)
    for residual_in_fp32, stream in ((False, torch.float16), (True, torch.float32)):
        torch.manual_seed(0)
        model = MambaForCausalLM(MambaConfig(**SIZES, residual_in_fp32=residual_in_fp32)).eval()
        model.save_pretrained(tmp_path / str(residual_in_fp32))
        half = MambaForCausalLM.from_pretrained(tmp_path / str(residual_in_fp32), dtype=torch.float16)
        ids = torch.randint(0, SIZES["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = half.to(DEVICE).eval()(ids.to(DEVICE), output_hidden_states=True)
        assert [h.dtype for h in out.hidden_states[1:-1]] == [stream] * (SIZES["num_hidden_layers"] - 1)
        assert out.logits.dtype == torch.float16 and torch.isfinite(out.logits).all()
