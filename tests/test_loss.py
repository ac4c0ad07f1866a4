"""The blocked causal-LM loss against Transformers' ForCausalLMLoss: value and logits gradient, every reduction."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_mamba import MambaConfig, MambaForCausalLM
from hf_mamba.loss import causal_lm_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_items", [None, 7], ids=["mean", "num_items_in_batch"])
def test_matches_transformers_loss_and_gradient(dtype, num_items):
    logits = (3 * torch.randn(3, 11, 50)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100  # ignored targets (padding, prompts)
    results = []
    for loss_fn, kwargs in ((ForCausalLMLoss, {}), (causal_lm_loss, {"rows_per_block": 4})):
        loss = loss_fn(logits, labels, 50, num_items_in_batch=num_items, **kwargs)
        (grad,) = torch.autograd.grad(loss, logits)
        results.append((loss, grad))
    (expected, expected_grad), (actual, actual_grad) = results
    assert actual.dtype == expected.dtype and actual_grad.dtype == dtype
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    # bf16: both gradients are the fp32 gradient rounded to bf16 once (a rounding apart at most).
    rtol = 8e-3 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(actual_grad, expected_grad, rtol=rtol, atol=1e-6)


def test_default_blocks_hold_a_fixed_number_of_logits(monkeypatch):
    """Rows per block = LOGITS_PER_BLOCK // vocab (a bounded fp32 block whatever the vocabulary); any split
    gives the one-block value and gradient."""
    import hf_mamba.loss

    logits = (3 * torch.randn(3, 11, 50)).requires_grad_()
    labels = torch.randint(0, 50, (3, 11))
    blocks = []
    real_apply = hf_mamba.loss._BlockedCrossEntropy.apply
    monkeypatch.setattr(hf_mamba.loss._BlockedCrossEntropy, "apply", lambda *a: blocks.append(a[-1]) or real_apply(*a))
    monkeypatch.setattr(hf_mamba.loss, "LOGITS_PER_BLOCK", 200)
    results = []
    for kwargs in ({}, {"rows_per_block": 33}):
        loss = causal_lm_loss(logits, labels, 50, **kwargs)
        results.append((loss, *torch.autograd.grad(loss, logits)))
    assert blocks == [4, 33]
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


def test_float64_gradient_matches_finite_differences():
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 2] = -100
    assert torch.autograd.gradcheck(lambda x: causal_lm_loss(x, labels, 7, rows_per_block=3), (logits,))


def test_model_uses_it_and_a_set_loss_function_wins(tiny_kwargs):
    model = MambaForCausalLM(MambaConfig(**tiny_kwargs))
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids, labels=ids)
    expected = ForCausalLMLoss(out.logits, ids, 97)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum() * 0
    assert model(ids, labels=ids).loss.item() == 0.0
