"""The fused training mixer (`mamba_inner_triton`) with a padding mask computes what the mixer's modules
compute with it (x and the conv output zero at padding, Δ = 0 there): output and every gradient, for left
and right padding, holes, packed documents, Falcon Mamba's norms and in_proj outside (LoRA's path); and
the model runs a padded training batch through it. On CPU the Triton kernels run under the interpreter
(tests/conftest.py), so the shapes are tiny."""

import pytest
import torch
import torch.nn.functional as F
from hf_mamba.kernels import mamba_inner_triton

from hf_mamba import MambaConfig, MambaForCausalLM

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZES = dict(vocab_size=53, hidden_size=8, state_size=4, num_hidden_layers=1)

LEFT_RIGHT = [[0] * 4 + [1] * 9, [1] * 10 + [0] * 3]
HOLES = [[1] * 3 + [0] * 2 + [1] * 5 + [0] + [1] * 2, [0] * 2 + [1] * 4 + [0] * 7]


def _mixer_weights(mixer):
    return (
        mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight, mixer.dt_proj.bias,
        mixer.A_log, mixer.D, mixer.out_proj.weight, mixer.out_proj.bias,
    )


def _output_and_grads(run, hidden, params, grad_out):
    x = hidden.clone().requires_grad_()
    for p in params:
        p.grad = None
    out = run(x)
    out.backward(grad_out)
    return [out.detach(), x.grad] + [p.grad.clone() for p in params]


@pytest.mark.parametrize(
    "mask,packed,falcon,in_proj_inside,use_bias",
    [
        pytest.param(LEFT_RIGHT, False, False, True, False, id="left-right"),
        pytest.param(HOLES, False, False, True, True, id="holes-bias"),
        pytest.param(HOLES, True, True, True, False, id="holes-packed-falcon"),
        pytest.param(LEFT_RIGHT, False, True, False, False, id="left-right-falcon-in-proj-outside"),
    ],
)
def test_padded_fused_mixer_matches_the_modules(mask, packed, falcon, in_proj_inside, use_bias, monkeypatch):
    """Output and the gradients of the input and of every parameter equal the module path's (PyTorch
    backend: conv, softplus and scan computed independently of the Triton kernels), in fp32."""
    monkeypatch.setenv("HF_MAMBA_BACKEND", "torch")
    torch.manual_seed(0)
    config = MambaConfig(use_bias=use_bias, mixer_rms_eps=1e-6 if falcon else None, **SIZES)
    mixer = MambaForCausalLM(config).backbone.layers[0].mixer.to(DEVICE)
    with torch.no_grad():  # a Δ bias of varied size, so that the state's decay over padding would show
        mixer.dt_proj.bias.uniform_(-2.0, 1.0)
    attention_mask = torch.tensor(mask, device=DEVICE)
    batch, seqlen = attention_mask.shape
    seq_idx = torch.tensor([[0] * 6 + [1] * 7] * batch, device=DEVICE) if packed else None
    hidden = torch.randn(batch, seqlen, config.hidden_size, device=DEVICE)
    grad_out = torch.randn(batch, seqlen, config.hidden_size, device=DEVICE)
    params = list(mixer.parameters())
    weights = _mixer_weights(mixer)
    eps = config.mixer_rms_eps

    def fused(x):
        if in_proj_inside:
            return mamba_inner_triton(
                x, *weights, seq_idx=seq_idx, in_proj_weight=mixer.in_proj.weight, in_proj_bias=mixer.in_proj.bias,
                mixer_rms_eps=eps, attention_mask=attention_mask,
            )
        xz = F.linear(x, mixer.in_proj.weight, mixer.in_proj.bias)
        return mamba_inner_triton(xz, *weights, seq_idx=seq_idx, mixer_rms_eps=eps, attention_mask=attention_mask)

    def modules(x):
        return mixer(x, attention_mask=attention_mask, seq_idx=seq_idx)  # no training kernels on "torch"

    results = _output_and_grads(fused, hidden, params, grad_out)
    refs = _output_and_grads(modules, hidden, params, grad_out)
    assert all(p.grad is not None for p in params)
    for value, ref in zip(results, refs, strict=True):
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-5)
    # Padding gets no gradient (x and the gate's input there reach nothing), and outputs out_proj's bias.
    pad = attention_mask == 0
    assert results[1][pad].eq(0).all()
    out_bias = mixer.out_proj.bias if use_bias else torch.zeros(config.hidden_size, device=DEVICE)
    torch.testing.assert_close(results[0][pad], out_bias.detach().expand(int(pad.sum()), -1), rtol=0, atol=0)


