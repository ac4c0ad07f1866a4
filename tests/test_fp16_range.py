"""In fp16 the training mixer's gated scan output y (out_proj's input) can pass 65504 where the same weights in
fp32 do not overflow: y is then kept in fp32 and scaled into range for out_proj (`fp16_range_scale`), so the
forward and the gradients stay finite and follow fp32's. On CPU the Triton kernels run under the interpreter
(tests/conftest.py) and autocast runs the matmuls in fp16, so the shapes are tiny."""

import pytest
import torch
import torch.nn.functional as F
from hf_mamba.kernels import fp16_range_scale, mamba_inner_triton

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


def _weights(mixer):
    return (
        mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
        mixer.A_log, mixer.D,
    )


@pytest.mark.parametrize("out_proj_inside", [True, False], ids=["out-proj-inside", "out-proj-outside"])
def test_fused_mixer_in_fp16_keeps_a_y_beyond_fp16_range(out_proj_inside):
    """Output and gradients under fp16 autocast: finite and within fp16's rounding of the fp32 run's."""
    torch.manual_seed(0)
    mixer = MambaForCausalLM(MambaConfig(**SIZES)).backbone.layers[0].mixer.to(DEVICE)
    with torch.no_grad():
        mixer.D.fill_(BIG_D)
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
        if not out_proj_inside:
            assert out.dtype == (torch.float32 if autocast else x.dtype)  # y itself, kept in fp32
            peak = out.detach().abs().max()
            out = F.linear(out, mixer.out_proj.weight)  # fp32, as the model's scaled out_proj gives
        else:
            peak = None
        out.float().backward(grad_out)
        return out.detach().float(), [x.grad] + [p.grad for p in params if p.grad is not None], peak

    out16, grads16, peak = run(True)
    out32, grads32, _ = run(False)
    if peak is not None:
        assert peak > 65504
    assert torch.isfinite(out16).all()
    torch.testing.assert_close(out16, out32, rtol=2e-2, atol=2e-2 * out32.abs().max().item())
    assert len(grads16) == len(grads32)
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert torch.isfinite(g16).all()
        cosine = F.cosine_similarity(g16.flatten().double(), g32.flatten().double(), dim=0)
        assert cosine > 0.999


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