def test_left_and_right_padding_leave_the_tokens_output_unchanged():
    """A row padded in front of and after its tokens gives at its tokens the output of the tokens alone: the
    state passes the padded steps unchanged, and the conv reads padding as the zeros before a sequence. (A
    hole differs from no hole: the conv window after it reads zeros there, as on the module path.)"""
    torch.manual_seed(1)
    config = MambaConfig(**SIZES)
    mixer = MambaForCausalLM(config).backbone.layers[0].mixer.to(DEVICE)
    weights = _mixer_weights(mixer)
    tokens = torch.randn(1, 7, config.hidden_size, device=DEVICE)
    with torch.no_grad():
        alone = mamba_inner_triton(tokens, *weights, in_proj_weight=mixer.in_proj.weight)
        for positions in ([3, 4, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6]):
            hidden = torch.randn(1, 12, config.hidden_size, device=DEVICE)  # padding: anything
            hidden[:, positions] = tokens
            mask = torch.zeros(1, 12, dtype=torch.long, device=DEVICE)
            mask[:, positions] = 1
            out = mamba_inner_triton(hidden, *weights, in_proj_weight=mixer.in_proj.weight, attention_mask=mask)
            torch.testing.assert_close(out[:, positions], alone, rtol=1e-5, atol=1e-6)


def test_fused_mixer_rejects_a_bad_attention_mask():
    mixer = MambaForCausalLM(MambaConfig(**SIZES)).backbone.layers[0].mixer
    hidden = torch.randn(2, 5, SIZES["hidden_size"])
    weights = _mixer_weights(mixer)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        mamba_inner_triton(hidden, *weights, in_proj_weight=mixer.in_proj.weight, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask must be a bool, integer or float tensor"):
        mamba_inner_triton(
            hidden, *weights, in_proj_weight=mixer.in_proj.weight, attention_mask=torch.ones(2, 5, dtype=torch.cfloat)
        )


def test_fused_mixer_without_out_proj_returns_its_input():
    """out_proj_weight None: the result is out_proj's input (batch, seqlen, d_inner), so out_proj applied to it
    gives the whole mixer's output; an out_proj bias without its weight is refused."""
    torch.manual_seed(0)
    mixer = MambaForCausalLM(MambaConfig(use_bias=True, **SIZES)).backbone.layers[0].mixer.to(DEVICE)
    hidden = torch.randn(2, 6, SIZES["hidden_size"], device=DEVICE)
    weights = _mixer_weights(mixer)
    with torch.no_grad():
        whole = mamba_inner_triton(hidden, *weights, in_proj_weight=mixer.in_proj.weight)
        y = mamba_inner_triton(hidden, *weights[:-2], None, in_proj_weight=mixer.in_proj.weight)
        assert y.shape == (2, 6, mixer.d_inner)
        torch.testing.assert_close(mixer.out_proj(y), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out_proj_bias was given without out_proj_weight"):
        mamba_inner_triton(hidden, *weights[:-2], None, mixer.out_proj.bias, in_proj_weight=mixer.in_proj.weight)


@pytest.mark.parametrize("variant", ["falcon", "lora-in-proj"])
def test_padded_training_batch_runs_the_fused_mixer(variant, monkeypatch):
    """A training batch with padding (left, right, a hole) runs every mixer through mamba_inner_triton with
    the mask, and gives the module path's loss and gradients."""
    from hf_mamba import block

    monkeypatch.setenv("HF_MAMBA_BACKEND", "triton")
    torch.manual_seed(0)
    config = MambaConfig(mixer_rms_eps=1e-6 if variant == "falcon" else None, **SIZES)
    model = MambaForCausalLM(config).to(DEVICE)
    if variant == "lora-in-proj":  # in_proj runs as a module, the rest fused
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["in_proj"], init_lora_weights=False))
    attention_mask = torch.tensor([[0] * 3 + [1] * 10, [1] * 4 + [0] * 2 + [1] * 4 + [0] * 3], device=DEVICE)
    ids = torch.randint(0, config.vocab_size, attention_mask.shape, device=DEVICE)
    labels = ids.masked_fill(attention_mask == 0, -100)

    def step():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    real = block.mamba_inner_triton

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attention_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(block, "mamba_inner_triton", spy)
    loss, grads = step()
    assert len(calls) == config.num_hidden_layers and all(m is attention_mask for m in calls)
    monkeypatch.setattr(block.MambaMixer, "_fused_ssm_weights", lambda *args: None)
    ref_loss, ref_grads = step()
    assert len(calls) == config.num_hidden_layers  # the reference ran the modules
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads and grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert ((grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item() < 1e-5, name


def test_padding_bias_is_shared_by_layers_until_the_mask_changes():
    """One mask, one dtype: the same bias tensor for every layer; a mask changed in place, another mask or another
    dtype gets its own, with the right values."""
    from hf_mamba.kernels.mamba_inner import _padding_bias

    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    first = _padding_bias(mask, torch.float32)
    assert _padding_bias(mask, torch.float32) is first
    inf = float("-inf")
    assert first.tolist() == [0.0, 0.0, inf, inf, 0.0, 0.0]
    assert _padding_bias(mask, torch.bfloat16).dtype == torch.bfloat16
    mask[0, 2] = 1  # in place: a new version
    assert _padding_bias(mask, torch.float32).tolist() == [0.0, 0.0, 0.0, inf, 0.0, 0.0]
    assert _padding_bias(mask.clone().fill_(0), torch.float32).tolist() == [inf] * 6
